"""Checkpoints of a training run: everything a killed run needs to resume bit-identically.

That is the SAE, Adam, the step, tau_t, the dead-latent counters, the logs, torch's global RNG and
the penalty's own RNG (the random-pairs control and the OrtSAE-style chunks draw from one each
step). The data stream is rebuilt from its seed and fast-forwarded instead of stored: the shard
shuffler (batches.py) and the synthetic source draw from RNGs local to the stream. Nothing in a
run draws from numpy's global RNG or python's `random`, so neither is stored.

Checkpoints are loaded with torch.load(weights_only=True), which unpickles only tensors and plain
python containers: nothing in them can run code, and numpy arrays are stored as tensors.
"""

from __future__ import annotations

import pickle
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sae_ortho.base.device import HOST
from sae_ortho.base.io import atomic_file, recorded, verified

if TYPE_CHECKING:
    from sae_ortho.training.trainer import Trainer

# Bumped when a checkpoint's contents change: an older checkpoint then starts the run afresh
# rather than resuming without the state it lacks (2: the penalty's RNG, weights_only loading).
CHECKPOINT_FORMAT = 3  # 3: tau at every step
CHECKPOINT = "ckpt.pt"


def trainer_state(trainer: Trainer) -> dict:
    """The trainer's resumable state, as weights_only loading admits it."""
    return {
        "format": CHECKPOINT_FORMAT,
        "sae": trainer.sae.state_dict(),
        "opt": trainer.opt.state_dict(),
        "step": trainer.step,
        "tau": trainer.tau.tau,
        "silent_tokens": trainer.silent_tokens,
        "pair_log": [{k: torch.from_numpy(v) for k, v in rows.items()} for rows in trainer.pair_log],
        "history": trainer.history,
        "tau_trace": trainer.tau_trace,
        "threshold": trainer.sae.cfg.threshold,  # batchtopk's running inference threshold (not a weight)
        "torch_rng": torch.get_rng_state(),
        "penalty": trainer.penalty.state_dict() if trainer.penalty is not None else {},
    }


def save_checkpoint(trainer: Trainer, directory: Path, fingerprint: str) -> None:
    # atomic_file writes under a unique temporary name: a kill mid-write leaves the last checkpoint whole
    with atomic_file(directory / CHECKPOINT, digest=True) as tmp:
        torch.save({"fingerprint": fingerprint, **trainer_state(trainer)}, tmp)


def load_checkpoint(trainer: Trainer, directory: Path, fingerprint: str) -> bool:
    """Restore `trainer` from `directory` if it holds a checkpoint of this run (same fingerprint)."""
    path = directory / CHECKPOINT
    if not path.exists():
        return False
    if recorded(path) is None:
        print(f"ignoring {path}: no sha256 recorded for it (an older trainer's), it cannot be checked", file=sys.stderr)
        return False
    fix = f"delete {directory} to train this run from its start"
    try:
        # On the CPU first: the RNG state must stay there; load_state_dict moves weights and Adam's moments.
        state = torch.load(verified(path, fix=fix), weights_only=True, map_location=HOST)
    except pickle.UnpicklingError:  # format 1 held numpy arrays
        state = {}
    if state.get("format") != CHECKPOINT_FORMAT:
        print(f"ignoring {path}: written by an older trainer, it cannot resume exactly", file=sys.stderr)
        return False
    if state["fingerprint"] != fingerprint:
        return False
    trainer.sae.load_state_dict(state["sae"])
    trainer.opt.load_state_dict(state["opt"])
    trainer.step, trainer.tau.tau = state["step"], state["tau"]
    trainer.silent_tokens, trainer.history = state["silent_tokens"].to(trainer.device), state["history"]
    trainer.tau_trace = state["tau_trace"]
    trainer.sae.cfg = replace(trainer.sae.cfg, threshold=state["threshold"])
    trainer.pair_log = [{k: v.numpy() for k, v in rows.items()} for rows in state["pair_log"]]
    torch.set_rng_state(state["torch_rng"])
    if trainer.penalty is not None:
        trainer.penalty.load_state_dict(state["penalty"])
    for _ in range(trainer.step):  # the data stream is deterministic: skip what was consumed
        next(trainer.batches)
    return True
