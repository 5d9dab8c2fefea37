"""The trainer's sync-free statistics (used off the CPU: step_log.py), exercised on the CPU: the same
weights and logged figures as the per-step path, a non-finite loss caught at the next settle with the
latest checkpoint kept as the last good state, and (on a GPU) no host sync between logging steps."""

from dataclasses import replace

import pytest
import torch

import sae_ortho.training.step_log as step_log
from sae_ortho.training.run_config import RunConfig
from sae_ortho.training.step_log import NonFiniteLoss
from tests.test_train import TINY, run, shards  # noqa: F401 - the module's shards fixture


def sync_free(monkeypatch):
    monkeypatch.setattr(step_log, "on_host", lambda device: False)


@pytest.mark.parametrize(
    ("cfg", "exact"),
    [
        (RunConfig(replace(TINY, dead_tokens=300), seed=2, tau=0.05), False),  # AuxK early, and the penalty
        (RunConfig(replace(TINY, architecture="relu"), seed=2), True),  # no AuxK
        (RunConfig(replace(TINY, architecture="batchtopk"), seed=2), False),
    ],
    ids=["topk_auxk_ortho", "relu", "batchtopk"],
)
def test_sync_free_path_trains_the_same_sae(shards, tmp_path, monkeypatch, cfg, exact):  # noqa: F811
    """Bitwise without AuxK. With it, the sync-free AuxK takes aux_k picks and zeroes the live ones: the
    same loss, but embedding_bag's CPU backward then sums the dead rows' gradients in another order, so
    weights differ in the last bits (3e-8 after 40 steps when measured); 1e-6 allows for that and no more."""
    per_step_metrics, per_step = run(cfg, shards, tmp_path, "per_step")
    sync_free(monkeypatch)
    metrics, settled = run(cfg, shards, tmp_path, "sync_free")
    worst = max(float((v - settled.state_dict()[k]).abs().max()) for k, v in per_step.state_dict().items())
    assert worst == 0 if exact else worst <= 1e-6, worst
    for key in ("fvu", "l0", "mse", "dead_fraction", "tau", "steps"):
        assert metrics[key] == pytest.approx(per_step_metrics[key], abs=0 if exact else 1e-4), key


def test_sync_free_path_catches_a_non_finite_loss_at_the_next_settle(shards, tmp_path, monkeypatch):  # noqa: F811
    import sae_ortho.training.batches as batches_mod

    real = batches_mod.shuffled_batches

    def poisoned(*args, **kw):
        for n, batch in enumerate(real(*args, **kw)):
            yield batch * float("nan") if n == 13 else batch

    monkeypatch.setattr(batches_mod, "shuffled_batches", poisoned)
    sync_free(monkeypatch)
    cfg = RunConfig(replace(TINY, log_every=4, checkpoint_every=10), seed=0)
    with pytest.raises(NonFiniteLoss, match="between steps 13 and 16"):  # settled at the logging step 16
        run(cfg, shards, tmp_path, "nan")
    state = torch.load(tmp_path / ".ckpt_nan" / "last_good" / "ckpt.pt", weights_only=True)
    assert state["step"] == 10 and all(torch.isfinite(v).all() for v in state["sae"].values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this project's machines)")
def test_cuda_topk_step_does_not_sync_between_logging_steps(shards):  # noqa: F811
    from sae_ortho.training.trainer import Trainer

    trainer = Trainer(RunConfig(TINY, seed=0), shards, device=torch.device("cuda"))
    x = shards.load(0).float()[: TINY.batch_size]
    trainer.train_step(x)  # warm-up: allocations and first-call syncs
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.train_step(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
