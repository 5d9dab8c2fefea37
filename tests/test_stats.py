"""The one bootstrap and the one Holm correction every stage uses (sae_ortho/base/stats.py)."""

import numpy as np
import pytest

from sae_ortho.base.stats import EMPTY_CI, bootstrap_ci, bootstrap_indices, holm, percentile_ci


def test_bootstrap_ci_covers_the_mean_and_shrinks_with_units():
    rng = np.random.default_rng(0)
    few, many = rng.uniform(size=(3, 10)), rng.uniform(size=(3, 1000))
    lo, hi = bootstrap_ci(few, 500)
    assert lo < few.mean() < hi
    lo2, hi2 = bootstrap_ci(many, 500)
    assert hi2 - lo2 < (hi - lo) / 3
    assert bootstrap_ci(np.full((2, 5), 0.4), 200) == pytest.approx([0.4, 0.4])


def test_bootstrap_ci_one_dimensional_and_nan_units():
    values = np.array([0.1, 0.2, np.nan, 0.3, 0.4])
    lo, hi = bootstrap_ci(values, 500)
    assert 0.1 <= lo < 0.25 < hi <= 0.4


def test_empty_and_single_unit_intervals_share_one_convention():
    assert bootstrap_ci(np.array([]), 100) == EMPTY_CI
    assert bootstrap_ci(np.array([0.5]), 100) == EMPTY_CI
    assert percentile_ci(np.array([np.nan, np.inf])) == EMPTY_CI


def test_bootstrap_is_seeded_and_rounded():
    values = np.random.default_rng(1).normal(size=50)
    assert bootstrap_ci(values, 300, seed=3) == bootstrap_ci(values, 300, seed=3)
    assert bootstrap_ci(values, 300, seed=3) != bootstrap_ci(values, 300, seed=4)
    assert all(round(q, 5) == q for q in bootstrap_ci(values, 300))
    assert bootstrap_indices(7, 4, seed=0).shape == (4, 7)


def test_holm_step_down():
    # sorted p: 0.001 <= 0.05/3, 0.02 <= 0.05/2, 0.04 <= 0.05/1: all rejected
    assert holm({"a": 0.02, "b": 0.001, "c": 0.04}, 0.05) == {"a": True, "b": True, "c": True}
    # 0.026 > 0.025 stops the procedure: a is not rejected although 0.03 <= 0.05
    assert holm({"a": 0.03, "b": 0.001, "c": 0.026}, 0.05) == {"b": True, "a": False, "c": False}
