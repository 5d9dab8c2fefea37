"""Stability analysis: known answers for the pair-set and matching figures, and their nulls."""

import numpy as np
import pandas as pd
import pytest
import torch

from sae_ortho.analysis import matching
from sae_ortho.analysis import stability as st
from sae_ortho.analysis import stability_analysis as sa
from sae_ortho.base.params import StabilityParams
from sae_ortho.evaluation.core import unit_rows

D = 64


def log_of(sets_of_pairs: list[list[tuple[int, int]]]) -> pd.DataFrame:
    rows = [
        {"step": 10 * t, "i": i, "j": j, "score": 1.0, "cos": 0.1}
        for t, pairs in enumerate(sets_of_pairs)
        for i, j in pairs
    ]
    return pd.DataFrame(rows)


def random_pairs(rng, n=20) -> list[tuple[int, int]]:
    ids = rng.choice(D * (D - 1) // 2, n, replace=False)
    iu = np.triu_indices(D, 1)
    return list(zip(iu[0][ids].tolist(), iu[1][ids].tolist(), strict=True))


def test_identical_logs_give_jaccard_one_and_disjoint_logs_zero():
    rng = np.random.default_rng(0)
    pairs = random_pairs(rng)
    _, same = st.log_sets(log_of([pairs] * 6), D)
    assert st.lagged_jaccard(same, 1).tolist() == [1.0] * 5
    first, second = pairs[:10], pairs[10:]
    _, alternating = st.log_sets(log_of([first, second] * 3), D)
    assert st.lagged_jaccard(alternating, 1).tolist() == [0.0] * 5
    assert st.lagged_jaccard(alternating, 2).tolist() == [1.0] * 4
    assert st.jaccard(np.array([1, 2, 3]), np.array([2, 3, 4])) == pytest.approx(0.5)


def test_null_keeps_each_latents_pair_count():
    rng = np.random.default_rng(1)
    ids = st.pair_ids(*np.array(random_pairs(rng, 200)).T, D)
    null = st.repaired(ids, D, rng)
    degree = np.bincount(np.concatenate([ids // D, ids % D]), minlength=D)
    null_degree = np.bincount(np.concatenate([null // D, null % D]), minlength=D)
    dropped = len(ids) - len(null)  # self-pairs and repeats
    assert dropped < 0.1 * len(ids)
    assert np.abs(degree - null_degree).sum() <= 2 * dropped
    assert st.jaccard(ids, null) < 0.5


def test_within_run_on_a_stable_log_beats_its_null():
    rng = np.random.default_rng(2)
    pairs = random_pairs(rng, 30)
    w = unit_rows(torch.randn(D, 16))
    res = sa.within_run(log_of([pairs] * 12), w, 0.015, StabilityParams(null_draws=5, top_pairs=5), rng)
    assert res["jaccard_at_lag"]["1"]["jaccard"] == 1.0 and res["jaccard_at_lag"]["1"]["margin"] > 0.5
    assert res["distinct_pairs"] == 30 and res["persistent_pairs"] == 30
    assert res["persistence_histogram"] == {"12": 30}
    top = res["top_pairs"][0]
    assert top["logs"] == 12 and top["first_step"] == 0
    assert top["cos_final"] == pytest.approx(float(w[top["i"]] @ w[top["j"]]), abs=1e-4)


def test_permuted_sae_matches_fully_and_null_matches_at_the_nulls_level():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(256, 32, generator=gen)
    perm = torch.randperm(256, generator=gen)
    b_for_a, cos = matching.match_decoders(w, w[perm])
    assert (cos > 0.99).all()
    assert (perm[b_for_a] == torch.arange(256)).all()
    rng = np.random.default_rng(0)
    # An SAE against its own null: the rotated decoder matches at the level of another null draw.
    against_null = matching.match_decoders(w, matching.rotation_null(w, rng))[1].mean()
    null_level = matching.match_decoders(w, matching.rotation_null(w, rng))[1].mean()
    assert against_null == pytest.approx(null_level, abs=0.03)
    assert against_null < 0.6
    summary = matching.match_summary(cos, (0.7, 0.99))
    assert summary["shared"] == {"0.7": 1.0, "0.99": 1.0}


def test_covariance_null_follows_the_data():
    rng = np.random.default_rng(0)
    axis = torch.zeros(8)
    axis[0] = 1.0
    cov = torch.eye(8) * 0.01 + 100 * torch.outer(axis, axis)
    rows = unit_rows(matching.covariance_null(cov, 500, rng))
    assert rows[:, 0].abs().mean() > 0.9


def test_link_finds_planted_persistent_pairs_on_flagged_latents():
    rng = np.random.default_rng(3)
    flagged = {1, 2, 3, 4}
    planted = [(1, 2), (3, 4)]
    sets = [st.pair_ids(*np.array(planted + random_pairs(rng, 20)).T, D) for _ in range(10)]
    res = sa.link(sets, flagged, D, top=5, draws=20, rng=rng)
    assert res["persistent_pairs"] == 2 and res["involving_flagged"] == 1.0
    assert res["margin"] > 0.5
    unflagged = sa.link(sets, {60, 61}, D, top=5, draws=20, rng=rng)
    assert unflagged["involving_flagged"] == 0.0


def test_snapshot_stability_is_one_for_identical_snapshots(tmp_path):
    from sae_ortho.training.sae import SAE, SAEConfig
    from sae_ortho.training.snapshots import SNAPSHOTS, collect_snapshots, save_snapshot

    sae = SAE(SAEConfig(d_in=16, d_sae=D, k=4))
    sae.save(tmp_path / "sae")
    for step in (5, 10, 15):
        save_snapshot(sae, tmp_path / "snaps", step)
    collect_snapshots(tmp_path / "snaps", tmp_path / "sae" / SNAPSHOTS, {5, 10, 15})
    batches = [torch.randn(128, 16) for _ in range(2)]
    sets = sa.snapshot_sets(tmp_path / "sae", batches, 0.01)
    assert list(sets) == [5, 10, 15] and all(len(s) == 2 for s in sets.values())
    res = sa.snapshot_stability(sets, D, StabilityParams(null_draws=3, lag_fractions=(0.5,)), np.random.default_rng(0))
    assert all(row["jaccard"] == 1.0 and row["margin"] > 0 for row in res["jaccard_at_lag"].values())
