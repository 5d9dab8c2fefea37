"""What every per-SAE evaluation stage (`core@`, `probing@`, `absorption@`) does around its metric:
parse `--sae NAME --dir SAE_DIR`, load the parameters, set the thread count, load the SAE and check it
was trained where the cache it is evaluated on was taken, and write the result JSON atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sae_ortho.base import device
from sae_ortho.base import params as params_mod
from sae_ortho.base.io import atomic_write_text
from sae_ortho.base.params import Params
from sae_ortho.training.sae import CONFIG_FILE, SAE


@dataclass
class SAEStage:
    """One run of a per-SAE stage: its arguments, parameters, start time and the loaded SAE."""

    name: str
    directory: Path
    params: Params
    metrics_dir: Path
    t0: float = field(default_factory=time.perf_counter)

    @classmethod
    def from_argv(cls, doc: str, metrics_dir: Path, threads: int = 2) -> SAEStage:
        """Arguments and parameters (bad ones exit 2 in one line); `threads` torch threads unless
        OMP_NUM_THREADS says otherwise (the machine is shared)."""
        parser = argparse.ArgumentParser(description=doc.split("\n")[0])
        parser.add_argument("--sae", required=True, help=f"name ({metrics_dir}/<name>.json)")
        parser.add_argument("--dir", required=True, type=Path, help="SAE directory written by a training stage")
        args = parser.parse_args()
        p = params_mod.load_or_exit()
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(threads)
        return cls(args.sae, args.dir, p, metrics_dir)

    def load_sae(self, cache: Path, hook_name: str, d_in: int | None = None) -> SAE:
        """The SAE in eval mode; exits with one line when it is missing or was trained at another hook
        (or width) than `cache` holds."""
        if not (self.directory / CONFIG_FILE).exists():
            sys.exit(f"error: SAE directory {self.directory} not found (no {CONFIG_FILE}): train it first (dvc repro)")
        sae = SAE.load(self.directory).eval().to(self.params.torch_device)
        if sae.cfg.hook_name and sae.cfg.hook_name != hook_name:
            sys.exit(f"error: SAE {self.directory} was trained at {sae.cfg.hook_name}, {cache} holds {hook_name}")
        if d_in is not None and sae.cfg.d_in != d_in:
            sys.exit(f"error: SAE {self.directory} has d_in {sae.cfg.d_in}, {cache} holds d {d_in}")
        return sae

    def write(self, result: dict) -> dict:
        """metrics_dir/<name>.json with the SAE's name, directory and the stage's seconds."""
        out = {
            "sae": self.name,
            "dir": str(self.directory),
            **result,
            **device.record(self.params.torch_device),
            "seconds": round(time.perf_counter() - self.t0, 1),
        }
        atomic_write_text(self.metrics_dir / f"{self.name}.json", json.dumps(out, indent=2) + "\n")
        return out

    def fail_on(self, stage: str, failures: list[str]) -> None:
        """Exit 1 listing every science check that failed (a broken SAE or pipeline)."""
        for failure in failures:
            print(f"error: {stage}@{self.name}: {failure}", file=sys.stderr)
        if failures:
            sys.exit(1)
