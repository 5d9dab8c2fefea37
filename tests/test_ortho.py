"""Pair selection must equal a dense reference; the loss gradient must equal autograd's."""

import pytest
import torch

from sae_ortho.training.ortho import (
    TauSchedule,
    add_ortho_grad_,
    ortho_loss,
    ortho_terms,
    pair_budget,
    select_pairs,
    select_pairs_dense,
)


def random_codes(batch: int, d_sae: int, active: int, topk: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    pre = torch.randn(batch, d_sae, generator=gen)
    if topk:
        values, indices = torch.topk(pre, active, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values.relu()), indices
    threshold = torch.quantile(pre[0], 1 - active / d_sae)
    return torch.relu(pre - threshold), None


def as_set(sel):
    return {(int(i), int(j)) for i, j in zip(sel.i, sel.j, strict=True)}


@pytest.mark.parametrize("topk", [True, False])
@pytest.mark.parametrize(("batch", "d_sae", "active", "fraction"), [(64, 300, 12, 0.01), (256, 512, 8, 0.001)])
def test_sparse_selection_equals_dense_reference(topk, batch, d_sae, active, fraction):
    f, indices = random_codes(batch, d_sae, active, topk, seed=d_sae)
    sparse = select_pairs(f, fraction, indices).ranked()
    dense = select_pairs_dense(f, fraction)
    assert len(sparse) == len(dense) == pair_budget(d_sae, fraction)
    assert as_set(sparse) == as_set(dense)  # continuous random values: no ties
    assert bool((sparse.i < sparse.j).all()) and int(sparse.j.max()) < d_sae
    torch.testing.assert_close(sparse.score, dense.score, rtol=1e-5, atol=1e-6)
    # Scores really are feature co-activations sum_b f_bi f_bj (pairs of features, not tokens).
    expected = (f[:, sparse.i] * f[:, sparse.j]).sum(0)
    torch.testing.assert_close(sparse.score, expected, rtol=1e-5, atol=1e-6)


def test_budget_above_coactive_pairs_keeps_only_positive():
    f = torch.zeros(4, 50)
    f[0, [1, 2, 3]] = 1.0  # pairs (1,2) (1,3) (2,3)
    f[1, [3, 7]] = 2.0  # pair (3,7)
    sel = select_pairs(f, 0.5).ranked()  # budget 613 >> 4 co-active pairs
    assert as_set(sel) == {(1, 2), (1, 3), (2, 3), (3, 7)}
    assert sel.score[0] == 4.0 and as_set(select_pairs_dense(f, 0.5)) == as_set(sel)


def test_topk_indices_with_relu_zeros_are_not_pairs():
    pre = torch.tensor([[3.0, -1.0, 2.0, -2.0, 0.5]])
    values, indices = torch.topk(pre, 4, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, indices, values.relu())
    assert as_set(select_pairs(f, 1.0, indices)) == {(0, 2), (0, 4), (2, 4)}


def test_loss_and_gradient_match_autograd():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(40, 16, generator=gen)
    w /= w.norm(dim=1, keepdim=True)
    f, _ = random_codes(32, 40, 6, topk=False, seed=1)
    pairs = select_pairs(f, 0.05)
    w1 = w.clone().requires_grad_(True)
    loss, mean_abs = ortho_loss(w1, pairs)
    loss.backward()
    w2 = w.clone().requires_grad_(True)
    cos = (w2[pairs.i] * w2[pairs.j]).sum(-1)
    ref = (cos**2).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(w1.grad, w2.grad)
    torch.testing.assert_close(mean_abs, cos.abs().mean().detach())
    # The trainer's fast path: values without autograd, tau-weighted gradient added in place.
    value, mean_abs_fast, cos_fast = ortho_terms(w, pairs)
    assert value == pytest.approx(ref.item(), rel=1e-5) and mean_abs_fast == pytest.approx(mean_abs.item(), rel=1e-5)
    grad = torch.ones_like(w)
    add_ortho_grad_(grad, w, pairs.i, pairs.j, cos_fast, 0.5)
    torch.testing.assert_close(grad, 1 + 0.5 * w2.grad)


def test_tau_schedules():
    fixed = TauSchedule(0.05, "fixed")
    assert [fixed.update(c) for c in (0.9, 0.0)] == [0.05, 0.05]
    adaptive = TauSchedule(0.05, "adaptive", target=0.1, lr=0.1)
    up = adaptive.update(0.3)
    assert up == pytest.approx(0.07)
    assert adaptive.update(0.0) == pytest.approx(0.06)
    for _ in range(100):
        adaptive.update(0.0)
    assert adaptive.tau == 0.0  # clipped at zero


@pytest.mark.parametrize("threads", [1, 2])
def test_selection_with_heavy_tailed_codes_matches_dense(threads):
    """A few tokens firing hundreds of latents (as ReLU codes do) among sparse ones: the row
    bounds and running floors of the kernel must not drop a true top pair, with any thread count."""
    import numba

    gen = torch.Generator().manual_seed(7)
    batch, d_sae = 256, 1024
    pre = torch.randn(batch, d_sae, generator=gen)
    light = torch.quantile(pre, 1 - 8 / d_sae, dim=1, keepdim=True)
    heavy = torch.quantile(pre, 1 - 400 / d_sae, dim=1, keepdim=True)
    threshold = torch.where(torch.arange(batch)[:, None] % 64 == 0, heavy, light)
    f = torch.relu(pre - threshold) * torch.rand(batch, 1, generator=gen) * 3
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        sparse = select_pairs(f, 0.001).ranked()
    finally:
        numba.set_num_threads(previous)
    dense = select_pairs_dense(f, 0.001)
    assert len(sparse) == pair_budget(d_sae, 0.001)
    assert as_set(sparse) == as_set(dense)
    torch.testing.assert_close(sparse.score, dense.score, rtol=1e-5, atol=1e-6)
    assert bool((sparse.score[:-1] >= sparse.score[1:]).all())  # sorted, best first
