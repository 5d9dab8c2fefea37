"""Stage `absorption@<sae>`: first-letter absorption of one SAE (library: sae_ortho/evaluation/absorption.py).

`python -m stages.absorption --sae NAME --dir SAE_DIR` -> metrics/absorption/NAME.json, from the
letter cache (no model needed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from sae_ortho.base import params as params_mod
from sae_ortho.base.io import atomic_write_text
from sae_ortho.evaluation.absorption import absorption_result, load_manifest
from sae_ortho.training.sae import CONFIG_FILE, SAE

LETTERS_DIR = Path("data/letters")
METRICS = Path("metrics/absorption")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sae", required=True, help="name (metrics/absorption/<name>.json)")
    parser.add_argument("--dir", required=True, type=Path, help="SAE directory written by a training stage")
    args = parser.parse_args()
    p = params_mod.load_or_exit()
    # sklearn warns on every letter whose k-sparse probe predicts no positive (F1 is then 0, as SAEBench counts it).
    warnings.filterwarnings("ignore", message=".*ill-defined.*")
    if "OMP_NUM_THREADS" not in os.environ:  # the machine is shared: 2 threads unless told otherwise
        torch.set_num_threads(2)
    t0 = time.perf_counter()
    try:
        manifest = load_manifest(LETTERS_DIR)
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")
    if not (args.dir / CONFIG_FILE).exists():
        sys.exit(f"error: SAE directory {args.dir} not found (no {CONFIG_FILE}): train it first (dvc repro)")
    sae = SAE.load(args.dir).eval()
    if sae.cfg.hook_name and sae.cfg.hook_name != manifest["hook_name"]:
        sys.exit(
            f"error: SAE {args.dir} was trained at {sae.cfg.hook_name}, {LETTERS_DIR} holds {manifest['hook_name']}"
        )
    result = absorption_result(sae.to_saelens(), LETTERS_DIR, p.absorption, args.sae)
    result = {"sae": args.sae, "dir": str(args.dir), **result, "seconds": round(time.perf_counter() - t0, 1)}
    METRICS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(METRICS / f"{args.sae}.json", json.dumps(result, indent=2) + "\n")
    flag = "" if result["meaningful"] else f"  NOT MEANINGFUL (< {p.absorption.min_carried_letters} letters carried)"
    print(
        f"{args.sae}: mean absorption fraction {result['mean_absorption_fraction']} "
        f"(reseed range {result['mean_absorption_fraction_reseed_range']}), full absorption "
        f"{result['full_absorption_rate']}, split features {result['num_split_features']}, letters carried by one "
        f"latent {result['letters_carried_by_one_latent']}, probe-supported {result['letters_probe_supported']}{flag}"
    )


if __name__ == "__main__":
    main()
