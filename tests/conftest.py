"""Shared fixtures: the embedded model (loaded once per session) and a small real-text corpus."""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# `make test` runs two workers with OMP_NUM_THREADS=1 (one core each); alone, use both cores.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


def stage_env() -> dict[str, str]:
    """Environment for running `python -m stages.<name>` in a temporary directory."""
    return {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}


def write_small_corpus(path: Path, n_docs: int = 40) -> pd.DataFrame:
    """Real English text without the network: docstrings of standard-library modules."""
    import argparse, collections, csv, email, json, logging, pathlib, subprocess, threading, typing  # noqa: E401, I001

    modules = [argparse, collections, csv, email, json, logging, pathlib, subprocess, threading, typing]
    texts = []
    for mod in modules:
        for _, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200 and doc not in texts:
                texts.append(doc)
    texts = texts[:n_docs]
    df = pd.DataFrame({"doc_id": range(len(texts)), "source": "stdlib-docs", "text": texts})
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(path)
    return df


@pytest.fixture(scope="session")
def model():
    from sae_ortho.data.lm import load_model

    return load_model("smollm2-135m")


@pytest.fixture()
def small_corpus(tmp_path: Path) -> Path:
    path = tmp_path / "data" / "corpus.parquet"
    write_small_corpus(path)
    return path


# The long end-to-end files first. pytest-xdist's loadfile hands files out in queue order, and by default
# it sorts that queue by test count, so the one-test study pipeline (~11 min) started last and ran alone
# at the end of a 29-minute run; the Makefile passes --no-loadscope-reorder to keep this order.
HEAVY_FIRST = ("test_study_pipeline.py", "test_pipeline.py", "test_dist.py", "test_stream.py", "test_extract.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FIRST)))  # stable: the rest keep their order
