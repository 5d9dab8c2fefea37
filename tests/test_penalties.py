"""Decoder penalties behind the trainer's one interface: value and in-place gradient agree with autograd."""

import pytest
import torch

from sae_ortho.training.ortho import TauSchedule, codes_to_csr, ortho_loss, pair_budget
from sae_ortho.training.penalties import OrtSAEChunks, RandomPairs, TopKCoactivation
from sae_ortho.training.sparse_ops import ActiveCodes


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


@pytest.mark.parametrize("make", [lambda: RandomPairs(0.02, seed=5), lambda: OrtSAEChunks(16, seed=5)])
def test_seeded_penalty_state_round_trips(make):
    """A checkpoint's penalty state makes a fresh penalty draw what the original draws next."""
    w = torch.nn.functional.normalize(torch.randn(64, 8), dim=1)
    codes = csr_codes(torch.relu(torch.randn(32, 64)))
    original, restored = make(), make()
    original.terms(w, codes, 64)
    restored.load_state_dict(original.state_dict())
    a, b = original.terms(w, codes, 64), restored.terms(w, codes, 64)
    assert torch.equal(a.pairs.i, b.pairs.i) and torch.equal(a.pairs.j, b.pairs.j)
    assert not torch.equal(a.pairs.i, make().terms(w, codes, 64).pairs.i)  # not just the seed's first draw


def test_ortsae_matches_dense_max_cosine_and_autograd():
    """One chunk covering every latent: the value is mean_i max_{j != i} cos_ij^2 of the dense Gram
    matrix, and the in-place gradient is autograd's (argmax held fixed)."""
    gen = torch.Generator().manual_seed(1)
    d_sae, d_in = 40, 8
    w = torch.nn.functional.normalize(torch.randn(d_sae, d_in, generator=gen), dim=1)
    w[7] = torch.nn.functional.normalize(w[3] + 0.05 * torch.randn(d_in, generator=gen), dim=0)  # a near-duplicate
    penalty = OrtSAEChunks(chunk_size=d_sae, seed=0)
    terms = penalty.terms(w, None, d_sae)
    gram = w @ w.T - torch.eye(d_sae)
    dense_value = (gram**2).max(1).values.mean().item()
    assert terms.value == pytest.approx(dense_value, rel=1e-5)
    partner = dict(zip(terms.pairs.i.tolist(), terms.pairs.j.tolist(), strict=True))
    assert partner[3] == 7 and partner[7] == 3 and len(partner) == d_sae
    w_auto = w.clone().requires_grad_(True)
    g = w_auto @ w_auto.T
    (0.3 * (g[terms.pairs.i, terms.pairs.j] ** 2).mean()).backward()
    grad = torch.zeros_like(w)
    penalty.add_grad_(grad, w, terms, 0.3)
    torch.testing.assert_close(grad, w_auto.grad, atol=1e-6, rtol=1e-5)


def test_ortsae_chunks_partition_the_latents():
    w = torch.nn.functional.normalize(torch.randn(100, 8), dim=1)
    terms = OrtSAEChunks(chunk_size=32, seed=0).terms(w, None, 100)
    assert sorted(terms.pairs.i.tolist()) == list(range(100))  # every latent once (chunks 32+32+32+4)
    assert (terms.pairs.i != terms.pairs.j).all()


def test_decay_schedule_is_multiplicative():
    schedule = TauSchedule(0.1, "decay", decay=0.99)
    for _ in range(10):
        schedule.update(0.5)
    assert schedule.tau == pytest.approx(0.1 * 0.99**10)
