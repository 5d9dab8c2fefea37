"""Synthetic samples drawn once and replayed: the training stream per (model, seed) on disk, the
evaluation draw per (model, seed) in memory.

SAELens's sampler costs ~6 us per sample on one core: a run's 1M training samples took as long as its
training steps, and every study arm drew the same (model, seed) stream again. The stream is a pure
function of the synthetic model's config, the seed, the batch size and the library versions, so it
lives in the per-machine cache (like the converted LM) and every arm, stage and worker replays it.
Only the sparse ground-truth feature activations are stored (CSR: ~7 of 200 features fire per
sample, ~46 bytes a sample); each batch is rebuilt as `feature_dict(acts)`, exactly what
`SyntheticModel.sample` returns, so a replayed batch is bit-identical to a live one (tested).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from sae_ortho.base.io import atomic_file, sha256_file
from sae_ortho.base.paths import cache_dir


def draws_dir() -> Path:
    return cache_dir() / "synthetic_draws"


def _key(fingerprint: str, seed: int, batch_size: int, n_batches: int) -> str:
    ident = [fingerprint, seed, batch_size, n_batches, version("sae-lens"), torch.__version__]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:32]


def to_csr(acts: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """Dense [rows, features] batches as one CSR (int16 columns, float32 values), batch by batch."""
    counts, cols, vals = [], [], []
    for dense in acts:
        if dense.shape[1] > np.iinfo(np.int16).max:
            raise ValueError(f"{dense.shape[1]} features: the stored draw's int16 columns hold at most 32767")
        r, c = dense.nonzero(as_tuple=True)
        counts.append(torch.bincount(r, minlength=len(dense)).numpy())
        cols.append(c.numpy().astype(np.int16))
        vals.append(dense[r, c].numpy())
    indptr = np.zeros(sum(len(n) for n in counts) + 1, dtype=np.int64)
    np.cumsum(np.concatenate(counts), out=indptr[1:])
    return {"indptr": indptr, "cols": np.concatenate(cols), "vals": np.concatenate(vals)}


def from_csr(csr: dict[str, np.ndarray], start: int, stop: int, n_features: int) -> torch.Tensor:
    """Rows [start, stop) as the dense [rows, n_features] activations they were drawn as."""
    lo, hi = csr["indptr"][start], csr["indptr"][stop]
    rows = np.repeat(np.arange(stop - start), np.diff(csr["indptr"][start : stop + 1]))
    out = torch.zeros(stop - start, n_features)
    cols = torch.from_numpy(csr["cols"][lo:hi].astype(np.int64))
    out[torch.from_numpy(rows), cols] = torch.from_numpy(csr["vals"][lo:hi])
    return out


def load_or_draw(model, fingerprint: str, rng, batch_size: int, n_batches: int, seed: int) -> dict[str, np.ndarray]:
    """The first `n_batches` batches of the training stream as CSR feature activations, from the cache
    or drawn now under `rng` (an IsolatedRng at the stream's seed) and saved. Either way `rng` ends in
    the state after those batches, so a stream continues live exactly where the stored one stops."""
    path = draws_dir() / f"{_key(fingerprint, seed, batch_size, n_batches)}.npz"
    checksum = path.with_suffix(".sha256")
    if path.exists() and checksum.exists():
        if sha256_file(path) != checksum.read_text().strip():
            raise RuntimeError(f"{path}: checksum mismatch (a corrupt cached draw); delete it and rerun")
        with np.load(path) as f:
            csr = {k: f[k] for k in ("indptr", "cols", "vals")}
            rng.state = torch.from_numpy(f["rng_state"])
        return csr
    parts = []
    with rng.active():
        for _ in range(n_batches):  # sparse at once: 976 dense batches of 200 features would be ~800 MB
            parts.append(to_csr([model.activation_generator.sample(batch_size)]))
    csr = {
        "indptr": np.concatenate([[0], np.cumsum(np.concatenate([np.diff(p["indptr"]) for p in parts]))]),
        "cols": np.concatenate([p["cols"] for p in parts]),
        "vals": np.concatenate([p["vals"] for p in parts]),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **csr, rng_state=rng.state.numpy())
    with atomic_file(checksum) as tmp:  # written second: a draw without its checksum is redrawn
        Path(tmp).write_text(sha256_file(path) + "\n")
    return csr


class ReplayedActivations:
    """Stands in for SAELens's ActivationGenerator: `sample(n)` returns the stored draw's next n rows,
    so SAELens's own evaluation runs on exactly the samples the absorption figures use."""

    def __init__(self, acts: torch.Tensor):
        self.acts, self.pos = acts, 0

    def sample(self, n: int) -> torch.Tensor:
        out = self.acts[self.pos : self.pos + n]
        if len(out) < n:
            raise RuntimeError(f"replayed draw exhausted: asked {n} at {self.pos} of {len(self.acts)}")
        self.pos += n
        return out


_EVAL: OrderedDict = OrderedDict()  # per process: (fingerprint, seed, n, batch) -> (x, acts)
_EVAL_KEEP = 4  # two hierarchies, each with a reseeded draw (~130 MB each at 100k samples)


def clear_eval_draws() -> None:
    """Forget this process's evaluation draws (the benchmark times a cold evaluation)."""
    _EVAL.clear()


def eval_draw(model, fingerprint: str, rng_factory, seed: int, n: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation samples (x, feature activations): drawn in `batch`-row chunks under a fresh
    IsolatedRng(seed), as SAELens's evaluation and the absorption figures draw them, once per process."""
    key = (fingerprint, seed, n, batch, os.getpid())
    if key not in _EVAL:
        rng, xs, acts = rng_factory(seed), [], []
        for start in range(0, n, batch):
            with rng.active():
                x, a = model.sample_with_features(min(batch, n - start))
            xs.append(x)
            acts.append(a)
        _EVAL[key] = (torch.cat(xs), torch.cat(acts))
        while len(_EVAL) > _EVAL_KEEP:
            _EVAL.popitem(last=False)
    _EVAL.move_to_end(key)
    return _EVAL[key]
