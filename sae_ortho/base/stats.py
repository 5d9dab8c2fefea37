"""Statistics used across the evaluations and the study: one percentile bootstrap, one Holm correction.

Every interval is a 95% percentile-bootstrap interval over units resampled with replacement (letters,
parent/child pairs, held-out contexts, training steps), seeded, rounded to 5 decimals, and
`[None, None]` when there is nothing to resample: one convention, so intervals from different
stages compare and serialise alike.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

CI_DIGITS = 5
EMPTY_CI: list[float | None] = [None, None]


def bootstrap_indices(n_units: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """[n_boot, n_units] unit indices drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n_units, (n_boot, n_units))


def percentile_ci(samples: np.ndarray) -> list[float | None]:
    """The 2.5th and 97.5th percentiles of the finite bootstrap samples."""
    samples = np.asarray(samples, dtype=float)
    samples = samples[np.isfinite(samples)]
    if len(samples) == 0:
        return list(EMPTY_CI)
    return [round(float(q), CI_DIGITS) for q in np.quantile(samples, [0.025, 0.975])]


def bootstrap_ci(
    values: np.ndarray, n_boot: int, seed: int = 0, statistic: Callable[[np.ndarray], np.ndarray] | None = None
) -> list[float | None]:
    """95% interval of a statistic (default: the mean, NaN entries left out) of `values`' last axis,
    resampling its units (columns of a [groups, units] array, e.g. seeds x pairs). Fewer than two
    units give `[None, None]`: one unit has no spread to resample."""
    values = np.atleast_2d(np.asarray(values, dtype=float))
    if values.shape[-1] < 2:
        return list(EMPTY_CI)
    idx = bootstrap_indices(values.shape[-1], n_boot, seed)
    if statistic is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN resample gives NaN, dropped
            samples = np.nanmean(values[:, idx], axis=(0, 2))
    else:
        samples = statistic(idx)
    return percentile_ci(samples)


def holm(p_values: dict[str, float], alpha: float) -> dict[str, bool]:
    """Holm's step-down correction: which hypotheses are rejected at family-wise error `alpha`."""
    order = sorted(p_values, key=lambda k: p_values[k])
    rejected, m = {}, len(order)
    still = True
    for rank, key in enumerate(order):
        still = still and p_values[key] <= alpha / (m - rank)
        rejected[key] = still
    return rejected
