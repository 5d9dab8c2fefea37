"""Paired comparisons between study arms and the power they reach (study/params.yaml `measures`).

Arms that share a seed share the SAE init and the sample stream, so an arm is compared with the
baseline through its per-seed differences: a paired t-test and a bootstrap CI of the mean difference.
How many seeds a comparison needs follows from the observed sd of those differences, at the most
stringent Holm level (alpha / size of the family), for the declared power and smallest effect.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from sae_ortho.base.stats import bootstrap_ci


def paired_difference(arm: np.ndarray, base: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """Per-seed arm - baseline: mean, sd, n, two-sided paired t p-value and a bootstrap 95% CI."""
    arm, base = np.asarray(arm, dtype=float), np.asarray(base, dtype=float)
    keep = np.isfinite(arm) & np.isfinite(base)
    diff = arm[keep] - base[keep]
    n = len(diff)
    out: dict = {"n": n, "mean": float(diff.mean()) if n else None, "sd": None, "p": None, "ci95": [None, None]}
    if n >= 2:
        out["sd"] = float(diff.std(ddof=1))
        out["p"] = float(stats.ttest_rel(arm[keep], base[keep]).pvalue) if out["sd"] > 0 else (0.0 if diff[0] else 1.0)
        out["ci95"] = bootstrap_ci(diff, n_boot, seed)
    return out


def paired_power(n: int, sd_diff: float, effect: float, alpha: float) -> float:
    """Power of the two-sided paired t-test with n seeds to detect a mean difference `effect`."""
    if n < 2:
        return 0.0
    df, crit = n - 1, stats.t.ppf(1 - alpha / 2, n - 1)
    nc = abs(effect) / (sd_diff / np.sqrt(n))
    # The lower tail P(T < -crit) as the upper tail of -T ~ nct(df, -nc): scipy's nct.cdf returns NaN
    # for some large nc (e.g. df 23, nc 8.8), where this is a clean 0.
    return float(stats.nct.sf(crit, df, nc) + stats.nct.sf(crit, df, -nc))


def seeds_for_power(sd_diff: float, effect: float, alpha: float, power: float, max_seeds: int = 1000) -> int:
    """The fewest seeds whose paired t-test reaches `power` at level `alpha` for `effect`."""
    for n in range(2, max_seeds + 1):
        if paired_power(n, sd_diff, effect, alpha) >= power:
            return n
    return max_seeds


def minimum_detectable_effect(n: int, sd_diff: float, alpha: float, power: float) -> float:
    """The smallest |mean difference| the paired test detects with `power` at level `alpha` and n seeds."""
    lo, hi = 0.0, 100 * sd_diff
    for _ in range(100):  # bisection: power rises with the effect
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if paired_power(n, sd_diff, mid, alpha) < power else (lo, mid)
    return hi
