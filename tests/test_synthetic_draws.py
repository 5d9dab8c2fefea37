"""Synthetic samples drawn once and replayed (sae_ortho/evaluation/synthetic_draws.py): bit-identical to
drawing live, the stream continuing live past the stored part, corruption caught, SAELens's evaluation
on the replayed draw equal to its own draw."""

from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
import torch

from sae_ortho.evaluation import synthetic as syn
from sae_ortho.evaluation import synthetic_arms as arms
from sae_ortho.evaluation import synthetic_draws as draws
from sae_ortho.training.sae import SAE, SAEConfig
from tests.test_synthetic import FLAT, TINY


@pytest.fixture(scope="module")
def model():
    with arms.single_thread():
        return syn.build_model(TINY, FLAT)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_ORTHO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "synthetic_draws"


def test_replayed_stream_is_the_live_stream_and_continues_past_the_stored_part(model, cache):
    live = syn.SyntheticSource.create(model)
    stored = syn.SyntheticSource(model, live.norm_mean, live.fingerprint, cached_batches=5)
    expected = list(islice(live.stream(64, 3), 8))
    for _ in range(2):  # the first pass draws and stores, the second replays from disk
        got = list(islice(stored.stream(64, 3), 8))
        assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    assert len(list(cache.glob("*.npz"))) == 1
    other_seed = next(stored.stream(64, 4))
    assert not torch.equal(other_seed, expected[0])


def test_replayed_batches_carry_gradients(model, cache):
    """A batch built under no_grad inside the generator must not leave grad mode off for the caller."""
    source = syn.SyntheticSource(model, 1.0, syn.model_fingerprint(model), cached_batches=2)
    next(source.stream(16, 0))
    assert torch.is_grad_enabled()


def test_a_corrupt_stored_draw_is_an_error_naming_the_file(model, cache):
    source = syn.SyntheticSource(model, 1.0, syn.model_fingerprint(model), cached_batches=2)
    next(source.stream(16, 0))
    path = next(cache.glob("*.npz"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=f"{path.name}: checksum mismatch"):
        next(source.stream(16, 0))


def test_csr_round_trip():
    acts = [torch.tensor([[0.0, 1.5, 0.0], [0.0, 0.0, 0.0]]), torch.tensor([[2.0, 0.0, 3.0]])]
    csr = draws.to_csr(acts)
    assert torch.equal(draws.from_csr(csr, 0, 3, 3), torch.cat(acts))
    assert torch.equal(draws.from_csr(csr, 1, 3, 3), torch.cat(acts)[1:])


def test_saelens_evaluation_on_the_replayed_draw_equals_its_own_draw(model):
    """The replay must hand SAELens exactly the samples it would have drawn under the same seed."""
    from sae_lens.synthetic import eval_sae_on_synthetic_data

    sae = SAE(SAEConfig(d_in=TINY.hidden_dim, d_sae=24, k=4), seed=0).to_saelens()
    with syn.IsolatedRng(7).active():
        own = eval_sae_on_synthetic_data(sae, model.feature_dict, model.activation_generator, 3000, batch_size=1024)
    _, acts = draws.eval_draw(model, syn.model_fingerprint(model), syn.IsolatedRng, 7, 3000, 1024)
    replay = draws.ReplayedActivations(acts)
    replayed = eval_sae_on_synthetic_data(sae, model.feature_dict, replay, 3000, batch_size=1024)
    assert own.mcc == replayed.mcc and own.explained_variance == replayed.explained_variance
    assert np.isclose(own.sae_l0, replayed.sae_l0) and own.true_l0 == replayed.true_l0
