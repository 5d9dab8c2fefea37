"""SAE training with the instantaneous top-k orthogonality loss (stages `train` and `train_baseline`).

`python -m stages.train --name ortho` (stages/train.py) uses `tau`, `topk_fraction`, `tau_schedule` and `ortho`;
`python -m stages.train --name baseline` ignores them (tau = 0) so its DVC stage does not depend
on them and never reruns when they change. Per step:

  loss = ||x - x_hat||^2 / d_in  (+ l1_coeff * sum_i f_i ||w_i|| for relu, + AuxK for topk)
         + tau_t * mean_{(i,j) in top pairs} (w_i . w_j)^2

then the decoder gradient's component along each row is removed, Adam steps, and rows are
renormalised to unit L2 norm. Checkpoints every `checkpoint_every` steps in `models/.ckpt_<name>/`
let a killed run resume where it stopped; a non-finite loss stops with the step number and keeps
the last good checkpoint. Batches come from a `BatchSource`: the extraction shards by default,
or any stream of [batch, d_in] tensors (the synthetic stage, sae_ortho/evaluation/synthetic.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from sae_ortho.base import params as params_mod
from sae_ortho.base.io import atomic_file
from sae_ortho.data.shards import ActivationShards
from sae_ortho.training.batches import shuffled_batches
from sae_ortho.training.ortho import TauSchedule
from sae_ortho.training.penalties import DecoderPenalty, OrtSAEChunks, RandomPairs, TopKCoactivation
from sae_ortho.training.sae import SAE, SAEConfig
from sae_ortho.training.snapshots import SNAPSHOTS, collect_snapshots, save_snapshot
from sae_ortho.training.sparse_ops import (
    ActiveCodes,
    decode_active,
    dense_pre_acts,
    gather_pre_acts,
    positive_pattern,
    topk_pattern,
)

ACTIVATIONS = Path("data/activations")
MODELS = Path("models")
METRICS = Path("metrics/train")
DENSE_FRACTION = 0.1  # above this share of active codes the dense step is faster
# Bumped when a checkpoint's contents change: an older checkpoint then starts the run afresh
# rather than resuming without the state it lacks (2: the penalty's RNG, weights_only loading).
CHECKPOINT_FORMAT = 2


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class RunConfig:
    """Everything one training run needs; the baseline is this with tau = 0."""

    train: params_mod.TrainParams
    seed: int
    tau: float = 0.0
    topk_fraction: float = 0.001
    tau_schedule: str = "fixed"
    ortho: params_mod.OrthoParams = field(default_factory=params_mod.OrthoParams)
    # The study's arms (sae_ortho/study/arms.py); the defaults are the pipeline's two SAEs.
    penalty: str = "topk"  # topk (co-activation) | random (control) | ortsae (all pairs, random chunks)
    tau_decay: float = 0.999  # tau_schedule "decay": tau_t = tau * tau_decay**t (the earlier attempt's rule)
    ortsae_chunk: int = 1024  # ortsae: latents per random chunk
    matryoshka_prefixes: tuple[int, ...] = ()  # nested prefix sizes (the last = d_sae); () = plain SAE

    @property
    def uses_ortho(self) -> bool:
        return self.tau > 0 or self.tau_schedule == "adaptive"

    def make_penalty(self) -> DecoderPenalty | None:
        if not self.uses_ortho:
            return None
        if self.penalty == "topk":
            return TopKCoactivation(self.topk_fraction)
        if self.penalty == "random":
            return RandomPairs(self.topk_fraction, seed=self.seed)
        if self.penalty == "ortsae":
            return OrtSAEChunks(self.ortsae_chunk, seed=self.seed)
        raise ValueError(f"unknown penalty {self.penalty!r} (topk | random | ortsae)")

    def fingerprint(self, data_fp: str) -> str:
        return hashlib.sha256(json.dumps([asdict(self), data_fp], sort_keys=True).encode()).hexdigest()


def run_config(p: params_mod.Params, name: str, seed: int | None = None) -> RunConfig:
    """The run of SAE `name` (baseline | ortho); `seed` overrides `sae_seed` (the stability seeds)."""
    seed = p.sae_seed if seed is None else seed
    if name == "baseline":
        return RunConfig(train=p.train, seed=seed)
    return RunConfig(p.train, seed, p.tau, p.topk_fraction, p.tau_schedule, p.ortho)


def matryoshka_loss(mse: torch.Tensor, xs: torch.Tensor, codes: ActiveCodes, sae: SAE, prefixes) -> torch.Tensor:
    """Matryoshka objective (Bussmann et al. 2025): each prefix of the latents [0, m) must reconstruct
    the input on its own; the mean over prefixes (the last is the full SAE, whose error is `mse`).
    TopK picks the active latents, as for the plain SAE, so L0 is matched exactly across arms."""
    losses = [mse]
    for m in prefixes[:-1]:
        kept = codes.values * (codes.cols < m)
        x_hat = decode_active(codes.cols, codes.offsets, kept, sae.W_dec) + sae.b_dec
        losses.append(((xs - x_hat) ** 2).sum(-1).mean() / sae.cfg.d_in)
    return torch.stack(losses).mean()


def snapshot_steps(t: params_mod.TrainParams) -> set[int]:
    """Steps after which a snapshot is taken: `t.snapshots` evenly spaced, the last at the end."""
    return {round(n * t.steps / t.snapshots) for n in range(1, t.snapshots + 1)} if t.snapshots else set()


def lr_at(step: int, t: params_mod.TrainParams) -> float:
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    decay_start = int(t.steps * (1 - t.decay_fraction))
    if step >= decay_start and t.decay_fraction > 0:
        return t.lr * max(0.0, (t.steps - step) / max(1, t.steps - decay_start))
    return t.lr


@torch.no_grad()
def geometric_median(x: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Weiszfeld iterations; the b_dec initialisation of dictionary_learning."""
    median = x.mean(0)
    for _ in range(iters):
        weights = 1.0 / (x - median).norm(dim=1).clamp_min(1e-6)
        median = (weights[:, None] * x).sum(0) / weights.sum()
    return median


class BatchSource(Protocol):
    """Where training batches come from. The LM path wraps the extraction shards (ShardSource);
    the synthetic stage streams batches from SAELens's SyntheticModel with no shards at all."""

    d_in: int
    norm_mean: float  # mean L2 norm of the raw inputs: sets input_scale (normalize_inputs)
    fingerprint: str  # identifies the data, so a checkpoint never resumes on other data

    def stream(self, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
        """Endless float32 [batch_size, d_in] batches, deterministic given seed."""
        ...

    def sample(self, n: int, seed: int) -> torch.Tensor:
        """n rows for the b_dec (geometric median) initialisation."""
        ...


@dataclass
class ShardSource:
    """The extraction shards as a BatchSource: exactly the batches the trainer always drew."""

    shards: ActivationShards
    buffer_shards: int

    @property
    def d_in(self) -> int:
        return self.shards.d_in

    @property
    def norm_mean(self) -> float:
        return self.shards.manifest["norm"]["mean"]

    @property
    def fingerprint(self) -> str:
        return self.shards.manifest.get("fingerprint", "")

    def stream(self, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
        return shuffled_batches(self.shards, batch_size, seed, self.buffer_shards)

    def sample(self, n: int, seed: int) -> torch.Tensor:
        return next(shuffled_batches(self.shards, n, seed, 1))


def as_source(data: ActivationShards | BatchSource, t: params_mod.TrainParams) -> BatchSource:
    return ShardSource(data, t.buffer_shards) if isinstance(data, ActivationShards) else data


class Trainer:
    def __init__(self, cfg: RunConfig, data: ActivationShards | BatchSource, model_name: str = "", hook_name: str = ""):
        self.cfg = cfg
        t = cfg.train
        torch.manual_seed(cfg.seed)
        self.source = as_source(data, t)
        scale = math.sqrt(self.source.d_in) / self.source.norm_mean if t.normalize_inputs else 1.0
        sae_cfg = SAEConfig(
            d_in=self.source.d_in,
            d_sae=t.d_sae,
            architecture=t.architecture,
            k=t.k,
            input_scale=scale,
            model_name=model_name,
            hook_name=hook_name,
        )
        self.sae = SAE(sae_cfg, seed=cfg.seed)
        self.batches = self.source.stream(t.batch_size, cfg.seed)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=t.lr, betas=(0.9, 0.999))
        self.tau = TauSchedule(cfg.tau, cfg.tau_schedule, cfg.ortho.target, cfg.ortho.tau_lr, cfg.tau_decay)
        self.penalty: DecoderPenalty | None = cfg.make_penalty()
        self.step = 0
        self.silent_tokens = torch.zeros(t.d_sae, dtype=torch.long)
        self.pair_log: list[dict[str, np.ndarray]] = []
        self.history: list[dict[str, float]] = []
        self._pre_buffer = torch.empty(0)

    def encode_decode(self, xs: torch.Tensor, sparse: bool | None = None) -> tuple[ActiveCodes, torch.Tensor, dict]:
        """Codes (CSR, differentiable values), reconstruction, and what AuxK needs.

        The sparse path (sparse_ops.py) is used unless the active set is over
        `DENSE_FRACTION` of the code matrix (an untrained ReLU SAE), where dense matmuls win.
        Both compute the same function; tests compare their losses and gradients."""
        sae = self.sae
        with torch.no_grad():
            x_centred = xs - sae.b_dec
            # One [batch, d_sae] buffer reused across steps: a fresh 268 MB tensor per step (d_sae
            # 16384) is page-faulted in again every time, ~8% of the step.
            if self._pre_buffer.shape != (len(xs), sae.cfg.d_sae):
                self._pre_buffer = torch.empty(len(xs), sae.cfg.d_sae)
            pre = torch.addmm(sae.b_enc, x_centred, sae.W_enc, out=self._pre_buffer)
        if sae.cfg.architecture == "topk":
            rows, cols, offsets = topk_pattern(pre, sae.cfg.k)
        else:
            rows, cols, offsets = positive_pattern(pre)
        if sparse is None:
            sparse = len(cols) <= DENSE_FRACTION * pre.numel()
        ctx = {"sparse": sparse, "pre": pre, "x_centred": x_centred}
        if sparse:
            values = gather_pre_acts(pre, x_centred, sae.W_enc, sae.b_enc, sae.b_dec, rows, cols).relu()
            x_hat = decode_active(cols, offsets, values, sae.W_dec) + sae.b_dec
        else:
            pre_grad = dense_pre_acts(pre, x_centred, sae.W_enc, sae.b_enc, sae.b_dec)
            f = torch.zeros_like(pre_grad).index_put((rows, cols), pre_grad[rows, cols].relu())
            values = f[rows, cols]
            x_hat = f @ sae.W_dec + sae.b_dec
            ctx["pre"] = pre_grad
        return ActiveCodes(rows, cols, offsets, values), x_hat, ctx

    def aux_k_loss(self, ctx: dict, residual: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
        """AuxK (Gao et al. 2024): dead latents' top-k_aux pre-activations reconstruct the residual."""
        sae, pre = self.sae, ctx["pre"]
        k = min(self.cfg.train.aux_k, int(dead.sum()))
        rows, cols, offsets = topk_pattern(pre, k, allowed=dead)
        if ctx["sparse"]:
            values = gather_pre_acts(pre, ctx["x_centred"], sae.W_enc, sae.b_enc, sae.b_dec, rows, cols)
            recon = decode_active(cols, offsets, values.relu(), sae.W_dec)
        else:
            f = torch.zeros_like(pre).index_put((rows, cols), pre[rows, cols].relu())
            recon = f @ sae.W_dec
        return ((residual - recon) ** 2).sum(-1).mean() / (residual**2).sum(-1).mean().clamp_min(1e-8)

    def train_step(self, x: torch.Tensor, sparse: bool | None = None) -> dict[str, float]:
        t, sae = self.cfg.train, self.sae
        # The penalty's own share of the step (selection, loss, gradient) is timed around its calls:
        # whole-run time differences swing by +-10% on a shared machine (absorption efficiency).
        step_start, penalty_s = time.perf_counter(), 0.0
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, t)
        xs = x * sae.cfg.input_scale
        codes, x_hat, ctx = self.encode_decode(xs, sparse)
        err = xs - x_hat
        mse = (err**2).sum(-1).mean() / sae.cfg.d_in
        loss = mse
        parts = {"mse": mse.item()}
        if self.cfg.matryoshka_prefixes:
            loss = matryoshka_loss(mse, xs, codes, sae, self.cfg.matryoshka_prefixes)
            parts["matryoshka"] = loss.item()
        active = codes.values.detach() > 0
        with torch.no_grad():
            self.silent_tokens += len(x)
            self.silent_tokens[codes.cols[active]] = 0
            dead = self.silent_tokens >= t.dead_tokens
        if t.architecture == "relu":
            l1 = (codes.values * sae.W_dec.norm(dim=1)[codes.cols]).sum() / len(x) / sae.cfg.d_in
            loss = loss + t.l1_coeff * l1
            parts["l1"] = l1.item()
        elif t.aux_coeff > 0 and dead.any():
            aux = self.aux_k_loss(ctx, err.detach(), dead)
            loss = loss + t.aux_coeff * aux
            parts["auxk"] = aux.item()
        tau = self.tau.tau
        penalty = self.penalty
        if penalty is not None:
            t0 = time.perf_counter()
            terms = penalty.terms(sae.W_dec, codes, t.d_sae)  # gradient added after backward, in place
            penalty_s += time.perf_counter() - t0
            parts.update(terms.parts)
            if self.step % self.cfg.ortho.log_pairs_every == 0:
                self.pair_log.append(penalty.log_rows(sae.W_dec, terms, self.step))
            self.tau.update(parts["mean_abs_cos"])
        total = loss.item() + (tau * terms.value if penalty is not None else 0.0)
        if not math.isfinite(total):
            raise NonFiniteLoss(f"non-finite loss ({total}) at step {self.step}: {parts}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if penalty is not None and tau > 0:
            t0 = time.perf_counter()
            penalty.add_grad_(sae.W_dec.grad, sae.W_dec, terms, tau)
            penalty_s += time.perf_counter() - t0
        sae.remove_parallel_grad()
        self.opt.step()
        sae.normalize_decoder()
        with torch.no_grad():
            centered = xs - xs.mean(0)
            fvu = (err**2).sum() / (centered**2).sum()
        stats = {
            "step": self.step,
            "loss": total,
            **parts,
            "tau": tau,
            "lr": lr_at(self.step, t),
            "l0": active.sum().item() / len(x),
            "fvu": fvu.item(),
            "dead_fraction": dead.float().mean().item(),
            "step_seconds": time.perf_counter() - step_start,
            "penalty_seconds": penalty_s,
        }
        self.step += 1
        return stats

    # --- checkpoints -------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "sae": self.sae.state_dict(),
            "opt": self.opt.state_dict(),
            "step": self.step,
            "tau": self.tau.tau,
            "silent_tokens": self.silent_tokens,
            # weights_only loading admits tensors, not numpy arrays
            "pair_log": [{k: torch.from_numpy(v) for k, v in rows.items()} for rows in self.pair_log],
            "history": self.history,
            "torch_rng": torch.get_rng_state(),
            "penalty": self.penalty.state_dict() if self.penalty is not None else {},
        }

    def save_checkpoint(self, directory: Path, fingerprint: str) -> None:
        with atomic_file(directory / "ckpt.pt") as tmp:
            torch.save({"fingerprint": fingerprint, **self.state()}, tmp)

    def load_checkpoint(self, directory: Path, fingerprint: str) -> bool:
        path = directory / "ckpt.pt"
        if not path.exists():
            return False
        try:
            state = torch.load(path, weights_only=True)
        except pickle.UnpicklingError:  # format 1 held numpy arrays
            state = {}
        if state.get("format") != CHECKPOINT_FORMAT:
            print(f"ignoring {path}: written by an older trainer, it cannot resume exactly", file=sys.stderr)
            return False
        if state["fingerprint"] != fingerprint:
            return False
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["opt"])
        self.step, self.tau.tau = state["step"], state["tau"]
        self.silent_tokens, self.history = state["silent_tokens"], state["history"]
        self.pair_log = [{k: v.numpy() for k, v in rows.items()} for rows in state["pair_log"]]
        torch.set_rng_state(state["torch_rng"])
        if self.penalty is not None:
            self.penalty.load_state_dict(state["penalty"])
        for _ in range(self.step):  # the data stream is deterministic: skip what was consumed
            next(self.batches)
        return True


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
    idx = np.random.default_rng(0).integers(0, len(times), (n_boot, len(times)))
    boots = penalty[idx].sum(1) / np.maximum((total - penalty)[idx].sum(1), 1e-12)
    return {
        "step_seconds_mean": round(float(total.mean()), 5),
        "penalty_seconds_mean": round(float(penalty.mean()), 6),
        "penalty_overhead": round(float(overhead), 5),
        "penalty_overhead_ci95": [round(float(q), 5) for q in np.quantile(boots, [0.025, 0.975])],
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
) -> dict:
    """Train, checkpointing as it goes; write the SAE (ours + SAELens files) and the pair log."""
    trainer = Trainer(cfg, data, model_name, hook_name)
    fp = cfg.fingerprint(trainer.source.fingerprint)
    resumed = trainer.load_checkpoint(ckpt_dir, fp)
    if resumed:
        print(f"resuming from checkpoint at step {trainer.step}", file=sys.stderr)
        for stats in trainer.history:  # the live log restarts empty: replay what the checkpoint holds
            log_live(live, stats)
    else:
        sample = trainer.source.sample(8192, cfg.seed + 1)
        with torch.no_grad():
            trainer.sae.b_dec.copy_(geometric_median(sample * trainer.sae.cfg.input_scale))
    t = cfg.train
    total = t.steps if max_steps is None else min(t.steps, max_steps)
    bar = tqdm(total=t.steps, initial=trainer.step, unit="step", disable=not progress_bar)
    t0, step0 = time.perf_counter(), trainer.step
    step_times: list[tuple[float, float]] = []  # (step, penalty) seconds of this process's steps
    snap_steps = snapshot_steps(t)
    while trainer.step < total:
        x = next(trainer.batches)
        try:
            stats = trainer.train_step(x)
        except NonFiniteLoss:
            trainer.save_checkpoint(ckpt_dir / "last_good", fp)  # state before the failing step
            raise
        step_times.append((stats["step_seconds"], stats["penalty_seconds"]))
        if stats["step"] % t.log_every == 0 or trainer.step == t.steps:
            trainer.history.append(stats)
            log_live(live, stats)
            bar.set_postfix(fvu=f"{stats['fvu']:.3f}", l0=f"{stats['l0']:.1f}", tau=f"{stats['tau']:.3g}")
        if trainer.step in snap_steps:  # on disk at once, so a resumed run keeps the earlier ones
            save_snapshot(trainer.sae, ckpt_dir / "snapshots", trainer.step)
        if trainer.step % t.checkpoint_every == 0:
            trainer.save_checkpoint(ckpt_dir, fp)
        bar.update(1)
    bar.close()
    elapsed = time.perf_counter() - t0
    if trainer.step < t.steps:  # stopped early on purpose (tests): leave the checkpoint
        return {"steps": trainer.step}

    trainer.sae.save(out_dir)
    if cfg.uses_ortho:
        pairs = {k: np.concatenate([p[k] for p in trainer.pair_log]) for k in ("step", "i", "j", "score", "cos")}
        with atomic_file(out_dir / "pairs.parquet") as tmp:
            pq.write_table(pa.table(pairs), tmp)
    if snap_steps:
        collect_snapshots(ckpt_dir / "snapshots", out_dir / SNAPSHOTS, snap_steps)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
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
        **penalty_overhead(np.array(step_times)),
    }
