"""The torch pair selector, pair dots and pair gradient against the numba kernels and the dense reference."""

import pytest
import torch

from sae_ortho.training import pairs_torch
from sae_ortho.training.ortho import (
    add_ortho_grad_,
    codes_to_csr,
    pair_budget,
    pair_cosines,
    select_pairs,
    select_pairs_dense,
)
from tests.test_ortho import as_set, random_codes


def torch_select(f: torch.Tensor, fraction: float, indices=None, chunk_pairs: int = 1 << 22):
    codes = codes_to_csr(f, indices)
    return pairs_torch.top_coactive_pairs(
        torch.from_numpy(codes.indptr),
        torch.from_numpy(codes.indices.astype("int64")),
        torch.from_numpy(codes.data),
        f.shape[1],
        pair_budget(f.shape[1], fraction),
        chunk_pairs,
    )


def heavy_tailed_codes(batch=256, d_sae=1024, seed=7):
    gen = torch.Generator().manual_seed(seed)
    pre = torch.randn(batch, d_sae, generator=gen)
    light = torch.quantile(pre, 1 - 8 / d_sae, dim=1, keepdim=True)
    heavy = torch.quantile(pre, 1 - 400 / d_sae, dim=1, keepdim=True)
    threshold = torch.where(torch.arange(batch)[:, None] % 64 == 0, heavy, light)
    return torch.relu(pre - threshold) * torch.rand(batch, 1, generator=gen) * 3


CASES = [(True, 64, 300, 12, 0.01), (False, 64, 300, 12, 0.01), (True, 256, 512, 8, 0.001), (False, 256, 512, 8, 0.001)]


@pytest.mark.parametrize("chunk_pairs", [1 << 22, 500])
@pytest.mark.parametrize(("topk", "batch", "d_sae", "active", "fraction"), CASES)
def test_torch_selection_equals_numba_and_dense(topk, batch, d_sae, active, fraction, chunk_pairs):
    f, indices = random_codes(batch, d_sae, active, topk, seed=d_sae)
    i, j, score = torch_select(f, fraction, indices, chunk_pairs)
    numba_sel = select_pairs(f, fraction, indices).ranked()
    dense = select_pairs_dense(f, fraction)
    assert len(i) == len(numba_sel) == len(dense) == pair_budget(d_sae, fraction)
    pairs = {(int(a), int(b)) for a, b in zip(i, j, strict=True)}
    assert pairs == as_set(numba_sel) == as_set(dense)
    assert torch.equal(i, numba_sel.i) and torch.equal(j, numba_sel.j)  # same ranking, ties by (i, j)
    torch.testing.assert_close(score.float(), dense.score, rtol=1e-6, atol=1e-7)
    assert bool((score[:-1] >= score[1:]).all()) and bool((i < j).all())


@pytest.mark.parametrize("threads", [1, 2])
def test_torch_selection_heavy_tailed_codes(threads):
    f = heavy_tailed_codes()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        i, j, score = torch_select(f, 0.001, chunk_pairs=4096)
    finally:
        torch.set_num_threads(previous)
    dense = select_pairs_dense(f, 0.001)
    assert {(int(a), int(b)) for a, b in zip(i, j, strict=True)} == as_set(dense)
    torch.testing.assert_close(score.float(), dense.score, rtol=1e-5, atol=1e-6)


def test_ties_at_the_kth_score_keep_the_smallest_pairs():
    """Every pair of a token co-fires with the same score: the budget keeps the first pairs by (i, j)."""
    f = torch.zeros(2, 20)
    f[0, [3, 5, 9, 14]] = 1.0  # 6 pairs of score 1
    f[1, [0, 19]] = 2.0  # one pair of score 4
    i, j, score = torch_select(f, 4 / 190)  # budget 4
    assert list(zip(i.tolist(), j.tolist(), strict=True)) == [(0, 19), (3, 5), (3, 9), (3, 14)]
    assert score.tolist() == [4.0, 1.0, 1.0, 1.0]


def test_no_coactive_pairs_gives_an_empty_selection():
    f = torch.zeros(3, 10)
    f[0, 2] = f[1, 4] = 1.0
    i, j, score = torch_select(f, 0.5)
    assert i.numel() == j.numel() == score.numel() == 0


def test_pair_dots_and_gradient_equal_the_kernels():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(300, 64, generator=gen)
    w /= w.norm(dim=1, keepdim=True)
    f, indices = random_codes(64, 300, 12, True, seed=300)
    sel = select_pairs(f, 0.01, indices)
    cos_numba = pair_cosines(w, sel.i, sel.j)
    cos_torch = pairs_torch.pair_dots(w, sel.i, sel.j, chunk=100)
    torch.testing.assert_close(cos_torch, cos_numba, rtol=0, atol=1e-6)
    grad_numba, grad_torch = torch.ones_like(w), torch.ones_like(w)
    add_ortho_grad_(grad_numba, w, sel.i, sel.j, cos_numba, 0.5)
    coef = (0.5 * 2.0 / len(cos_torch)) * cos_torch
    pairs_torch.add_pair_grad_(grad_torch, w, sel.i, sel.j, coef, chunk=100)
    torch.testing.assert_close(grad_torch, grad_numba, rtol=0, atol=1e-6)
    assert not torch.equal(grad_torch, torch.ones_like(w))  # the gradient really moved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this project's machines)")
def test_cuda_selection_equals_cpu():
    f = heavy_tailed_codes()
    codes = codes_to_csr(f)
    args = [
        torch.from_numpy(codes.indptr),
        torch.from_numpy(codes.indices.astype("int64")),
        torch.from_numpy(codes.data),
    ]
    budget = pair_budget(f.shape[1], 0.001)
    cpu = pairs_torch.top_coactive_pairs(*args, f.shape[1], budget, 4096)
    gpu = pairs_torch.top_coactive_pairs(*[a.cuda() for a in args], f.shape[1], budget, 4096)
    for a, b in zip(cpu, gpu, strict=True):
        assert torch.equal(a, b.cpu())


def dense_ranked(f: torch.Tensor, fraction: float) -> list[tuple[int, int]]:
    """The dense reference under the shared tie order: score descending, then i, then j."""
    import numpy as np

    d_sae = f.shape[1]
    coact = (f.double().T @ f.double()).numpy()
    i, j = np.triu_indices(d_sae, k=1)
    s = coact[i, j]
    keep = s > 0
    i, j, s = i[keep], j[keep], s[keep]
    order = np.lexsort((j, i, -s))[: pair_budget(d_sae, fraction)]
    return list(zip(i[order].tolist(), j[order].tolist(), strict=True))


@pytest.mark.parametrize("threads", [1, 2])
def test_ties_are_broken_by_pair_index_in_both_selectors(threads):
    """Integer codes make many scores equal at the K-th place: numba (any thread count), torch and the dense
    reference keep the same pairs in the same order."""
    import numba

    gen = torch.Generator().manual_seed(11)
    f, _ = random_codes(128, 400, 6, True, seed=5)
    f = (f > 0).float() * torch.randint(1, 3, f.shape, generator=gen).float()  # values 1 or 2: ties everywhere
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        numba_sel = select_pairs(f, 0.001).ranked()
    finally:
        numba.set_num_threads(previous)
    i, j, _ = torch_select(f, 0.001, chunk_pairs=3000)
    expected = dense_ranked(f, 0.001)
    assert list(zip(numba_sel.i.tolist(), numba_sel.j.tolist(), strict=True)) == expected
    assert list(zip(i.tolist(), j.tolist(), strict=True)) == expected
