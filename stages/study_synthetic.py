"""Stage `synthetic_<group>@<arm>` (study/dvc.yaml): ground-truth absorption of one study arm on
SAELens's synthetic hierarchies (every hierarchy and seed of ../params.yaml `synthetic`).

Writes models/study/synthetic/<group>/<arm>/ (SAEs, matchings, the full record) and the compact
metrics/study/synthetic/<group>/<arm>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sae_ortho.base import params as params_mod
from sae_ortho.base.io import atomic_write_text
from sae_ortho.evaluation.synthetic_arms import run_arm
from sae_ortho.study.arms import arm_spec, load_study_or_exit, run_config_for

MODELS = Path("models/study/synthetic")
METRICS = Path("metrics/study/synthetic")


def compact(full: dict) -> dict:
    """The headline figures per hierarchy: absorption (with its pair-bootstrap interval), absorption
    beyond the matched control, MCC, explained variance, training FVU."""
    out: dict = {"seconds": full["seconds"]}
    for name, h in full["hierarchies"].items():
        out[name] = {
            "absorption": h["absorption"]["mean"],
            "absorption_ci95": h["absorption"]["ci95"],
            "absorption_per_seed": h["absorption"]["per_seed"],
            "absorption_minus_control": h["absorption_minus_control"]["mean"],
            "mcc": h["mcc"]["mean"],
            "explained_variance": h["explained_variance"]["mean"],
            "train_fvu": h.get("train_fvu", {}).get("mean"),
        }
    names = list(full["hierarchies"])
    out["absorption_mean"] = sum(out[n]["absorption"] for n in names) / len(names)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--group", choices=["sweep", "ablation", "headline"], required=True)
    parser.add_argument("--arm", required=True)
    args = parser.parse_args()
    p = params_mod.load_or_exit()
    study = load_study_or_exit()
    try:
        spec = arm_spec(study, args.group, args.arm)
    except (params_mod.ParamError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    cfg = run_config_for(spec, p, p.synthetic.train, p.synthetic.seeds[0], study.topk_fraction)
    out_dir = MODELS / args.group / args.arm
    ckpt = Path("models/study") / f".ckpt_synthetic_{args.group}_{args.arm}"
    full = run_arm(p, args.arm, out_dir, ckpt, workers=min(2, os.cpu_count() or 1), cfg=cfg)
    (out_dir / "result.json").write_text(json.dumps(full, indent=1) + "\n")
    metrics = {"arm": args.arm, "settings": {k: v for k, v in spec.__dict__.items() if v is not None}, **compact(full)}
    (METRICS / args.group).mkdir(parents=True, exist_ok=True)
    atomic_write_text(METRICS / args.group / f"{args.arm}.json", json.dumps(metrics, indent=2, default=list) + "\n")
    print(json.dumps({k: v for k, v in metrics.items() if k != "settings"}))


if __name__ == "__main__":
    main()
