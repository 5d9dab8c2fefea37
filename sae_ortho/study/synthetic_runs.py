"""A study arm on SAELens's synthetic hierarchies (stage `synthetic_<group>@<arm>`): every hierarchy and
training seed of ../params.yaml `synthetic`, or, for the headline, fresh seeds disjoint from those the
sweep chose `best` on (a comparison on the selection's own seeds would favour the chosen arm).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from sae_ortho.base.io import atomic_write_text
from sae_ortho.base.params import ParamError, Params
from sae_ortho.base.study_params import Measures, StudyParams
from sae_ortho.evaluation.synthetic_arms import run_arm
from sae_ortho.study.arms import arm_spec, run_config_for

MODELS = Path("models/study/synthetic")
METRICS = Path("metrics/study/synthetic")
GROUPS = ("sweep", "ablation", "headline")


def check_seeds(group: str, seeds: tuple[int, ...] | None, p: Params) -> None:
    """The headline runs on fresh seeds and only there; raises ParamError otherwise."""
    s = p.synthetic
    if group != "headline":
        if seeds:
            raise ParamError(f"--seeds: only the headline runs on fresh seeds; {group} uses synthetic.seeds")
        return
    if not seeds:
        raise ParamError("--seeds: the headline needs fresh synthetic training seeds (disjoint from synthetic.seeds)")
    if len(set(seeds)) != len(seeds):
        raise ParamError(f"--seeds: must be distinct, got {list(seeds)}")
    if set(seeds) & {*s.seeds, s.model_seed}:
        raise ParamError(
            f"--seeds: {list(seeds)} overlap the selection's synthetic.seeds {list(s.seeds)} "
            f"or synthetic.model_seed {s.model_seed}"
        )


def compact(full: dict, measures: Measures) -> dict:
    """The headline figures per hierarchy: the declared primary measure and its guard (study/params.yaml
    `measures`), raw absorption (with its pair-bootstrap interval), absorption beyond the matched
    control, MCC, explained variance, training FVU; and the primary and guard pooled over hierarchies."""
    out: dict = {"seconds": full["seconds"]}
    for name, h in full["hierarchies"].items():
        out[name] = {
            "primary": h[measures.primary]["mean"],
            "primary_ci95": h[measures.primary]["ci95"],
            "guard": h[measures.guard]["mean"],
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
    out["primary_mean"] = sum(out[n]["primary"] for n in names) / len(names)
    out["guard_mean"] = sum(out[n]["guard"] for n in names) / len(names)
    out["measures"] = {"primary": measures.primary, "guard": measures.guard}
    return out


def run_study_synthetic(
    p: Params, study: StudyParams, group: str, arm: str, seeds: tuple[int, ...] | None = None
) -> dict:
    """Train and evaluate the arm; write models/study/synthetic/<group>/<arm>/ (SAEs, matchings,
    result.json) and metrics/study/synthetic/<group>/<arm>.json; return the compact metrics."""
    check_seeds(group, seeds, p)
    spec = arm_spec(study, group, arm)
    if seeds:
        p = replace(p, synthetic=replace(p.synthetic, seeds=tuple(seeds)))
    cfg = run_config_for(spec, p, p.synthetic.train, p.synthetic.seeds[0], study.topk_fraction)
    out_dir = MODELS / group / arm
    ckpt = Path("models/study") / f".ckpt_synthetic_{group}_{arm}"
    full = run_arm(p, arm, out_dir, ckpt, workers=min(2, os.cpu_count() or 1), cfg=cfg)
    atomic_write_text(out_dir / "result.json", json.dumps(full, indent=1) + "\n")
    settings = {k: v for k, v in spec.__dict__.items() if v is not None}
    metrics = {
        "arm": arm,
        "settings": settings,
        **({"seeds": list(seeds)} if seeds else {}),
        **compact(full, study.measures),
    }
    atomic_write_text(METRICS / group / f"{arm}.json", json.dumps(metrics, indent=2, default=list) + "\n")
    return metrics
