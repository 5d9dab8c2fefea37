"""Stability of the kept pairs: Jaccard between pair sets at lags, churn, persistence, and their nulls.

A pair set is a sorted array of pair ids `i * d_sae + j` (i < j). Every figure is reported beside a
null matched to the data: each set re-paired at random with each latent's number of kept pairs in
that set unchanged (a configuration-model null). It keeps what per-latent firing frequency alone
explains (a few dense latents sit in most pairs, so two unrelated selections still overlap) and
removes which partner each latent was paired with. Uniform random pair sets would be a trivial null
(Jaccard ~0.0005 at the default budget).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from sae_ortho.training.ortho import pair_id, select_pairs


def pair_ids(i: np.ndarray, j: np.ndarray, d_sae: int) -> np.ndarray:
    """The sorted, distinct pair ids of a pair set."""
    return np.unique(pair_id(i, j, d_sae))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|a & b| / |a | b| of two sets of pair ids (1.0 for two empty sets)."""
    union = len(np.union1d(a, b))
    return len(np.intersect1d(a, b, assume_unique=True)) / union if union else 1.0


def log_sets(pairs: pd.DataFrame, d_sae: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logged steps and each step's kept-pair set, from a training run's pairs.parquet."""
    steps, sets = [], []
    for step, group in pairs.groupby("step", sort=True):
        steps.append(int(step))
        sets.append(pair_ids(group["i"].to_numpy(), group["j"].to_numpy(), d_sae))
    return np.array(steps), sets


def lagged_jaccard(sets: list[np.ndarray], lag: int) -> np.ndarray:
    """J(S_t, S_{t+lag}) for every t that has a partner."""
    return np.array([jaccard(sets[t], sets[t + lag]) for t in range(len(sets) - lag)])


def repaired(ids: np.ndarray, d_sae: int, rng: np.random.Generator) -> np.ndarray:
    """The configuration-model null of one set: its pair endpoints shuffled and paired anew (self-pairs
    and repeats dropped, so the null set can be a few pairs smaller)."""
    ends = np.concatenate([ids // d_sae, ids % d_sae])
    rng.shuffle(ends)
    i, j = ends[0::2], ends[1::2]
    keep = i != j
    return pair_ids(i[keep], j[keep], d_sae)


def lags_for(n_sets: int, lag_fractions: tuple[float, ...]) -> dict[str, int]:
    """Lag name -> lag in sets: one set, and each fraction of the run (at least one set)."""
    lags = {"1": 1}
    for frac in lag_fractions:
        lag = max(1, round(frac * (n_sets - 1)))
        if lag not in lags.values():  # with few sets (10 snapshots) a fraction can equal one set
            lags[f"{frac:g}"] = lag
    return {name: lag for name, lag in lags.items() if lag < n_sets}


def null_sets(sets: list[np.ndarray], d_sae: int, draws: int, rng: np.random.Generator) -> list[list[np.ndarray]]:
    """`draws` independent null versions of a sequence of sets."""
    return [[repaired(s, d_sae, rng) for s in sets] for _ in range(draws)]


def lag_table(sets: list[np.ndarray], nulls: list[list[np.ndarray]], lags: dict[str, int]) -> dict:
    """Mean Jaccard at each lag, the null's mean and sd over draws, and the margin over the null."""
    out = {}
    for name, lag in lags.items():
        observed = float(lagged_jaccard(sets, lag).mean())
        null = np.array([lagged_jaccard(null_seq, lag).mean() for null_seq in nulls])
        out[name] = {
            "lag_sets": lag,
            "jaccard": round(observed, 5),
            "null": round(float(null.mean()), 5),
            "null_sd": round(float(null.std()), 5),
            "margin": round(observed - float(null.mean()), 5),
        }
    return out


def lag_curve(sets: list[np.ndarray], nulls: list[list[np.ndarray]], n_points: int = 25) -> dict[str, list]:
    """Mean Jaccard against lag on a log-spaced grid of lags (for the plot), with the null's mean."""
    lags = np.unique(np.geomspace(1, max(1, len(sets) - 1), n_points).round().astype(int))
    return {
        "lag": lags.tolist(),
        "jaccard": [round(float(lagged_jaccard(sets, lag).mean()), 5) for lag in lags],
        "null": [round(float(np.mean([lagged_jaccard(n, lag).mean() for n in nulls])), 5) for lag in lags],
    }


def settle_step(steps: np.ndarray, consecutive: np.ndarray, tolerance: float = 0.9) -> int | None:
    """The first logged step from which the consecutive-log Jaccard stays at or above `tolerance`
    times its mean over the last 20% of logs: when the set stops churning faster than at the end."""
    if len(consecutive) < 5:
        return None
    plateau = consecutive[-max(1, len(consecutive) // 5) :].mean()
    below = np.nonzero(consecutive < tolerance * plateau)[0]
    first = 0 if len(below) == 0 else below[-1] + 1
    return int(steps[first]) if first < len(consecutive) else None


def persistence(sets: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Distinct pair ids ever kept, and in how many sets each appears."""
    return np.unique(np.concatenate(sets), return_counts=True) if sets else (np.array([]), np.array([]))


def frequency_matched_pairs(sets: list[np.ndarray], n: int, d_sae: int, rng: np.random.Generator) -> np.ndarray:
    """`n` random pairs whose endpoints are drawn with each latent's frequency over all kept pairs."""
    ends = np.concatenate([np.concatenate([s // d_sae, s % d_sae]) for s in sets])
    out = np.empty(0, dtype=np.int64)
    while len(out) < n:
        i, j = rng.choice(ends, 2 * n), rng.choice(ends, 2 * n)
        out = np.unique(np.concatenate([out, pair_ids(i[i != j], j[i != j], d_sae)]))
    return rng.choice(out, n, replace=False)


def involvement(ids: np.ndarray, latents: set[int], d_sae: int) -> float:
    """Fraction of pairs with at least one endpoint in `latents`."""
    if len(ids) == 0:
        return float("nan")
    flagged = np.array(sorted(latents), dtype=np.int64)
    return float((np.isin(ids // d_sae, flagged) | np.isin(ids % d_sae, flagged)).mean())


def edge_fraction(ids: np.ndarray, edges: set[tuple[int, int]], d_sae: int) -> float:
    """Fraction of pairs that are one of `edges` (latent pairs, either order)."""
    if len(ids) == 0:
        return float("nan")
    edge_ids = pair_ids(np.array([a for a, _ in edges]), np.array([b for _, b in edges]), d_sae)
    return float(np.isin(ids, edge_ids).mean())


@torch.no_grad()
def selected_sets(sae, batches: list[torch.Tensor], fraction: float) -> list[np.ndarray]:
    """The pair sets the selector keeps on each held-out batch's codes (what training would penalise)."""
    out = []
    for x in batches:
        pairs = select_pairs(sae.encode(x), fraction)
        out.append(pair_ids(pairs.i.numpy(), pairs.j.numpy(), sae.cfg.d_sae))
    return out


def mean_pairwise_jaccard(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Mean over batches of J(a[b], b[b]): two selections on the same held-out batches."""
    return float(np.mean([jaccard(x, y) for x, y in zip(a, b, strict=True)]))
