"""Training: science checks on real activations, tau = 0 == baseline, determinism, resume, NaN, SAELens."""

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sae_ortho.base.params import ExtractParams, OrthoParams, ParamError, Params, TrainParams, load
from sae_ortho.data.extract import extract
from sae_ortho.data.shards import ActivationShards
from sae_ortho.training.checkpoint import load_checkpoint, save_checkpoint, trainer_state
from sae_ortho.training.run_config import RunConfig
from sae_ortho.training.sae import SAE
from sae_ortho.training.sparse_ops import dense_pre_acts
from sae_ortho.training.step_log import NonFiniteLoss
from sae_ortho.training.train import train
from sae_ortho.training.trainer import Trainer
from tests.conftest import stage_env, write_small_corpus

TINY = TrainParams(
    d_sae=256,
    k=8,
    lr=3e-3,
    batch_size=128,
    train_tokens=128 * 40,
    warmup_steps=5,
    log_every=2,
    checkpoint_every=10,
    dead_tokens=2000,
    aux_k=32,
)


@pytest.fixture(scope="module")
def shards(model, tmp_path_factory) -> ActivationShards:
    root = tmp_path_factory.mktemp("acts")
    write_small_corpus(root / "corpus.parquet", n_docs=200)
    p = Params(extract=ExtractParams(context_len=64, n_tokens=6000, shard_tokens=1260, batch_size=8))
    extract(p, model, root / "corpus.parquet", root / "acts", root / "acts.partial", progress_bar=False)
    return ActivationShards(root / "acts")


def run(cfg, shards, tmp_path, name="sae", **kw):
    metrics = train(cfg, shards, tmp_path / name, tmp_path / f".ckpt_{name}", progress_bar=False, **kw)
    return metrics, (SAE.load(tmp_path / name) if (tmp_path / name).exists() else None)


def same_weights(a: SAE, b: SAE) -> bool:
    return all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


@pytest.mark.parametrize("architecture", ["topk", "relu", "batchtopk"])
def test_trained_sae_reconstructs_sparsely(shards, tmp_path, architecture):
    cfg = RunConfig(replace(TINY, architecture=architecture, l1_coeff=1.0), seed=0, tau=0.1)
    metrics, sae = run(cfg, shards, tmp_path)
    assert 0 < metrics["fvu"] < 0.6, metrics
    assert metrics["dead_fraction"] < 0.5
    if architecture in ("topk", "batchtopk"):  # batchtopk: k per token on average over the batch
        assert metrics["l0"] == pytest.approx(8, abs=0.5)
    else:
        assert 1 < metrics["l0"] < 256 * 0.5
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(256), atol=1e-5, rtol=0)
    pairs = __import__("pandas").read_parquet(tmp_path / "sae" / "pairs.parquet")
    assert (pairs.i < pairs.j).all() and pairs.j.max() < 256 and len(pairs) > 0
    assert pairs.cos.abs().max() <= 1 + 1e-5 and pairs.cos.abs().mean() > 0
    # The saved model, reloaded: FVU recomputed from scratch on a training shard (in-sample; the
    # held-out metrics are tested in tests/test_core.py).
    x = shards.load(len(shards) - 1).float()
    with torch.no_grad():
        fvu = ((x - sae(x)) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert fvu < 0.6
    if architecture == "batchtopk":  # inference by the learned threshold keeps about k latents per token
        assert sae.cfg.threshold > 0
        assert 6 <= float((sae.encode(x) > 0).sum(1).float().mean()) <= 10  # k 8 (the old EMA gave 11.4 here)


@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_sparse_step_equals_dense_autograd_step(shards, architecture):
    """The fast path (sparse_ops.py) computes the textbook dense step: same losses, same weights.
    dead_tokens = one batch makes AuxK run from step 1; tau > 0 adds the orthogonality gradient."""
    cfg = RunConfig(replace(TINY, architecture=architecture, dead_tokens=128, l1_coeff=0.3), seed=0, tau=5.0)
    fast, slow = Trainer(cfg, shards), Trainer(cfg, shards)
    for _ in range(4):
        x = next(fast.batches)
        a, b = fast.train_step(x, sparse=True), slow.train_step(x, sparse=False)
        assert a.keys() == b.keys() and ("auxk" in a or architecture == "relu")
        for key in a.keys() - {"step_seconds", "penalty_seconds"}:  # wall-clock timers differ by nature
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
        assert a["penalty_seconds"] > 0  # tau > 0: the penalty's calls are timed
    for name, value in fast.sae.state_dict().items():
        torch.testing.assert_close(value, slow.sae.state_dict()[name], rtol=1e-4, atol=1e-5)


def test_dense_pre_acts_backward_equals_autograd():
    """The dense step reuses the no-grad pre-activations; its hand-written backward must be autograd's,
    so that the sparse-vs-dense test above compares against the textbook gradient."""
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(16, 8, generator=gen), torch.randn(16, 12, generator=gen)
    params = [torch.randn(*shape, generator=gen, requires_grad=True) for shape in ((8, 12), (12,), (8,))]
    w_enc, b_enc, b_dec = params
    ((x - b_dec) @ w_enc + b_enc).backward(g)
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    with torch.no_grad():
        pre = (x - b_dec) @ w_enc + b_enc
    dense_pre_acts(pre, x - b_dec.detach(), w_enc, b_enc, b_dec).backward(g)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, e)


def test_tau_zero_is_exactly_the_baseline(shards, tmp_path):
    _, base = run(RunConfig(TINY, seed=0), shards, tmp_path, "base")
    _, zero = run(RunConfig(TINY, seed=0, tau=0.0, topk_fraction=0.01, tau_schedule="fixed"), shards, tmp_path, "z")
    assert same_weights(base, zero)
    assert not (tmp_path / "z" / "pairs.parquet").exists()  # no selection ran


def test_ortho_term_changes_the_decoder_and_lowers_kept_cosines(shards, tmp_path):
    base_m, base = run(
        RunConfig(TINY, seed=0, tau=0.0, tau_schedule="adaptive", ortho=OrthoParams(tau_lr=0.0)), shards, tmp_path, "b"
    )
    ortho_m, ortho = run(RunConfig(TINY, seed=0, tau=50.0), shards, tmp_path, "o")
    assert not same_weights(base, ortho)
    assert ortho_m["mean_abs_cos"] < base_m["mean_abs_cos"]


def test_torch_selector_trains_the_numba_selectors_sae(shards, tmp_path):
    """ortho.selector torch (the CUDA path, here on CPU) keeps the same pairs as numba every step; the
    pairs arrive in another order, so the loss and gradient sums round differently: weights agree to
    float32 rounding over 40 steps (measured max |dW| 6.5e-7), not bitwise."""
    cfgs = {s: RunConfig(TINY, seed=0, tau=50.0, ortho=OrthoParams(selector=s)) for s in ("numba", "torch")}
    runs = {s: run(cfg, shards, tmp_path, s) for s, cfg in cfgs.items()}
    (m_numba, a), (m_torch, b) = runs["numba"], runs["torch"]
    max_dw = max((b.state_dict()[k] - v).abs().max().item() for k, v in a.state_dict().items())
    print(f"max |dW| numba vs torch selector: {max_dw:.3g}")
    assert max_dw < 1e-5
    assert m_torch["mean_abs_cos"] == pytest.approx(m_numba["mean_abs_cos"], abs=1e-5)


@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_low_precision_matmuls_keep_float32_weights_and_the_fit(shards, tmp_path, architecture):
    """train.matmul_dtype bfloat16: the encoder's product (and the dense path's decoder, which an
    untrained ReLU SAE takes) in bf16, weights and Adam in fp32; the fit stays that of fp32."""
    base = replace(TINY, architecture=architecture, l1_coeff=0.3)
    fp32_m, fp32 = run(RunConfig(base, seed=0), shards, tmp_path, "fp32")
    bf16_m, bf16 = run(RunConfig(replace(base, matmul_dtype="bfloat16"), seed=0), shards, tmp_path, "bf16")
    assert all(v.dtype == torch.float32 for v in bf16.state_dict().values())
    assert not same_weights(fp32, bf16)  # the bf16 product was used
    print(f"{architecture}: FVU fp32 {fp32_m['fvu']:.4f}, bf16 {bf16_m['fvu']:.4f}")
    assert bf16_m["fvu"] == pytest.approx(fp32_m["fvu"], abs=0.03)


def test_same_seed_same_weights(shards, tmp_path):
    cfg = RunConfig(TINY, seed=3, tau=0.1)
    _, a = run(cfg, shards, tmp_path, "a")
    _, b = run(cfg, shards, tmp_path, "b")
    assert same_weights(a, b)


@pytest.mark.parametrize(
    "arm",
    [
        {"tau": 0.1, "tau_schedule": "adaptive"},  # the default top-k co-activation term
        {"tau": 5.0, "penalty": "random"},  # the control: a numpy RNG of its own draws the pairs
        {"tau": 5.0, "penalty": "ortsae", "ortsae_chunk": 64},  # OrtSAE-style: its RNG draws the chunks
        {
            "tau": 5.0,
            "train": replace(TINY, architecture="batchtopk"),
            "matryoshka_prefixes": (64, 256),
            "matryoshka_sum": True,
        },  # the paper's Matryoshka: the inference threshold is running state
    ],
    ids=["topk", "random", "ortsae", "matryoshka_batchtopk"],
)
def test_interrupted_training_resumes_to_the_same_weights(shards, tmp_path, arm):
    """Stopped at step 25 (checkpoint at 20) and resumed: bit-identical to the uninterrupted run,
    which needs every RNG the run draws from (the penalty's included) restored from the checkpoint."""
    cfg = RunConfig(**{"train": TINY, "seed": 1, **arm})
    _, full = run(cfg, shards, tmp_path, "full")
    stopped, none = run(cfg, shards, tmp_path, "resumed", max_steps=25)
    assert none is None and stopped["steps"] == 25 and (tmp_path / ".ckpt_resumed" / "ckpt.pt").exists()
    metrics, resumed = run(cfg, shards, tmp_path, "resumed")
    assert metrics["resumed"] and metrics["steps"] == 40
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert full.cfg == resumed.cfg  # the batchtopk threshold included
    assert not (tmp_path / ".ckpt_resumed").exists()
    assert (tmp_path / "full" / "pairs.parquet").read_bytes() == (tmp_path / "resumed" / "pairs.parquet").read_bytes()


def test_checkpoint_of_an_older_format_is_ignored(shards, tmp_path):
    """Format 1 held numpy arrays and no penalty RNG: the run starts afresh rather than resume inexactly."""
    cfg = RunConfig(TINY, seed=0, tau=5.0, penalty="random")
    trainer = Trainer(cfg, shards)
    fp = cfg.fingerprint(trainer.source.fingerprint)
    old = {"fingerprint": fp, **trainer_state(trainer), "pair_log": [{"i": np.zeros(3, dtype=np.int32)}]}
    del old["format"], old["penalty"]
    (tmp_path / "ckpt").mkdir()
    torch.save(old, tmp_path / "ckpt" / "ckpt.pt")
    assert not load_checkpoint(trainer, tmp_path / "ckpt", fp)
    save_checkpoint(trainer, tmp_path / "ckpt", fp)
    assert load_checkpoint(Trainer(cfg, shards), tmp_path / "ckpt", fp)


def test_snapshots_are_taken_evenly_and_survive_a_resume(shards, tmp_path):
    from sae_ortho.training.snapshots import SNAPSHOTS, load_snapshots

    cfg = RunConfig(replace(TINY, snapshots=4), seed=2)  # the baseline: no pair log, snapshots all the same
    run(cfg, shards, tmp_path, "s", max_steps=15)  # interrupted after the first snapshot (step 10)
    _, sae = run(cfg, shards, tmp_path, "s")
    snaps = load_snapshots(tmp_path / "s" / SNAPSHOTS)
    assert list(snaps) == [10, 20, 30, 40]
    for key in ("W_enc", "b_enc", "W_dec", "b_dec"):  # the last is the final SAE, to fp16 precision
        torch.testing.assert_close(snaps[40][key], getattr(sae, key).detach(), atol=2e-3, rtol=1e-3)
    assert not torch.allclose(snaps[10]["W_dec"], snaps[40]["W_dec"], atol=1e-2)


def test_snapshot_steps_never_include_step_zero():
    from sae_ortho.training.train import snapshot_steps

    assert snapshot_steps(replace(TINY, snapshots=4)) == {10, 20, 30, 40}
    assert snapshot_steps(replace(TINY, train_tokens=128 * 5, snapshots=10)) == {1, 2, 3, 4, 5}
    assert snapshot_steps(replace(TINY, snapshots=0)) == set()


def test_non_finite_loss_stops_with_the_step(shards, tmp_path, monkeypatch):
    import sae_ortho.training.batches as batches_mod

    real = batches_mod.shuffled_batches

    def poisoned(*args, **kw):
        for n, batch in enumerate(real(*args, **kw)):
            yield batch * float("nan") if n == 7 else batch

    monkeypatch.setattr(batches_mod, "shuffled_batches", poisoned)
    with pytest.raises(NonFiniteLoss, match="at step 7"):
        run(RunConfig(TINY, seed=0), shards, tmp_path, "nan")
    state = torch.load(tmp_path / ".ckpt_nan" / "last_good" / "ckpt.pt", weights_only=True)
    assert state["step"] == 7 and all(torch.isfinite(v).all() for v in state["sae"].values())
    assert not (tmp_path / "nan").exists()


@pytest.mark.parametrize("architecture", ["topk", "relu", "batchtopk"])
def test_saelens_loads_and_encodes_identically(shards, tmp_path, architecture):
    from sae_lens import SAE as LensSAE

    _, ours = run(RunConfig(replace(TINY, architecture=architecture, train_tokens=128 * 5), seed=0), shards, tmp_path)
    theirs = LensSAE.load_from_disk(tmp_path / "sae")
    assert theirs.cfg.architecture() == {"topk": "topk", "relu": "standard", "batchtopk": "jumprelu"}[architecture]
    x = shards.load(0).float()[:200]
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.encode(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(theirs.decode(theirs.encode(x)), ours(x), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"tau": -0.1}, "tau"),
        ({"topk_fraction": 0.0}, "topk_fraction"),
        ({"topk_fraction": 1.5}, "topk_fraction"),
        ({"tau_schedule": "cosine"}, "tau_schedule"),
        ({"train": {"d_sae": 64, "k": 65}}, "train.k"),
        ({"train": {"architecture": "jumprelu"}}, "train.architecture"),
    ],
)
def test_bad_training_params(tmp_path, raw, key):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamError, match=f"^{key}:"):
        load(tmp_path / "params.yaml")


def test_train_stage_fails_before_work_on_bad_params(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tau": -1}))
    result = subprocess.run(
        [sys.executable, "-m", "stages.train", "--name", "ortho"],
        cwd=tmp_path,
        env=stage_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: params.yaml: tau: must be >= 0, got -1.0"
    assert not Path(tmp_path / "models").exists()


def prefix_fvu(sae: SAE, x: torch.Tensor, m: int) -> float:
    """FVU of the reconstruction from latents [0, m) only."""
    with torch.no_grad():
        xs = x * sae.cfg.input_scale
        f = sae.encode_scaled(xs)
        f[:, m:] = 0
        x_hat = f @ sae.W_dec + sae.b_dec
        return float(((xs - x_hat) ** 2).sum() / ((xs - xs.mean(0)) ** 2).sum())


def test_matryoshka_prefixes_reconstruct_on_their_own(shards, tmp_path):
    """The nested objective's point: the first 1/8 of the latents reconstructs far better alone than
    the same latents of a plain SAE, at the same L0."""
    _, plain = run(RunConfig(TINY, seed=0), shards, tmp_path, "plain")
    m_metrics, nested = run(RunConfig(TINY, seed=0, matryoshka_prefixes=(32, 64, 128, 256)), shards, tmp_path, "m")
    x = shards.load(0).float()
    assert prefix_fvu(nested, x, 32) < prefix_fvu(plain, x, 32) - 0.1
    assert m_metrics["fvu"] < 1 and m_metrics["l0"] == pytest.approx(TINY.k, abs=0.5)


def decoder_similarity(sae: SAE) -> dict[str, float]:
    g = sae.W_dec.detach() @ sae.W_dec.detach().T - torch.eye(sae.cfg.d_sae)
    return {"random": float((g**2).mean()), "ortsae": float(g.abs().max(1).values.mean())}


@pytest.mark.parametrize("penalty", ["random", "ortsae"])
def test_study_penalties_train_and_lower_what_they_target(shards, tmp_path, penalty):
    """Random pairs target the mean squared cosine over all pairs (each pair equally likely), the
    OrtSAE-style term each latent's largest cosine: each must lower its own target."""
    _, base = run(RunConfig(TINY, seed=0), shards, tmp_path, "b")
    metrics, arm = run(RunConfig(TINY, seed=0, tau=5.0, penalty=penalty, ortsae_chunk=64), shards, tmp_path, "a")
    assert (tmp_path / "a" / "pairs.parquet").exists() and metrics["fvu"] < 1
    assert decoder_similarity(arm)[penalty] < 0.9 * decoder_similarity(base)[penalty]


@pytest.mark.parametrize(
    "cfg",
    [
        RunConfig(replace(TINY, train_tokens=128 * 12), seed=0, tau=0.5),
        RunConfig(replace(TINY, train_tokens=128 * 12, architecture="batchtopk"), seed=0, tau=0.5, penalty="random"),
        RunConfig(replace(TINY, train_tokens=128 * 12, architecture="relu", l1_coeff=1e-3), 0, 0.5, penalty="ortsae"),
    ],
    ids=["topk", "batchtopk-random", "relu-ortsae"],
)
def test_training_allocates_nothing_on_the_default_device(shards, tmp_path, cfg):
    """Every tensor of a run is placed on the run's device explicitly: with the default device set to
    "meta", a stray `torch.zeros(...)` would be a meta tensor and the first op mixing it with the CPU
    run's tensors would fail. The run matches the same run without the default device set."""
    with torch.device("meta"):
        metrics, sae = run(cfg, shards, tmp_path, "meta", device=torch.device("cpu"))
    _, reference = run(cfg, shards, tmp_path, "reference")
    assert metrics["steps"] == 12 and same_weights(sae, reference)
