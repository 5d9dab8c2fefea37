"""The selection rule declared in study/params.yaml `selection` and `measures`: which sweep arm each remedy
sends to the headline, and when a declared bound is met.

Measures reach the rule through JSON files rounded to 5 decimals, and the guard is a share of parents
counted over the grid (steps of 1/320 in the default study), so an arm exactly at a declared bound can miss
it by rounding alone: 0.76875 - 0.71875 = 0.050000000000000044 > 0.05. `within` meets a bound up to
BOUND_TOLERANCE, ten times the files' rounding and far below the guard's step.
"""

from __future__ import annotations

import math
from dataclasses import asdict

from sae_ortho.base.schema import ParamError
from sae_ortho.base.study_params import StudyParams

BOUND_TOLERANCE = 1e-4


def within(value: float, bound: float) -> bool:
    """value <= bound, as declared, with a value at the bound counting as within it (module docstring)."""
    return value <= bound + BOUND_TOLERANCE


def relative_increase(value: float, reference: float) -> float:
    return (value - reference) / reference if reference else math.inf


REMEDIES = ("topk", "ortsae", "matryoshka")


def select_arm(study: StudyParams, synthetic: dict[str, dict], lm: dict[str, dict]) -> dict:
    """Apply the declared rule to the sweep's metrics (per arm: the compact synthetic and LM files), once per
    remedy over that remedy's sweep arms (Arm.remedy): admissible arms keep the cheap LM SAE's FVU within
    `max_fvu_increase` (relative) and its CE loss recovered within `max_ce_drop` of the cheap baseline's,
    and the share of parents learned (the declared guard, pooled over the grid) within
    `measures.guard_max_drop` of the baseline's; the lowest declared primary measure (pooled over the
    grid's instances, hierarchies, regimes and selection seeds) wins (ties: sweep order). With no
    admissible arm, the candidate with the smallest FVU increase is taken and the record says so."""
    base = lm["baseline"]["core"]
    rule, measures = study.selection, study.measures
    base_guard = synthetic["baseline"]["guard_mean"]
    out: dict = {
        "rule": (
            f"per remedy: lowest {measures.primary} (pooled over the synthetic grid) among its sweep arms with "
            f"cheap-LM FVU increase <= {rule.max_fvu_increase:g} (relative), CE-recovered drop <= "
            f"{rule.max_ce_drop:g} and {measures.guard} drop <= {measures.guard_max_drop:g} vs the baseline"
        ),
        "baseline_synthetic_primary": synthetic["baseline"]["primary_mean"],
        "baseline_synthetic_absorption": synthetic["baseline"]["absorption_mean"],
        "remedies": {},
    }
    for remedy in REMEDIES:
        table = {}
        for name, arm in study.sweep.items():
            if arm.remedy != remedy:
                continue
            core = lm[name]["core"]
            fvu_up = relative_increase(core["fvu"], base["fvu"])
            ce_drop = base["ce_recovered_vs_zero"] - core["ce_recovered_vs_zero"]
            guard_drop = base_guard - synthetic[name]["guard_mean"]
            table[name] = {
                "synthetic_primary": synthetic[name]["primary_mean"],
                "synthetic_absorption": synthetic[name]["absorption_mean"],
                "guard_drop": round(guard_drop, 5),
                "fvu_increase": round(fvu_up, 5),
                "ce_recovered_drop": round(ce_drop, 5),
                "admissible": within(fvu_up, rule.max_fvu_increase)
                and within(ce_drop, rule.max_ce_drop)
                and within(guard_drop, measures.guard_max_drop),
            }
        if not table:
            continue
        admissible = [n for n, row in table.items() if row["admissible"]]
        if admissible:
            chosen = min(admissible, key=lambda n: table[n]["synthetic_primary"])
        else:
            chosen = min(table, key=lambda n: table[n]["fvu_increase"])
        out["remedies"][remedy] = {
            "selected": chosen,
            "settings": asdict(study.sweep[chosen]),
            "any_admissible": bool(admissible),
            "candidates": table,
        }
    if "topk" not in out["remedies"]:
        raise ParamError("sweep: no co-activation arm (penalty topk with a term that acts) to select from")
    return out
