"""Held-out set and core metrics: disjoint from training, exact CE anchors, SAELens as reference."""

import math

import numpy as np
import pytest
import torch

from sae_ortho.base.params import CoreParams, ExtractParams, HeldoutParams, Params, TrainParams
from sae_ortho.data.extract import extract
from sae_ortho.data.shards import ActivationShards
from sae_ortho.evaluation.core import core_metrics, decoder_geometry_all_pairs, science_failures
from sae_ortho.evaluation.heldout import HeldoutSet, build_heldout, spliced_losses
from sae_ortho.training.run_config import RunConfig
from sae_ortho.training.sae import SAE
from sae_ortho.training.train import train
from tests.conftest import write_small_corpus

CP = CoreParams(pair_batch_size=128, pair_fraction=0.01)


@pytest.fixture(scope="module")
def setup(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("core")
    write_small_corpus(root / "corpus.parquet", n_docs=200)
    p = Params(
        extract=ExtractParams(context_len=32, n_tokens=3000, shard_tokens=620, batch_size=8),
        heldout=HeldoutParams(n_tokens=310, batch_size=4),
    )
    extract(p, model, root / "corpus.parquet", root / "acts", root / "acts.partial", progress_bar=False)
    shards = ActivationShards(root / "acts")
    build_heldout(model, p, root / "corpus.parquet", shards, root / "heldout", progress_bar=False)
    tp = TrainParams(d_sae=256, k=8, lr=3e-3, batch_size=128, train_tokens=128 * 30, warmup_steps=3, aux_k=32)
    train(RunConfig(tp, seed=0), shards, root / "sae", root / ".ckpt", p.model, p.hook_name, progress_bar=False)
    return p, shards, HeldoutSet.load(root / "heldout"), SAE.load(root / "sae")


class Identity:
    """An "SAE" whose reconstruction is its input."""

    def __init__(self, d: int):
        self.W_dec = torch.eye(d)

    def encode(self, x):
        return x

    def decode(self, f):
        return f


class Zeros(Identity):
    def encode(self, x):
        return torch.zeros_like(x)


def test_heldout_documents_come_after_the_training_stream(setup):
    _, shards, hs, _ = setup
    train_docs = np.concatenate([shards.index(i).column("doc_id").to_numpy() for i in range(len(shards))])
    split = hs.manifest["doc_split"]
    assert split["training_stream_docs"][1] == train_docs.max()
    assert split["heldout_docs"][0] > train_docs.max()
    assert hs.token_acts().shape == (310, 576)
    assert (hs.tokens[:, 0] == hs.tokens[0, 0]).all()  # BOS at position 0 of every context


def test_ce_recovered_is_exactly_one_for_identity_and_zero_for_zeros(model, setup):
    _, _, hs, _ = setup
    ident = core_metrics(Identity(576), model, hs, CP, progress_bar=False)
    assert ident["ce_recovered_vs_zero"] == 1.0 and ident["ce_recovered_vs_mean"] == 1.0
    assert ident["kl_with_sae"] == 0.0 and ident["fvu"] == 0.0
    assert ident["ce_clean"] == ident["ce_clean_cached"]  # llm_cache's clean run == this stage's
    assert ident["ce_recovered_vs_zero_all_positions"] == 1.0
    zeros = core_metrics(Zeros(576), model, hs, CP, progress_bar=False)
    assert zeros["ce_recovered_vs_zero"] == 0.0
    # SAELens's zero-ablation also zeroes BOS: another reference, so a zero SAE no longer reads exactly 0
    assert zeros["ce_zero_ablation_all_positions"] != zeros["ce_zero_ablation"]
    recovered_all = zeros["ce_recovered_vs_zero_all_positions"]
    assert math.isfinite(recovered_all) and recovered_all != 0
    assert zeros["kl_with_sae"] == pytest.approx(zeros["kl_zero_ablation"], abs=1e-6)
    assert zeros["ce_zero_ablation"] > zeros["ce_clean"] + 0.5  # zero-ablating a mid layer must hurt
    assert any("FVU" in f for f in science_failures(zeros))


def test_spliced_ce_and_kl_match_saelens_get_recons_loss(model, setup):
    from sae_lens.evals import get_recons_loss
    from sae_lens.training.activation_scaler import ActivationScaler

    p, _, hs, sae = setup
    export = sae.to_saelens()
    ours = spliced_losses(model, hs, {"clean": None, "sae": lambda a: sae(a)}, 4, progress_bar=False)
    ref = get_recons_loss(
        export,
        model,
        ActivationScaler(),
        hs.tokens,
        compute_kl=True,
        compute_ce_loss=True,
        ignore_tokens=[model.tokenizer.bos_token_id],
        hook_name=p.hook_name,
    )
    # SAELens: CE per token [B, T-1] (position 0 = BOS predicting token 1), KL per position [B, T].
    torch.testing.assert_close(ours["sae"]["ce"], ref["ce_loss_with_sae"][:, 1:], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(ours["clean"]["ce"], ref["ce_loss_without_sae"][:, 1:], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(ours["sae"]["kl"], ref["kl_div_with_sae"][:, 1:-1], atol=2e-4, rtol=1e-3)
    # SAELens zero-ablates every position, BOS included; ours keeps BOS, so these differ by design, and
    # the reference cached in SAELens's convention equals SAELens's own.
    assert not torch.allclose(hs.refs["ce_zero"], ref["ce_loss_with_ablation"][:, 1:], atol=1e-3)
    torch.testing.assert_close(hs.refs["ce_zero_all"], ref["ce_loss_with_ablation"][:, 1:], atol=2e-4, rtol=1e-4)


def test_saelens_export_gives_the_same_core_metrics(model, setup):
    _, _, hs, sae = setup
    ours = core_metrics(sae, model, hs, CP, progress_bar=False)
    export = core_metrics(sae.to_saelens(), model, hs, CP, progress_bar=False)
    assert float(sae.to_saelens().W_dec.detach().norm(dim=1).mean()) == pytest.approx(1 / sae.cfg.input_scale, rel=1e-5)
    for key in ("l0", "fvu", "fvu_outside_tail", "cosine", "ce_with_sae", "kl_with_sae", "dead_fraction"):
        assert export[key] == pytest.approx(ours[key], rel=1e-4, abs=1e-5), key
    for part in ("decoder_all_pairs", "decoder_kept_pairs"):
        for key, value in ours[part].items():
            assert export[part][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (part, key)
    # A real (if tiny) SAE: better than the mean, better than zero-ablation, no NaN.
    assert 0 < ours["fvu"] < 1 and 0 < ours["ce_recovered_vs_zero"] <= 1
    assert ours["l0"] == pytest.approx(8, abs=0.5)
    assert science_failures(ours) == []


def test_kl_on_the_first_contexts_keeps_ce_on_all(model, setup):
    """One LM pass beyond the KL contexts: CE with the SAE and CE recovered equal the two-pass figures."""
    _, _, hs, sae = setup
    full = core_metrics(sae, model, hs, CP, progress_bar=False)
    part = core_metrics(sae, model, hs, CP, progress_bar=False, kl_contexts=4)
    for key in ("ce_with_sae", "ce_clean", "ce_recovered_vs_zero", "ce_recovered_vs_zero_all_positions", "fvu"):
        assert part[key] == pytest.approx(full[key], rel=1e-5, abs=1e-6), key
    assert part["kl_tokens"] < full["kl_tokens"] and part["kl_with_sae"] > 0


def test_science_failures_catch_broken_figures():
    good = {"fvu": 0.1, "l0": 32, "ce_with_sae": 3.0, "ce_recovered_vs_zero": 0.9, "kl_with_sae": 0.1}
    assert science_failures({**good, "dead_fraction": 0.0}) == []
    assert science_failures({**good, "fvu": 1.2, "dead_fraction": 0.0})
    assert science_failures({**good, "ce_recovered_vs_zero": -0.1, "dead_fraction": 0.0})
    assert science_failures({**good, "fvu": float("nan"), "dead_fraction": 0.0})
    assert science_failures({**good, "dead_fraction": 1.0})


def test_decoder_geometry_against_a_dense_reference():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(300, 16, generator=gen) * torch.rand(300, 1, generator=gen)  # unequal norms: must normalise
    w[7] = -3 * w[3]  # an exact antiparallel duplicate: |cos| = 1
    geo = decoder_geometry_all_pairs(w, block=64)
    u = w / w.norm(dim=1, keepdim=True)
    iu = torch.triu_indices(300, 300, offset=1)
    ref = (u @ u.T)[iu[0], iu[1]].abs()
    assert geo["n"] == ref.numel()
    assert geo["mean_abs_cos"] == pytest.approx(float(ref.double().mean()), rel=1e-5)
    assert geo["max_abs_cos"] == pytest.approx(1.0, abs=1e-5)
    assert geo["frac_above_0.5"] == pytest.approx(float((ref > 0.5).double().mean()))


def test_high_norm_tail_is_split_out(setup):
    _, _, hs, sae = setup
    from sae_ortho.evaluation.core import reconstruction_metrics

    x = hs.token_acts()
    with torch.no_grad():
        x_hat = sae(x)
    m = reconstruction_metrics(x, x_hat, 5.0)
    norms = x.norm(dim=-1)
    tail = norms > 5 * norms.median()
    assert m["tail_token_fraction"] == pytest.approx(float(tail.float().mean()))
    wide = reconstruction_metrics(x, x_hat, 1e9)  # no tail: both FVUs coincide
    assert wide["fvu_outside_tail"] == pytest.approx(wide["fvu"])
