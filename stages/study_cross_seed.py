"""Stage `lm_cross_seed@<arm>` (study/dvc.yaml): feature matching across the headline arm's LM SAE seeds
(each extra seed matched to the first, Hungarian on decoder cosine) and the mapped kept-pair overlap, against
the data-matched nulls (a random rotation; decoders drawn from the held-out activations' covariance)
(library: sae_ortho/analysis/stability_analysis.py cross_seed). Writes metrics/study/cross_seed/<arm>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sae_ortho.analysis import stability_analysis as sa
from sae_ortho.base import params as params_mod
from sae_ortho.base.io import atomic_write_text
from sae_ortho.base.paths import HELDOUT
from sae_ortho.base.study_params import load_study_or_exit
from sae_ortho.evaluation.heldout import HeldoutSet
from sae_ortho.training.sae import CONFIG_FILE

MODELS = Path("models/study/headline")
OUT = Path("metrics/study/cross_seed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arm", required=True)
    args = parser.parse_args()
    p = params_mod.load_or_exit()
    study = load_study_or_exit()
    if args.arm not in study.headline_arms:
        sys.exit(f"error: {args.arm!r} is not a headline arm ({', '.join(study.headline_arms)})")
    dirs = {s: MODELS / f"{args.arm}_s{s}" for s in study.headline_seeds}
    missing = [str(d) for d in dirs.values() if not (d / CONFIG_FILE).exists()]
    if missing:
        sys.exit(f"error: missing trained SAEs: {', '.join(missing)} (run their lm_headline stages)")
    if len(dirs) < 2:  # nothing to match: a record that says so, not a failed stage
        skipped = {"arm": args.arm, "seeds": list(dirs), "skipped": "one headline seed: nothing to match", "pairs": []}
        atomic_write_text(OUT / f"{args.arm}.json", json.dumps(skipped, indent=2) + "\n")
        return
    t0 = time.perf_counter()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    token_acts = HeldoutSet.load(HELDOUT).token_acts().float()
    batches = sa.heldout_batches(token_acts, p.core.pair_batch_size, p.stability.heldout_batches)
    centered = token_acts - token_acts.mean(0)
    cov = centered.T @ centered / (len(centered) - 1)
    result = sa.cross_seed(dirs, batches, cov, study.topk_fraction, p.stability, rng)
    result |= {"arm": args.arm, "null_covariance_from": f"{len(token_acts)} held-out token activations"}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(OUT / f"{args.arm}.json", json.dumps(result, indent=2) + "\n")
    print(json.dumps({"arm": args.arm, "seconds": result["seconds"]}))


if __name__ == "__main__":
    main()
