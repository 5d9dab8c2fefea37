"""SAE training runs (stages `train` and `train_baseline`): `train()` wires a Trainer (trainer.py) to its
data, checkpoints, snapshots and logs, and writes the SAE.

`python -m stages.train --name ortho` (stages/train.py) uses `tau`, `topk_fraction`, `tau_schedule` and `ortho`;
`python -m stages.train --name baseline` ignores them (tau = 0) so its DVC stage does not depend
on them and never reruns when they change. Checkpoints every `checkpoint_every` steps in
`models/.ckpt_<name>/` (checkpoint.py) let a killed run resume where it stopped; a non-finite loss
stops with the step number and keeps the last good checkpoint. Batches come from a `BatchSource`
(batches.py): the extraction shards by default, or any stream of [batch, d_in] tensors (the
synthetic stage, sae_ortho/evaluation/synthetic.py).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from sae_ortho.base import dist
from sae_ortho.base import params as params_mod
from sae_ortho.base.device import HOST
from sae_ortho.base.io import atomic_file, verified
from sae_ortho.base.stats import bootstrap_indices, percentile_ci
from sae_ortho.data.shards import ActivationShards
from sae_ortho.training import data_parallel as dp
from sae_ortho.training.batches import BatchSource
from sae_ortho.training.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from sae_ortho.training.run_config import RunConfig
from sae_ortho.training.snapshots import SNAPSHOTS, collect_snapshots, save_snapshot
from sae_ortho.training.step_log import NonFiniteLoss
from sae_ortho.training.trainer import Trainer

MODELS = Path("models")
TAU_TRACE = "tau_trace.npy"  # tau at every step of a run with a penalty
METRICS = Path("metrics/train")


def snapshot_steps(t: params_mod.TrainParams) -> set[int]:
    """Steps after which a snapshot is taken: `t.snapshots` evenly spaced, the last at the end.

    At most one per step: a run shorter than its snapshot count would otherwise round one to step 0,
    which no step ends at, and fail collecting them after training."""
    n = min(t.snapshots, t.steps)
    return {round(i * t.steps / n) for i in range(1, n + 1)} if n else set()


@torch.no_grad()
def geometric_median(x: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Weiszfeld iterations; the b_dec initialisation of dictionary_learning."""
    median = x.mean(0)
    for _ in range(iters):
        weights = 1.0 / (x - median).norm(dim=1).clamp_min(1e-6)
        median = (weights[:, None] * x).sum(0) / weights.sum()
    return median


def penalty_overhead(times: np.ndarray, n_boot: int = 1000, warmup: int = 20) -> dict:
    """The penalty's time over the rest of the step (selection + loss + gradient, timed around the
    calls), with a 95% interval from resampling steps. `times` is [steps, (step_s, penalty_s)].
    The first `warmup` steps are left out: they include numba's one-off kernel compilation (a
    first run measured overhead 0.29 with interval [0.05, 0.77] from those few steps alone)."""
    times = times[min(warmup, len(times) // 10) :]
    if len(times) == 0:
        return {}
    total, penalty = times[:, 0], times[:, 1]
    overhead = penalty.sum() / max((total - penalty).sum(), 1e-12)
    idx = bootstrap_indices(len(times), n_boot, seed=0)
    boots = penalty[idx].sum(1) / np.maximum((total - penalty)[idx].sum(1), 1e-12)
    return {
        "step_seconds_mean": round(float(total.mean()), 5),
        "penalty_seconds_mean": round(float(penalty.mean()), 6),
        "penalty_overhead": round(float(overhead), 5),
        "penalty_overhead_ci95": percentile_ci(boots),
    }


def log_live(live, stats: dict[str, float]) -> None:
    """One dvclive step: every loss part, L0, FVU, dead fraction, tau_t, mean |cos| of kept pairs."""
    if live is None:
        return
    live.step = int(stats["step"])
    for key, value in stats.items():
        if key != "step":
            live.log_metric(key, value)
    live.next_step()


def keep_last_good(trainer: Trainer, ckpt_dir: Path, fingerprint: str) -> None:
    """After a non-finite loss: on the CPU the state before the failing step (it was caught before being
    applied); off it, the latest checkpoint (settled, so finite), as the trainer's state is past it."""
    last_good = ckpt_dir / "last_good"
    if trainer.log.sync_each_step:
        save_checkpoint(trainer, last_good, fingerprint)
    elif (ckpt_dir / CHECKPOINT).exists():
        with atomic_file(last_good / CHECKPOINT, digest=True) as tmp:
            shutil.copy2(verified(ckpt_dir / CHECKPOINT), tmp)


def publish(trainer: Trainer, cfg: RunConfig, out_dir: Path, ckpt_dir: Path, snap_steps: set[int]) -> None:
    """The finished run's files: the SAE, its tau trace and pair log, its snapshots; the checkpoint goes."""
    trainer.sae.save(out_dir)
    if cfg.uses_ortho:
        with atomic_file(out_dir / TAU_TRACE, digest=True) as tmp, open(tmp, "wb") as fh:  # np.save(path) appends .npy
            np.save(fh, np.array(trainer.tau_trace, dtype=np.float64))
        pairs = {k: np.concatenate([p[k] for p in trainer.pair_log]) for k in ("step", "i", "j", "score", "cos")}
        with atomic_file(out_dir / "pairs.parquet", digest=True) as tmp:
            pq.write_table(pa.table(pairs), tmp)
    if snap_steps:
        collect_snapshots(ckpt_dir / "snapshots", out_dir / SNAPSHOTS, snap_steps)
    shutil.rmtree(ckpt_dir, ignore_errors=True)


def train(
    cfg: RunConfig,
    data: ActivationShards | BatchSource,
    out_dir: Path,
    ckpt_dir: Path,
    model_name: str = "",
    hook_name: str = "",
    live=None,
    progress_bar: bool = True,
    max_steps: int | None = None,
    device: torch.device = HOST,
) -> dict:
    """Train on `device`, checkpointing as it goes; write the SAE (ours + SAELens files) and the pair log.
    Under torchrun every rank trains its share of each batch (data_parallel.py) and rank 0 alone writes."""
    trainer = Trainer(cfg, data, model_name, hook_name, device)
    main = dist.is_main()
    fp = cfg.fingerprint(trainer.source.fingerprint)
    resumed = load_checkpoint(trainer, ckpt_dir, fp)
    if resumed:
        print(f"resuming from checkpoint at step {trainer.step}", file=sys.stderr)
        for stats in trainer.history:  # the live log restarts empty: replay what the checkpoint holds
            log_live(live, stats)
    else:
        sample = trainer.source.sample(8192, cfg.seed + 1)
        with torch.no_grad():
            trainer.sae.b_dec.copy_(geometric_median(sample * trainer.sae.cfg.input_scale))  # on CPU, then copied
            dp.broadcast_(trainer.sae.b_dec)  # ranks start from rank 0's bits, whatever their thread counts
    t = cfg.train
    total = t.steps if max_steps is None else min(t.steps, max_steps)
    bar = tqdm(total=t.steps, initial=trainer.step, unit="step", disable=not (progress_bar and main))
    t0, step0 = time.perf_counter(), trainer.step
    snap_steps = snapshot_steps(t)
    while trainer.step < total:
        x = next(trainer.batches)
        log_step = trainer.step % t.log_every == 0 or trainer.step + 1 == t.steps
        try:
            stats = trainer.train_step(x)
            if not trainer.log.sync_each_step and (log_step or trainer.step % t.checkpoint_every == 0):
                stats = trainer.log.settle(stats, len(x))  # the one sync: at logging and checkpoint steps
        except NonFiniteLoss:
            if main:
                keep_last_good(trainer, ckpt_dir, fp)
            raise
        if log_step:
            trainer.history.append(stats)
            log_live(live, stats)
            bar.set_postfix(fvu=f"{stats['fvu']:.3f}", l0=f"{stats['l0']:.1f}", tau=f"{stats['tau']:.3g}")
        if trainer.step in snap_steps and main:  # on disk at once, so a resumed run keeps the earlier ones
            save_snapshot(trainer.sae, ckpt_dir / "snapshots", trainer.step)
        if trainer.step % t.checkpoint_every == 0 and main:
            save_checkpoint(trainer, ckpt_dir, fp)
        bar.update(1)
    bar.close()
    elapsed = time.perf_counter() - t0
    if trainer.step < t.steps:  # stopped early on purpose (tests): leave the checkpoint
        return {"steps": trainer.step}
    dp.check_in_sync(trainer.sae)
    if main:
        publish(trainer, cfg, out_dir, ckpt_dir, snap_steps)
    dist.barrier()  # the others return once rank 0 has published
    last = trainer.history[-5:]
    final = {k: float(np.mean([h[k] for h in last])) for k in ("fvu", "l0", "mse", "dead_fraction", "tau")}
    if cfg.uses_ortho:
        final["mean_abs_cos"] = float(np.mean([h["mean_abs_cos"] for h in last]))
    return {
        **{k: round(v, 5) for k, v in final.items()},
        "steps": trainer.step,
        "tokens": trainer.step * t.batch_size,
        "tokens_per_s": round((trainer.step - step0) * t.batch_size / elapsed, 1) if trainer.step > step0 else None,
        "resumed": resumed,
        "input_scale": round(trainer.sae.cfg.input_scale, 6),
        "seconds": round(elapsed, 1),  # training loop of this run (a resumed run counts its own part)
        **penalty_overhead(np.array(trainer.log.times)),
    }
