"""Encoder/decoder snapshots taken during training, for the stability analysis.

The baseline has no pair log of its own, so the stability stage reruns the pair selector on each
snapshot's codes over fixed held-out batches; the orthogonality SAE's snapshots go through the same
path, which makes the two comparable.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sae_ortho.base.io import atomic_file, verified

SNAPSHOTS = "snapshots.safetensors"
SNAPSHOT_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")


def save_snapshot(sae, directory: Path, step: int) -> None:
    """The encoder and decoder after `step`, in fp16 (~11 MB at 4608 x 576): enough to recompute codes
    and decoder cosines, which is all the stability analysis reads."""
    from safetensors.torch import save_file

    with atomic_file(directory / f"step_{step}.safetensors", digest=True) as tmp:
        save_file({k: getattr(sae, k).detach().half().cpu().contiguous() for k in SNAPSHOT_KEYS}, str(tmp))


def collect_snapshots(directory: Path, out: Path, steps: set[int]) -> None:
    """One file `{step}.{W_enc,b_enc,W_dec,b_dec}` from the per-step files, written atomically."""
    from safetensors.torch import load_file, save_file

    tensors = {}
    for step in sorted(steps):
        for key, value in load_file(str(verified(directory / f"step_{step}.safetensors"))).items():
            tensors[f"{step}.{key}"] = value
    with atomic_file(out, digest=True) as tmp:
        save_file(tensors, str(tmp))


def load_snapshots(path: Path) -> dict[int, dict[str, torch.Tensor]]:
    """step -> {W_enc, b_enc, W_dec, b_dec} (fp32) from a training run's snapshots.safetensors."""
    from safetensors.torch import load_file

    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(verified(path))).items():
        step, name = key.split(".", 1)
        out.setdefault(int(step), {})[name] = value.float()
    return dict(sorted(out.items()))
