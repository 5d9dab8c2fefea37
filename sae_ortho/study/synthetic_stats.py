"""The study's declared test on the synthetic grid (study/params.yaml `measures`), from the headline arms'
compact metrics (sae_ortho/study/synthetic_runs.py compact).

Unit of replication: (benchmark instance, SAE seed). Seed s gives every arm the same init and samples in
every cell, so an arm's paired difference to the baseline is taken per run and averaged over the cells
(hierarchy x regime) of one instance and seed: n = instances x seeds independent paired differences. The
paired t-test and a bootstrap CI of their mean decide; Holm runs over `measures.holm_family` on the primary.
Per cell (instance x regime x hierarchy) the same paired figures are reported, not tested.
"""

from __future__ import annotations

import re
import warnings

import numpy as np

from sae_ortho.base.stats import holm
from sae_ortho.base.study_params import StudyParams
from sae_ortho.study.power import minimum_detectable_effect, paired_difference, paired_power, seeds_for_power
from sae_ortho.study.selection import within

CELL = re.compile(r"m(?P<instance>\d+)_(?P<regime>.+)")


def per_unit(syn: dict, measure: str) -> dict[tuple[str, int], float]:
    """(instance, seed index) -> the measure's mean over that instance's cells (regime x hierarchy)."""
    values: dict[tuple[str, int], list[float]] = {}
    for cell, hierarchies in syn["cells"].items():
        instance = CELL.fullmatch(cell)["instance"]
        for h in hierarchies.values():
            for n, v in enumerate(h[measure]["per_seed"]):
                values.setdefault((instance, n), []).append(np.nan if v is None else v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return {k: float(np.nanmean(v)) for k, v in values.items()}


def pooled_difference(arm: dict, base: dict, measure: str) -> dict:
    a, b = per_unit(arm, measure), per_unit(base, measure)
    units = sorted(set(a) & set(b))
    out = paired_difference(np.array([a[u] for u in units]), np.array([b[u] for u in units]))
    base_mean = float(np.nanmean([b[u] for u in units]))
    out |= {"arm_mean": float(np.nanmean([a[u] for u in units])), "baseline_mean": base_mean}
    out["relative"] = out["mean"] / base_mean if out["mean"] is not None and base_mean else None
    return out


def cell_differences(arm: dict, base: dict, measure: str) -> dict[str, dict]:
    """'cell/hierarchy' -> paired difference over seeds (descriptive, untested)."""
    out = {}
    for cell, hierarchies in arm["cells"].items():
        for name, h in hierarchies.items():
            other = base["cells"][cell][name][measure]["per_seed"]
            mine = h[measure]["per_seed"]
            as_array = lambda xs: np.array([np.nan if x is None else x for x in xs], dtype=float)  # noqa: E731
            out[f"{cell}/{name}"] = paired_difference(as_array(mine), as_array(other)) | {
                "arm_mean": h[measure]["mean"],
                "baseline_mean": base["cells"][cell][name][measure]["mean"],
            }
    return out


def reseed_noise(base: dict, measure: str) -> dict:
    """The evaluation draw's own noise: sd over runs of (second draw - first draw) / sqrt 2, per run's measure."""
    diffs = []
    for hierarchies in base["cells"].values():
        for h in hierarchies.values():
            r = h.get("reseed", {}).get(measure)
            if r:
                diffs += [
                    b - a for a, b in zip(r["first"], r["redrawn"], strict=True) if a is not None and b is not None
                ]
    if len(diffs) < 2:
        return {"n": len(diffs), "sd": None}
    return {"n": len(diffs), "sd": float(np.std(diffs, ddof=1) / np.sqrt(2)), "mean_shift": float(np.mean(diffs))}


def curve(syn: dict, measure: str) -> dict[int, float]:
    """samples seen -> the measure's mean over cells and the curve seeds."""
    points: dict[int, list[float]] = {}
    for hierarchies in syn["cells"].values():
        for h in hierarchies.values():
            for samples, figures in h.get("curve", {}).items():
                points.setdefault(int(samples), []).extend(v for v in figures[measure] if v is not None)
    return {n: float(np.mean(v)) for n, v in sorted(points.items()) if v}


def efficiency(arms: dict[str, dict], primary: str) -> dict[str, float | None]:
    """Per arm, within the synthetic benchmark: the primary measure removed per unit of synthetic FVU added
    (1 - explained variance), from the pooled paired differences; None where the FVU change's 95% CI holds 0
    (a cost within noise would make the ratio arbitrarily large) or where FVU fell (no cost to divide by: the
    ratio's sign would read a gain on both counts as a loss, or a loss on both as a gain)."""
    out: dict[str, float | None] = {}
    for arm, row in arms.items():
        ev = row.get("explained_variance")
        lo, hi = ev["ci95"] if ev else (None, None)
        if ev is None or lo is None or lo <= 0 <= hi or ev["mean"] > 0:
            out[arm] = None
            continue
        out[arm] = row[primary]["mean"] / ev["mean"]  # (-d primary) / (d FVU), with d FVU = -d explained variance
    return out


def decide(study: StudyParams, headline: dict[str, dict]) -> dict:
    """Per arm: pooled paired differences for every declared measure, per-cell ones for the primary and
    the guard, Holm over the family, the declared verdict, and the power reached."""
    m, alpha = study.measures, study.alpha
    base = headline["baseline"]
    level = alpha / len(m.holm_family)  # Holm's most stringent step: what the power is computed at
    arms: dict[str, dict] = {}
    for arm, syn in headline.items():
        if arm == "baseline":
            continue
        row = {
            name: pooled_difference(syn, base, name)
            for name in dict.fromkeys([m.primary, m.guard, *m.secondary, *m.cost])
        }
        row["cells"] = {name: cell_differences(syn, base, name) for name in (m.primary, m.guard)}
        primary = row[m.primary]
        effect = m.smallest_effect * abs(primary["baseline_mean"])
        if primary["sd"]:
            row["power"] = {
                "units": primary["n"],
                "level": level,
                "smallest_effect_abs": effect,
                "power_reached": paired_power(primary["n"], primary["sd"], effect, level),
                "units_needed": seeds_for_power(primary["sd"], effect, level, m.power),
                "minimum_detectable_effect": minimum_detectable_effect(primary["n"], primary["sd"], level, m.power),
            }
        arms[arm] = row
    tested = {a: arms[a][m.primary]["p"] for a in m.holm_family if a in arms and arms[a][m.primary]["p"] is not None}
    rejected = holm(tested, alpha) if tested else {}
    for arm, row in arms.items():
        primary, guard = row[m.primary], row[m.guard]
        row["holm_rejects"] = rejected.get(arm, False)
        row["in_family"] = arm in m.holm_family
        big_enough = primary["relative"] is not None and within(primary["relative"], -m.smallest_effect)
        keeps_parents = guard["mean"] is not None and within(-guard["mean"], m.guard_max_drop)
        row["reduces_absorption"] = bool(row["holm_rejects"] and big_enough and keeps_parents)
        row["verdict"] = (
            "reduces absorption" if row["reduces_absorption"]
            else "forgets parents" if row["holm_rejects"] and big_enough
            else "increases absorption" if row["holm_rejects"] and primary["mean"] > 0
            else "below the smallest effect" if row["holm_rejects"]
            else "not distinguishable from the baseline"
        )  # fmt: skip
    return {
        "measures": {"primary": m.primary, "guard": m.guard, "smallest_effect": m.smallest_effect},
        "holm_family": list(m.holm_family),
        "alpha": alpha,
        "arms": arms,
        "reseed_noise": {name: reseed_noise(base, name) for name in (m.primary, m.guard, "absorption")},
        "efficiency": efficiency(arms, m.primary) if "explained_variance" in m.cost else {},
        "curves": {arm: curve(syn, m.primary) for arm, syn in headline.items()},
    }
