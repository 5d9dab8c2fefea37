"""Where things live: the pipeline's data paths (relative to the repository root, where DVC runs every
stage) and the one per-machine cache directory.

A path that two stages share is named here once, so the writer and its readers cannot disagree.
"""

from __future__ import annotations

import os
from pathlib import Path

# Stage outputs that other stages read (dvc.yaml lists the same paths).
CORPUS = Path("data/corpus.parquet")
PROBING_DATA = Path("data/probing")
ACTIVATIONS = Path("data/activations")
HELDOUT = Path("data/heldout")
PROBE_ACTS = Path("data/probe_acts")
LETTERS = Path("data/letters")
CORE_PER_CONTEXT = Path("data/core")

CACHE_ENV = "SAE_ORTHO_CACHE"


def cache_dir() -> Path:
    """The per-machine cache (downloads, the converted model): $SAE_ORTHO_CACHE or ~/.cache/sae_ortho.

    It lives outside the pipeline, like the Hugging Face cache: everything in it is a pure function of
    pinned inputs (sha256-checked downloads, a model keyed by its file and library versions)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sae_ortho"


def downloads_dir() -> Path:
    return cache_dir() / "downloads"
