"""Decoder penalties behind the trainer's one interface: value and in-place gradient agree with autograd."""

import pytest
import torch

from sae_ortho.ortho import codes_to_csr, ortho_loss, pair_budget
from sae_ortho.penalties import RandomPairs, TopKCoactivation
from sae_ortho.sparse_ops import ActiveCodes


def csr_codes(f: torch.Tensor) -> ActiveCodes:
    m = codes_to_csr(f)
    offsets = torch.from_numpy(m.indptr)
    rows = torch.repeat_interleave(torch.arange(f.shape[0]), offsets.diff())
    return ActiveCodes(rows, torch.from_numpy(m.indices.astype("int64")), offsets, torch.from_numpy(m.data))


@pytest.mark.parametrize("penalty", [TopKCoactivation(0.01), RandomPairs(0.01, seed=3)])
def test_penalty_gradient_matches_autograd(penalty):
    gen = torch.Generator().manual_seed(0)
    d_sae, d_in = 96, 16
    w = torch.randn(d_sae, d_in, generator=gen)
    w /= w.norm(dim=1, keepdim=True)
    f = torch.relu(torch.randn(64, d_sae, generator=gen) - 1.0)
    terms = penalty.terms(w, csr_codes(f), d_sae)
    assert len(terms.pairs) == pair_budget(d_sae, 0.01)
    ids = terms.pairs.i * d_sae + terms.pairs.j
    assert (terms.pairs.i < terms.pairs.j).all() and len(ids.unique()) == len(ids)
    w_auto = w.clone().requires_grad_(True)
    loss, _ = ortho_loss(w_auto, terms.pairs)
    (0.7 * loss).backward()
    assert terms.value == pytest.approx(loss.item(), rel=1e-5)
    grad = torch.zeros_like(w)
    penalty.add_grad_(grad, w, terms, 0.7)
    torch.testing.assert_close(grad, w_auto.grad, atol=1e-6, rtol=1e-5)
    rows = penalty.log_rows(w, terms, step=4)
    assert len(rows["i"]) == len(terms.pairs) and (rows["step"] == 4).all()


def test_random_pairs_differ_between_batches():
    penalty = RandomPairs(0.02, seed=0)
    w = torch.nn.functional.normalize(torch.randn(64, 8), dim=1)
    f = torch.relu(torch.randn(32, 64))
    a, b = penalty.terms(w, csr_codes(f), 64), penalty.terms(w, csr_codes(f), 64)
    assert not torch.equal(a.pairs.i * 64 + a.pairs.j, b.pairs.i * 64 + b.pairs.j)
