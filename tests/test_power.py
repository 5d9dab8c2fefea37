"""Paired comparisons and the power calculation that sizes the study (sae_ortho/study/power.py)."""

import numpy as np
import pytest

from sae_ortho.study.power import minimum_detectable_effect, paired_difference, paired_power, seeds_for_power


@pytest.mark.parametrize(("d", "n"), [(1.0, 10), (0.5, 34)])
def test_seeds_for_power_match_the_textbook_paired_t(d, n):
    """Cohen's d_z = 1 (0.5) needs 10 (34) pairs for 80% power at two-sided 0.05 (G*Power's figures)."""
    assert seeds_for_power(sd_diff=1.0, effect=d, alpha=0.05, power=0.8) == n


def test_power_agrees_with_simulation():
    rng = np.random.default_rng(0)
    n, sd, effect, alpha = 8, 0.03, 0.03, 0.0125  # Holm's first step over 4 tests
    from scipy import stats

    hits = [stats.ttest_1samp(rng.normal(effect, sd, n), 0).pvalue < alpha for _ in range(4000)]
    assert paired_power(n, sd, effect, alpha) == pytest.approx(np.mean(hits), abs=0.03)


def test_minimum_detectable_effect_inverts_the_power():
    mde = minimum_detectable_effect(8, 0.02, 0.0125, 0.8)
    assert paired_power(8, 0.02, mde, 0.0125) == pytest.approx(0.8, abs=1e-6)
    assert minimum_detectable_effect(16, 0.02, 0.0125, 0.8) < mde


def test_paired_difference_sees_what_welch_misses():
    """Three seeds where every arm is below its baseline by ~0.035 while the seeds spread by ~0.02 (the
    committed study's best vs baseline): the paired test rejects where an unpaired one cannot."""
    from scipy import stats

    base = np.array([0.74, 0.76, 0.785])
    arm = base - np.array([0.033, 0.037, 0.035])
    paired = paired_difference(arm, base, n_boot=500)
    assert paired["p"] < 0.01 and paired["ci95"][1] < 0
    assert stats.ttest_ind(arm, base, equal_var=False).pvalue > 0.05
    assert paired_difference(np.array([0.5]), np.array([0.4]))["p"] is None  # one seed: no test


def test_power_is_finite_when_the_effect_dwarfs_the_noise():
    """scipy's nct.cdf gives NaN at df 23, nc 8.8 (the study's 24 units); the power must read ~1."""
    assert paired_power(24, 0.04, 0.0721, 0.0125) == pytest.approx(1.0, abs=1e-6)
    assert all(np.isfinite(paired_power(24, sd, 0.07, 0.0125)) for sd in np.linspace(0.005, 0.2, 40))
