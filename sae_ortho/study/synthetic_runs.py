"""A study arm on the synthetic benchmark grid (stage `synthetic_<group>@<arm>`): every benchmark instance
(synthetic model seed), hierarchy and dictionary regime of study/params.yaml `synthetic_grid`, on the
selection seeds (sweep, ablation) or the headline's fresh seeds (a comparison on the selection's own
seeds would favour the chosen arms). Seed s gives every arm the same SAE init and the same samples.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from sae_ortho.base.io import atomic_dir, atomic_write_text, temp_sibling
from sae_ortho.base.params import Params, SyntheticParams
from sae_ortho.base.study_params import Regime, StudyParams
from sae_ortho.evaluation.synthetic_arms import SyntheticJob, aggregate, json_safe, publish, run_jobs, settings
from sae_ortho.study.arms import arm_spec, run_config_for
from sae_ortho.training.train import TAU_TRACE

MODELS = Path("models/study/synthetic")
METRICS = Path("metrics/study/synthetic")
GROUPS = ("sweep", "ablation", "headline")


def cell_params(s: SyntheticParams, instance: int, regime: Regime, seeds: tuple[int, ...]) -> SyntheticParams:
    """../params.yaml `synthetic` at one benchmark instance and dictionary regime."""
    return replace(s, model_seed=instance, seeds=seeds, train=replace(s.train, d_sae=regime.d_sae, k=regime.k))


def grid_jobs(
    p: Params, study: StudyParams, group: str, arm: str, root: Path, ckpt: Path
) -> list[tuple[str, SyntheticJob]]:
    """(cell label, job) for every instance x regime x hierarchy x seed of the arm, runs under `root`."""
    grid, spec = study.synthetic_grid, arm_spec(study, group, arm)
    headline = group == "headline"
    seeds = grid.seeds if headline else grid.selection_seeds
    jobs = []
    for instance in grid.instances if headline else grid.selection_instances:
        for regime_name, regime in grid.regimes.items():
            s, cell = cell_params(p.synthetic, instance, regime, seeds), f"m{instance}_{regime_name}"
            for h in s.hierarchies:
                for n, seed in enumerate(seeds):
                    where = Path(cell) / h.name / f"seed_{seed}"
                    cfg = run_config_for(spec, p, s.train, seed, study.topk_fraction)
                    if spec.tau_from:  # the matched control: the named arm's tau, step by step, same cell and seed
                        cfg = replace(cfg, tau_replay=tau_trace(group, spec.tau_from, where))
                    curve = group == "headline" and n < grid.curve_seeds
                    reseed = s.eval_seed + grid.reseed if group == "headline" and arm == "baseline" else None
                    job = SyntheticJob(s, cfg, h, root / where, ckpt / where, curve, reseed, p.torch_device)
                    jobs.append((cell, job))
    return jobs


TAU_TRACES = "tau_traces.npz"  # per run with a penalty: tau at every step, keyed by cell/hierarchy/seed_s


def tau_trace(group: str, arm: str, where: Path) -> tuple[float, ...]:
    path = METRICS / group / arm / TAU_TRACES
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: run the `{arm}` arm's synthetic stage first")
    with np.load(path) as traces:
        return tuple(float(t) for t in traces[str(where)])


def _per_seed(h: dict, name: str) -> dict:
    return {"mean": h[name]["mean"], "per_seed": h[name]["per_seed"]}


def compact(full: dict, study: StudyParams) -> dict:
    """Per cell and hierarchy, per-seed values (seed order of the grid) of every declared measure, the
    synthetic run's final tau, the curve and the reseeded draw for the primary and guard; pooled means."""
    m = study.measures
    named = dict.fromkeys([m.primary, m.guard, *m.secondary, *m.cost, "absorption"])
    out: dict = {"seconds": full["seconds"], "cells": {}}
    primaries, guards, raw = [], [], []
    for cell, hierarchies in full["cells"].items():
        out["cells"][cell] = {}
        for name, h in hierarchies.items():
            row = {k: _per_seed(h, k) for k in named}
            if "train_tau" in h:
                row["tau"] = _per_seed(h, "train_tau")
            if "curve" in h:
                row["curve"] = {n: {k: v[k] for k in (m.primary, m.guard, "absorption")} for n, v in h["curve"].items()}
            if "reseed" in h:
                row["reseed"] = {k: h["reseed"][k] for k in (m.primary, m.guard, "absorption")}
            out["cells"][cell][name] = row
            primaries.append(h[m.primary]["mean"])
            guards.append(h[m.guard]["mean"])
            raw.append(h["absorption"]["mean"])
    out["primary_mean"] = float(np.nanmean(primaries))
    out["guard_mean"] = float(np.nanmean(guards))
    out["absorption_mean"] = float(np.nanmean(raw))
    out["measures"] = {"primary": m.primary, "guard": m.guard}
    return json_safe(out)


def run_study_synthetic(p: Params, study: StudyParams, group: str, arm: str) -> dict:
    """Train and evaluate the arm on the grid. The stage's outputs are small and committed, so a finished stage
    never reruns on a fresh clone and the study can be run in parts across machines: metrics/study/synthetic/
    <group>/<arm>.json (compact) and <arm>/ (result.json, every penalised run's tau trace). The SAEs and
    per-run matchings stay in models/study/synthetic/<group>/<arm>/, untracked, for inspection."""
    spec = arm_spec(study, group, arm)
    out_dir = MODELS / group / arm
    tmp, ckpt = temp_sibling(out_dir), Path("models/study") / f".ckpt_synthetic_{group}_{arm}"
    jobs = grid_jobs(p, study, group, arm, tmp, ckpt)
    t0 = time.perf_counter()
    runs = run_jobs([j for _, j in jobs], min(2, os.cpu_count() or 1), f"synthetic {group} {arm}")
    full: dict = {"arm": arm, "settings": settings(jobs[0][1].s, jobs[0][1].cfg, p.torch_device), "cells": {}}
    for cell in dict.fromkeys(c for c, _ in jobs):
        full["cells"][cell] = {}
        for h in jobs[0][1].s.hierarchies:
            mine = [(run, job) for (c, job), run in zip(jobs, runs, strict=True) if c == cell and job.h == h]
            full["cells"][cell][h.name] = aggregate(h, mine[0][0][2], [(m, ev) for (m, ev, _), _ in mine], mine[0][1].s)
    full["seconds"] = time.perf_counter() - t0
    full = json_safe(full)
    atomic_write_text(tmp / "result.json", json.dumps(full, indent=1) + "\n")
    with atomic_dir(METRICS / group / arm) as out:
        (out / "result.json").write_text(json.dumps(full, indent=1) + "\n")
        traces = {str(j.run_dir.relative_to(tmp)): j.run_dir / TAU_TRACE for _, j in jobs}
        traces = {k: np.load(v) for k, v in traces.items() if v.exists()}
        if traces:
            np.savez_compressed(out / TAU_TRACES, **traces)
    publish(tmp, out_dir, ckpt)
    given = {k: v for k, v in spec.__dict__.items() if v not in (None, "", ())}
    metrics = {"arm": arm, "group": group, "settings": given, **compact(full, study)}
    atomic_write_text(METRICS / group / f"{arm}.json", json.dumps(metrics, indent=2, default=list) + "\n")
    return metrics
