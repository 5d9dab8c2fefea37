"""The stability stage's analysis: kept-pair stability within a run (training pair log and snapshots),
feature and pair stability across SAE seeds, and the link to the latents absorption flagged.

Every figure comes with its null and the margin over it (analysis/stability.py, analysis/matching.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sae_ortho.analysis import matching
from sae_ortho.analysis import stability as st
from sae_ortho.base.io import verified
from sae_ortho.base.params import StabilityParams
from sae_ortho.evaluation.core import unit_rows
from sae_ortho.training.ortho import pair_budget, pair_id
from sae_ortho.training.sae import CONFIG_FILE, SAE
from sae_ortho.training.snapshots import SNAPSHOTS, load_snapshots

PERSISTENT_SHARE = 0.5  # a pair kept in at least half of the logged sets is "persistent"
# One draw of each matching null: each is a full d_sae x d_sae assignment, and over 4608 matched
# features the null's mean and shared fractions vary little between draws.
MATCH_NULL_DRAWS = 1


def within_run(pairs: pd.DataFrame, w_dec_final: torch.Tensor, fraction: float, sp: StabilityParams, rng) -> dict:
    """The training pair log of one orthogonality run: lags, churn, persistence, top pairs."""
    d_sae = w_dec_final.shape[0]
    steps, sets = st.log_sets(pairs, d_sae)
    nulls = st.null_sets(sets, d_sae, sp.null_draws, rng)
    consecutive = st.lagged_jaccard(sets, 1)
    null_consecutive = np.mean([st.lagged_jaccard(n, 1) for n in nulls], axis=0)
    ids, counts = st.persistence(sets)
    null_distinct = [len(st.persistence(n)[0]) for n in nulls]
    null_counts = st.persistence(nulls[0])[1]
    order = np.argsort(-counts, kind="stable")[: sp.top_pairs]
    first = pairs.assign(id=pair_id(pairs.i.to_numpy(), pairs.j.to_numpy(), d_sae))
    first = first.sort_values("step").drop_duplicates("id").set_index("id")
    w = unit_rows(w_dec_final)
    top = []
    for pid, count in zip(ids[order], counts[order], strict=True):
        i, j = int(pid // d_sae), int(pid % d_sae)
        top.append(
            {
                "i": i,
                "j": j,
                "logs": int(count),
                "first_step": int(first.loc[pid, "step"]),
                "cos_first": round(float(first.loc[pid, "cos"]), 4),
                "cos_final": round(float(w[i] @ w[j]), 4),
            }
        )
    budget = pair_budget(d_sae, fraction)
    return {
        "logs": len(sets),
        "steps_logged": [int(steps[0]), int(steps[-1])],
        "pair_budget": budget,
        "jaccard_at_lag": st.lag_table(sets, nulls, st.lags_for(len(sets), sp.lag_fractions)),
        "settle_step": st.settle_step(steps[1:], consecutive),
        "consecutive_jaccard_final_20pct": round(float(consecutive[-max(1, len(consecutive) // 5) :].mean()), 5),
        "distinct_pairs": len(ids),
        "distinct_over_budget": round(len(ids) / budget, 2),
        "distinct_pairs_null": round(float(np.mean(null_distinct)), 1),
        "persistent_pairs": int((counts >= PERSISTENT_SHARE * len(sets)).sum()),
        "persistence_histogram": _histogram(counts),
        "persistence_histogram_null": _histogram(null_counts),
        "top_pairs": top,
        "curves": {
            "steps": steps[1:].tolist(),
            "consecutive": np.round(consecutive, 5).tolist(),
            "consecutive_null": np.round(null_consecutive, 5).tolist(),
            "lag": st.lag_curve(sets, nulls),
        },
        "_sets": sets,  # for the absorption link; dropped before writing
    }


def _histogram(counts: np.ndarray) -> dict[str, int]:
    values, n = np.unique(counts, return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(values, n, strict=True)}


def heldout_batches(token_acts: torch.Tensor, batch_size: int, n_batches: int) -> list[torch.Tensor]:
    if len(token_acts) < batch_size:
        raise ValueError(f"held-out set has {len(token_acts)} tokens, fewer than one batch of {batch_size}")
    n = min(n_batches, len(token_acts) // batch_size)
    return [token_acts[b * batch_size : (b + 1) * batch_size].float() for b in range(n)]


def load_at(sae_dir: Path, weights: dict[str, torch.Tensor]) -> SAE:
    sae = SAE.load(sae_dir)
    with torch.no_grad():
        for key, value in weights.items():
            getattr(sae, key).copy_(value)
    return sae


def snapshot_sets(sae_dir: Path, batches: list[torch.Tensor], fraction: float) -> dict[int, list[np.ndarray]]:
    """step -> the selector's pair set on each held-out batch, for every snapshot of one run."""
    path = Path(sae_dir) / SNAPSHOTS
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: train with train.snapshots > 0")
    return {
        step: st.selected_sets(load_at(sae_dir, weights), batches, fraction)
        for step, weights in load_snapshots(path).items()
    }


def snapshot_stability(sets_by_step: dict[int, list[np.ndarray]], d_sae: int, sp: StabilityParams, rng) -> dict:
    """Jaccard between snapshots' selections on the same held-out batches, at snapshot lags, with nulls."""
    steps = list(sets_by_step)
    per_batch = list(zip(*sets_by_step.values(), strict=True))  # batch -> [set at each snapshot]
    lags = st.lags_for(len(steps), sp.lag_fractions)
    table = {}
    for name, lag in lags.items():
        obs = np.mean([st.lagged_jaccard(list(seq), lag).mean() for seq in per_batch])
        null = [
            np.mean([st.lagged_jaccard([st.repaired(s, d_sae, rng) for s in seq], lag).mean() for seq in per_batch])
            for _ in range(sp.null_draws)
        ]
        table[name] = {
            "lag_snapshots": lag,
            "lag_steps": steps[lag] - steps[0],
            "jaccard": round(float(obs), 5),
            "null": round(float(np.mean(null)), 5),
            "null_sd": round(float(np.std(null)), 5),
            "margin": round(float(obs - np.mean(null)), 5),
        }
    null_seq = [[st.repaired(s, d_sae, rng) for s in seq] for seq in per_batch]
    every = range(1, len(steps))
    curve = {
        "lag_steps": [steps[lag] - steps[0] for lag in every],
        "jaccard": [
            round(float(np.mean([st.lagged_jaccard(list(q), lag).mean() for q in per_batch])), 5) for lag in every
        ],
        "null": [round(float(np.mean([st.lagged_jaccard(q, lag).mean() for q in null_seq])), 5) for lag in every],
    }
    return {"snapshot_steps": steps, "jaccard_at_lag": table, "curve": curve}


def cross_seed(
    dirs: dict[int, Path],
    batches: list[torch.Tensor],
    cov: torch.Tensor,
    fraction: float,
    sp: StabilityParams,
    rng,
) -> dict:
    """Each extra seed matched to the first: matched cosine, shared fraction, mapped kept-pair overlap."""
    seeds = list(dirs)
    base = SAE.load(dirs[seeds[0]])
    base_sets = st.selected_sets(base, batches, fraction)
    d_sae = base.cfg.d_sae
    out = {"seeds": seeds, "pairs": []}
    for seed in seeds[1:]:
        other = SAE.load(dirs[seed])
        b_for_a, cos = matching.match_decoders(base.W_dec.detach(), other.W_dec.detach())
        nulls = {"rotation": [], "covariance": []}
        for _ in range(MATCH_NULL_DRAWS):
            w_rot = matching.rotation_null(other.W_dec.detach(), rng)
            nulls["rotation"].append(matching.match_decoders(base.W_dec.detach(), w_rot)[1])
            w_cov = matching.covariance_null(cov, d_sae, rng)
            nulls["covariance"].append(matching.match_decoders(base.W_dec.detach(), w_cov)[1])
        a_for_b = matching.inverse_matching(b_for_a)
        mapped = [
            st.pair_ids(a_for_b[s // d_sae], a_for_b[s % d_sae], d_sae)
            for s in st.selected_sets(other, batches, fraction)
        ]
        overlap = st.mean_pairwise_jaccard(base_sets, mapped)
        overlap_null = [
            st.mean_pairwise_jaccard(base_sets, [st.repaired(s, d_sae, rng) for s in mapped])
            for _ in range(sp.null_draws)
        ]
        entry = {"seed": seed, **matching.match_summary(cos, sp.cos_thresholds)}
        for name, draws in nulls.items():
            pooled = np.concatenate(draws)
            null = matching.match_summary(pooled, sp.cos_thresholds)
            entry[f"null_{name}"] = null
            entry[f"margin_{name}"] = {
                "mean_cos": round(entry["mean_cos"] - null["mean_cos"], 5),
                **{t: round(entry["shared"][t] - null["shared"][t], 5) for t in entry["shared"]},
            }
        entry["kept_pair_overlap"] = {
            "jaccard": round(overlap, 5),
            "null": round(float(np.mean(overlap_null)), 5),
            "margin": round(overlap - float(np.mean(overlap_null)), 5),
        }
        out["pairs"].append(entry)
    return out


def persistent_ids(sets: list[np.ndarray], top: int) -> np.ndarray:
    """Pairs kept in at least half of the sets, or the `top` most persistent if none is."""
    ids, counts = st.persistence(sets)
    keep = ids[counts >= PERSISTENT_SHARE * len(sets)]
    return keep if len(keep) else ids[np.argsort(-counts, kind="stable")[:top]]


def flagged_letter_latents(absorption_json: Path) -> set[int]:
    """Latents the first-letter evaluation flagged: each letter's main and split latents, every letter seed."""
    result = json.loads(Path(absorption_json).read_text())
    latents = set()
    for seed in result["per_seed"]:
        for letter in seed["per_letter"].values():
            if letter.get("main_latent") is not None:
                latents.add(int(letter["main_latent"]))
            latents.update(int(x) for x in letter.get("split_latents") or [])
    return latents


def link(sets: list[np.ndarray], flagged: set[int], d_sae: int, top: int, draws: int, rng) -> dict:
    """Do the persistent pairs involve flagged latents more than frequency-matched random pairs do?"""
    persistent = persistent_ids(sets, top)
    observed = st.involvement(persistent, flagged, d_sae)
    null = [
        st.involvement(st.frequency_matched_pairs(sets, len(persistent), d_sae, rng), flagged, d_sae)
        for _ in range(draws)
    ]
    return {
        "persistent_pairs": len(persistent),
        "flagged_latents": len(flagged),
        "involving_flagged": round(observed, 5),
        "null": round(float(np.mean(null)), 5),
        "null_sd": round(float(np.std(null)), 5),
        "margin": round(observed - float(np.mean(null)), 5),
    }


def synthetic_link(run_dir: Path, top: int, draws: int, rng) -> dict | None:
    """In one synthetic orthogonality run: the fraction of persistent pairs that are a true
    parent/child (or sibling) pair's latents, against frequency-matched random pairs."""
    pairs_file, matching_file = run_dir / "pairs.parquet", run_dir / "matching.json"
    if not (pairs_file.exists() and matching_file.exists()):
        return None
    m = json.loads(matching_file.read_text())
    d_sae = json.loads((run_dir / CONFIG_FILE).read_text())["d_sae"]
    _, sets = st.log_sets(pd.read_parquet(verified(pairs_file)), d_sae)
    parent_child = {(p, c) for p, c in zip(m["parent_latents"], m["child_latents"], strict=True) if p != c}
    by_parent: dict[int, list[int]] = {}
    for p, c in zip(m["parent_latents"], m["child_latents"], strict=True):
        by_parent.setdefault(p, []).append(c)
    siblings = {(a, b) for kids in by_parent.values() for a in kids for b in kids if a < b}
    persistent = persistent_ids(sets, top)
    out = {"persistent_pairs": len(persistent)}
    for name, edges in (("parent_child", parent_child), ("siblings", siblings)):
        observed = st.edge_fraction(persistent, edges, d_sae) if edges else float("nan")
        null = [
            st.edge_fraction(st.frequency_matched_pairs(sets, len(persistent), d_sae, rng), edges, d_sae)
            for _ in range(draws)
        ]
        out[name] = {"fraction": round(observed, 5), "null": round(float(np.mean(null)), 5)}
    return out
