"""Stage `core@<sae>`: held-out core metrics of one SAE (library: sae_ortho/evaluation/core.py).

`python -m stages.core --sae NAME --dir SAE_DIR` -> metrics/core/NAME.json, and per-context sums in
data/core/NAME.safetensors (for confidence intervals on differences between SAEs). Exits non-zero when a
figure means a broken SAE or pipeline (FVU >= 1, CE recovered < 0, all latents dead, NaN).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from sae_ortho.base import params as params_mod
from sae_ortho.base.io import atomic_file, atomic_write_text
from sae_ortho.data.lm import ModelUnavailableError, load_model
from sae_ortho.evaluation.core import core_metrics, science_failures
from sae_ortho.evaluation.heldout import HeldoutSet
from sae_ortho.training.sae import SAE

HELDOUT = Path("data/heldout")
METRICS = Path("metrics/core")
PER_CONTEXT = Path("data/core")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sae", required=True, help="name (metrics/core/<name>.json)")
    parser.add_argument("--dir", required=True, type=Path, help="SAE directory written by a training stage")
    args = parser.parse_args()
    p = params_mod.load_or_exit()
    t0 = time.perf_counter()
    try:
        hs = HeldoutSet.load(HELDOUT)
        sae = SAE.load(args.dir)
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")
    if sae.cfg.hook_name and sae.cfg.hook_name != hs.manifest["hook_name"]:
        sys.exit(
            f"error: SAE {args.dir} was trained at {sae.cfg.hook_name}, held-out set is {hs.manifest['hook_name']}"
        )
    try:
        model = load_model(p.model)
    except ModelUnavailableError as err:
        sys.exit(f"error: {err}")
    sae.eval()
    with torch.no_grad():
        metrics = core_metrics(sae, model, hs, p.core)
    per_context = metrics.pop("per_context")
    metrics = {"sae": args.sae, "dir": str(args.dir), **metrics, "seconds": round(time.perf_counter() - t0, 1)}
    METRICS.mkdir(parents=True, exist_ok=True)
    PER_CONTEXT.mkdir(parents=True, exist_ok=True)
    with atomic_file(PER_CONTEXT / f"{args.sae}.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in per_context.items()}, str(tmp))
    atomic_write_text(METRICS / f"{args.sae}.json", json.dumps(metrics, indent=2) + "\n")
    fails = science_failures(metrics)
    if fails:
        for fail in fails:
            print(f"error: core@{args.sae}: {fail}", file=sys.stderr)
        sys.exit(1)
    keys = ("l0", "fvu", "fvu_outside_tail", "ce_recovered_vs_zero", "kl_with_sae", "dead_fraction")
    print(json.dumps({k: round(metrics[k], 4) for k in keys}))


if __name__ == "__main__":
    main()
