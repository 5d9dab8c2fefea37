"""The declared synthetic test: planted effects are found, noise and forgotten parents are not counted,
units pair by (instance, seed), the power and the evaluation's reseed noise are computed from the data."""

from __future__ import annotations

import numpy as np
import pytest

from sae_ortho.base.study_params import Measures
from sae_ortho.study.report_synthetic import findings
from sae_ortho.study.synthetic_stats import decide, per_unit, reseed_noise
from tests.test_study import study

MEASURES = Measures(holm_family=("best", "control", "ortsae"), secondary=(), cost=())
CELLS = [f"m{i}_{r}" for i in (100, 101) for r in ("matched", "wide")]


def synthetic(primary, guard, reseed=None) -> dict:
    """Compact metrics: every cell and hierarchy gets the given per-seed lists."""
    out: dict = {"cells": {}}
    for cell in CELLS:
        out["cells"][cell] = {}
        for h in ("a", "b"):
            row = {name: {"mean": float(np.mean(v)), "per_seed": list(v)} for name, v in (
                (MEASURES.primary, primary), (MEASURES.guard, guard))}  # fmt: skip
            if reseed is not None:
                row["reseed"] = {MEASURES.primary: {"first": list(primary), "redrawn": list(reseed)}}
            out["cells"][cell][h] = row
    return out


def test_planted_reduction_counts_noise_and_forgotten_parents_do_not():
    rng = np.random.default_rng(0)
    base_p = 0.5 + 0.05 * rng.standard_normal(8)
    headline = {
        "baseline": synthetic(base_p, np.full(8, 0.9)),
        "best": synthetic(base_p - 0.15 + 0.005 * rng.standard_normal(8), np.full(8, 0.89)),  # 30% lower, paired
        "control": synthetic(base_p + 0.05 * rng.standard_normal(8), np.full(8, 0.9)),  # noise only
        "ortsae": synthetic(base_p - 0.15 + 0.005 * rng.standard_normal(8), np.full(8, 0.6)),  # wins by forgetting
    }
    out = decide(study(measures=MEASURES), headline)
    arms = out["arms"]
    assert arms["best"]["verdict"] == "reduces absorption" and arms["best"][MEASURES.primary]["relative"] < -0.25
    assert arms["control"]["verdict"] == "not distinguishable from the baseline"
    assert arms["ortsae"]["verdict"] == "forgets parents" and not arms["ortsae"]["reduces_absorption"]
    # A significant rise is reported as one, never as "below the smallest effect".
    worse = decide(study(measures=MEASURES), headline | {"control": synthetic(base_p + 0.1, np.full(8, 0.9))})
    assert worse["arms"]["control"]["verdict"] == "increases absorption"
    lines = findings(out, MEASURES.primary, MEASURES.guard)
    assert any(line.startswith("- **best: reduces absorption.** Evidence: paired difference -0.15") for line in lines)
    assert any("control: not distinguishable" in line and "MDE" in line for line in lines)
    # 2 instances x 8 seeds paired units; the power at the smallest effect is high for the tight planted arm.
    assert arms["best"][MEASURES.primary]["n"] == 16
    assert arms["best"]["power"]["power_reached"] > 0.99 and arms["best"]["power"]["units_needed"] <= 16
    assert set(arms["best"]["cells"][MEASURES.primary]) == {f"{c}/{h}" for c in CELLS for h in ("a", "b")}


def test_units_are_instance_and_seed_averaged_over_cells():
    syn = synthetic([0.1, 0.2], [1.0, 1.0])
    syn["cells"]["m100_wide"]["a"][MEASURES.primary]["per_seed"] = [0.5, None]  # a NaN (no learned parent)
    units = per_unit(syn, MEASURES.primary)
    assert set(units) == {("100", 0), ("100", 1), ("101", 0), ("101", 1)}
    assert units[("100", 0)] == pytest.approx((0.1 * 3 + 0.5) / 4) and units[("100", 1)] == pytest.approx(0.2)


def test_reseed_noise_is_measured_not_assumed():
    same = reseed_noise(synthetic([0.1, 0.2, 0.3], [1, 1, 1], reseed=[0.1, 0.2, 0.3]), MEASURES.primary)
    moved = reseed_noise(synthetic([0.1, 0.2, 0.3], [1, 1, 1], reseed=[0.12, 0.17, 0.31]), MEASURES.primary)
    assert same["sd"] == 0 and moved["sd"] > 0.01 and moved["n"] == 3 * len(CELLS) * 2
    assert reseed_noise(synthetic([0.1], [1]), MEASURES.primary)["sd"] is None  # no second draw: no figure
