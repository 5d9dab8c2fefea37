"""Stage `synthetic_headline@<arm>` (study/dvc.yaml): ground-truth absorption of one headline arm on
fresh training seeds (`--seeds`), disjoint from ../params.yaml `synthetic.seeds` on which the sweep
chose `best`: a comparison on the seeds the choice was made on would favour the chosen arm.

Writes models/study/synthetic/headline/<arm>/ and metrics/study/synthetic/headline/<arm>.json, in the
format of stages/study_synthetic.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from sae_ortho.base import params as params_mod
from sae_ortho.base.io import atomic_write_text
from sae_ortho.evaluation.synthetic_arms import run_arm
from sae_ortho.study.arms import arm_spec, load_study_or_exit, run_config_for
from stages.study_synthetic import compact

MODELS = Path("models/study/synthetic/headline")
METRICS = Path("metrics/study/synthetic/headline")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arm", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", required=True, help="fresh synthetic training seeds")
    args = parser.parse_args()
    p = params_mod.load_or_exit()
    study = load_study_or_exit()
    s = p.synthetic
    if len(set(args.seeds)) != len(args.seeds):
        sys.exit(f"error: --seeds must be distinct, got {args.seeds}")
    if set(args.seeds) & {*s.seeds, s.model_seed}:
        sys.exit(
            f"error: --seeds {args.seeds} overlap the selection's synthetic.seeds {list(s.seeds)} "
            f"or synthetic.model_seed {s.model_seed}"
        )
    try:
        spec = arm_spec(study, "headline", args.arm)
    except (params_mod.ParamError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    fresh = replace(p, synthetic=replace(s, seeds=tuple(args.seeds)))
    cfg = run_config_for(spec, fresh, s.train, args.seeds[0], study.topk_fraction)
    out_dir = MODELS / args.arm
    ckpt = Path("models/study") / f".ckpt_synthetic_headline_{args.arm}"
    full = run_arm(fresh, args.arm, out_dir, ckpt, workers=min(2, os.cpu_count() or 1), cfg=cfg)
    (out_dir / "result.json").write_text(json.dumps(full, indent=1) + "\n")
    settings = {k: v for k, v in spec.__dict__.items() if v is not None}
    metrics = {"arm": args.arm, "settings": settings, "seeds": args.seeds, **compact(full)}
    METRICS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(METRICS / f"{args.arm}.json", json.dumps(metrics, indent=2, default=list) + "\n")
    print(json.dumps({k: v for k, v in metrics.items() if k != "settings"}))


if __name__ == "__main__":
    main()
