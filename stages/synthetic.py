"""Stage `synthetic_<arm>`: ground-truth absorption on SAELens's synthetic model (library: sae_ortho/synthetic*.py)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from sae_ortho.base import params as params_mod
from sae_ortho.base.io import atomic_write_text
from sae_ortho.evaluation.synthetic_arms import ARMS, run_arm

MODELS = Path("models/synthetic")
METRICS = Path("metrics/synthetic")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arm", choices=ARMS, required=True)
    args = parser.parse_args()
    p = params_mod.load_or_exit()
    # Checkpoints live outside the DVC output (models/.ckpt_* is git-ignored), so a killed stage
    # resumes the run it was in; finished runs are redone (DVC clears the output anyway).
    # One single-threaded run per core (results do not depend on the count).
    workers = min(2, os.cpu_count() or 1)
    metrics = run_arm(p, args.arm, MODELS / args.arm, Path("models") / f".ckpt_synthetic_{args.arm}", workers)
    METRICS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(METRICS / f"{args.arm}.json", json.dumps(metrics, indent=2) + "\n")
    summary = {name: h["absorption"]["mean"] for name, h in metrics["hierarchies"].items()}
    print(json.dumps({"arm": args.arm, "absorption": summary, "seconds": metrics["seconds"]}))


if __name__ == "__main__":
    main()
