"""The training step: SAE loss with the instantaneous top-k orthogonality term (or a study arm's penalty).

Per step:

  loss = ||x - x_hat||^2 / d_in  (+ l1_coeff * sum_i f_i ||w_i|| for relu, + AuxK for topk)
         + tau_t * mean_{(i,j) in top pairs} (w_i . w_j)^2

then the decoder gradient's component along each row is removed, Adam steps, and rows are
renormalised to unit L2 norm. A non-finite loss raises NonFiniteLoss with the step number (off the CPU,
at the next logging or checkpoint step: step_log.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np
import torch

from sae_ortho.base import dist
from sae_ortho.base import params as params_mod
from sae_ortho.base.device import HOST, to_device
from sae_ortho.data.shards import ActivationShards
from sae_ortho.training import data_parallel as dp
from sae_ortho.training.batches import BatchSource, as_source
from sae_ortho.training.ortho import TauSchedule
from sae_ortho.training.penalties import DecoderPenalty
from sae_ortho.training.run_config import RunConfig
from sae_ortho.training.sae import SAE, SAEConfig
from sae_ortho.training.sparse_ops import (
    ActiveCodes,
    batch_topk_pattern,
    decode_active,
    dense_pre_acts,
    gather_pre_acts,
    positive_pattern,
    topk_pattern,
)
from sae_ortho.training.step_log import StepLog

DENSE_FRACTION = 0.1  # above this share of active codes the dense step is faster


def matryoshka_loss(
    mse: torch.Tensor, xs: torch.Tensor, codes: ActiveCodes, sae: SAE, prefixes, summed: bool = False
) -> torch.Tensor:
    """Matryoshka objective (Bussmann et al. 2025): each prefix of the latents [0, m) must reconstruct
    the input on its own (the last prefix is the full SAE, whose error is `mse`). The paper sums the prefix
    losses over BatchTopK codes (`summed`, architecture batchtopk); the study's secondary variant takes
    their mean over per-sample TopK codes, so L0 is matched exactly across arms."""
    losses = [mse]
    for m in prefixes[:-1]:
        kept = codes.values * (codes.cols < m)
        x_hat = decode_active(codes.cols, codes.offsets, kept, sae.W_dec) + sae.b_dec
        losses.append(((xs - x_hat) ** 2).sum(-1).mean() / sae.cfg.d_in)
    return torch.stack(losses).sum() if summed else torch.stack(losses).mean()


def batchtopk_threshold(old: float, smallest_kept: float, step: int, steps: int) -> float:
    """BatchTopK's inference threshold: the mean of each batch's smallest kept activation over the second half
    of training (0 before). Bussmann et al. (dictionary_learning) start an EMA (beta 0.999) only after 1,000
    steps of runs 100x longer than these; an EMA from step 0 keeps 0.999^n of the untrained SAE's first value
    (78% after the study sweep's 244 steps), which gave an inference L0 of 1.8-2.2 instead of k = 12."""
    start = steps // 2
    if step < start:
        return 0.0
    return old + (smallest_kept - old) / (step - start + 1)


def lr_at(step: int, t: params_mod.TrainParams) -> float:
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    decay_start = int(t.steps * (1 - t.decay_fraction))
    if step >= decay_start and t.decay_fraction > 0:
        return t.lr * max(0.0, (t.steps - step) / max(1, t.steps - decay_start))
    return t.lr


def aux_k_loss(sae: SAE, ctx: dict, residual: torch.Tensor, dead: torch.Tensor, aux_k: int, sync_free: bool):
    """AuxK (Gao et al. 2024): dead latents' top-k_aux pre-activations reconstruct the residual.

    `sync_free` (off the CPU): always aux_k picks, the ones that are not dead zeroed, and the loss times
    "any dead", so no count is read on the host; the reconstruction adds exact zeros, so it is the same."""
    pre = ctx["pre"]
    k = aux_k if sync_free else min(aux_k, int(dead.sum()))
    rows, cols, offsets = topk_pattern(pre, k, allowed=dead)
    keep = dead[cols].to(pre.dtype) if sync_free else None
    if ctx["sparse"]:
        values = gather_pre_acts(pre, ctx["x_centred"], sae.W_enc, sae.b_enc, sae.b_dec, rows, cols).relu()
        recon = decode_active(cols, offsets, values if keep is None else values * keep, sae.W_dec)
    else:
        picked = pre[rows, cols].relu()
        f = torch.zeros_like(pre).index_put((rows, cols), picked if keep is None else picked * keep)
        recon = f @ sae.W_dec
    normaliser = dp.mean_over_ranks((residual**2).sum(-1).mean())  # the global batch's, with several ranks
    loss = ((residual - recon) ** 2).sum(-1).mean() / normaliser.clamp_min(1e-8)
    return loss * dead.any() if sync_free else loss


def encoder_product(sae: SAE, xs: torch.Tensor, out: torch.Tensor, dtype: torch.dtype):
    """x - b_dec, and the encoder's pre-activations written into `out`, one [batch, d_sae] buffer reused
    across steps: a fresh 268 MB tensor per step (d_sae 16384) is page-faulted in again every time, ~8% of
    the step. With a low `dtype` the product of the float32 master weights runs in it, kept in float32."""
    with torch.no_grad():
        x_centred = xs - sae.b_dec
        if dtype == torch.float32:
            torch.addmm(sae.b_enc, x_centred, sae.W_enc, out=out)
        else:
            out.copy_(torch.addmm(sae.b_enc.to(dtype), x_centred.to(dtype), sae.W_enc.to(dtype)))
    return x_centred, out


class Trainer:
    """One run's model, optimiser and step; checkpoint.py saves and restores it, train() drives it."""

    def __init__(
        self,
        cfg: RunConfig,
        data: ActivationShards | BatchSource,
        model_name: str = "",
        hook_name: str = "",
        device: torch.device = HOST,
    ):
        self.cfg = cfg
        self.device = device
        t = cfg.train
        torch.manual_seed(cfg.seed)
        self.source = as_source(data, t)
        scale = math.sqrt(self.source.d_in) / self.source.norm_mean if t.normalize_inputs else 1.0
        names = {"model_name": model_name, "hook_name": hook_name}
        sae_cfg = SAEConfig(self.source.d_in, t.d_sae, t.architecture, t.k, input_scale=scale, **names)
        self.sae = SAE(sae_cfg, seed=cfg.seed).to(device)  # initialised on CPU: the same init on any device
        self.batches = self.source.stream(t.batch_size, cfg.seed)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=t.lr, betas=(0.9, 0.999))
        self.tau = TauSchedule(cfg.tau, cfg.tau_schedule, cfg.ortho.target, cfg.ortho.tau_lr, cfg.tau_decay)
        self.penalty: DecoderPenalty | None = cfg.make_penalty()
        self.step = 0
        self.silent_tokens = torch.zeros(t.d_sae, dtype=torch.long, device=device)
        self.pair_log: list[dict[str, np.ndarray]] = []
        self.history: list[dict[str, float]] = []
        self.tau_trace: list[float] = []  # tau at every step (a control replays it: RunConfig.tau_replay)
        if cfg.tau_replay and len(cfg.tau_replay) < t.steps:
            raise ValueError(f"tau_replay holds {len(cfg.tau_replay)} steps, the run takes {t.steps}")
        self._pre_buffer = torch.empty(0, device=device)
        self.matmul_dtype = getattr(torch, t.matmul_dtype)
        self.log = StepLog(device)

    def encode_decode(self, xs: torch.Tensor, sparse: bool | None = None) -> tuple[ActiveCodes, torch.Tensor, dict]:
        """Codes (CSR, differentiable values), reconstruction, and what AuxK needs.

        The sparse path (sparse_ops.py) is used unless the active set is over
        `DENSE_FRACTION` of the code matrix (an untrained ReLU SAE), where dense matmuls win.
        Both compute the same function; tests compare their losses and gradients."""
        sae = self.sae
        if self._pre_buffer.shape != (len(xs), sae.cfg.d_sae):
            self._pre_buffer = torch.empty(len(xs), sae.cfg.d_sae, device=xs.device)
        x_centred, pre = encoder_product(sae, xs, self._pre_buffer, self.matmul_dtype)
        if sae.cfg.architecture == "topk":
            rows, cols, offsets = topk_pattern(pre, sae.cfg.k)
        elif sae.cfg.architecture == "batchtopk":
            rows, cols, offsets = batch_topk_pattern(pre, sae.cfg.k)
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
            x_hat = (f.to(self.matmul_dtype) @ sae.W_dec.to(self.matmul_dtype)).float() + sae.b_dec
            ctx["pre"] = pre_grad
        return ActiveCodes(rows, cols, offsets, values), x_hat, ctx

    def count_silent(self, batch: int, cols: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Tokens since each latent last fired; the dead mask. No data-dependent shape off the CPU."""
        with torch.no_grad():
            self.silent_tokens += batch
            if self.log.sync_each_step and not dist.active():
                self.silent_tokens[cols[active]] = 0
            else:  # no data-dependent shape; over ranks, the global batch's firing
                fired = torch.zeros(len(self.silent_tokens), device=cols.device).index_add_(0, cols, active.float())
                self.silent_tokens.masked_fill_(dp.fired_counts(fired) > 0, 0)
            return self.silent_tokens >= self.cfg.train.dead_tokens

    def train_step(self, x: torch.Tensor, sparse: bool | None = None) -> dict:
        """One step; its statistics as floats on the CPU, as tensors elsewhere until `self.log.settle`."""
        t, sae = self.cfg.train, self.sae
        # The penalty's own share of the step (selection, loss, gradient) is timed around its calls:
        # whole-run time differences swing by +-10% on a shared machine (absorption efficiency).
        penalty_s = 0.0
        self.log.start()
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, t)
        xs = to_device(dp.local_rows(x), self.device) * sae.cfg.input_scale  # this rank's rows of the batch
        codes, x_hat, ctx = self.encode_decode(xs, sparse)
        err = xs - x_hat
        mse = (err**2).sum(-1).mean() / sae.cfg.d_in
        loss = mse
        parts = {"mse": mse.detach()}
        if self.cfg.matryoshka_prefixes:
            loss = matryoshka_loss(mse, xs, codes, sae, self.cfg.matryoshka_prefixes, self.cfg.matryoshka_sum)
            parts["matryoshka"] = loss.detach()
        active = codes.values.detach() > 0
        if t.architecture == "batchtopk" and active.any():  # the threshold is host state: read every step
            smallest = dp.min_over_ranks(float(codes.values.detach()[active].min()), self.device)
            sae.cfg = replace(sae.cfg, threshold=batchtopk_threshold(sae.cfg.threshold, smallest, self.step, t.steps))
        dead = self.count_silent(len(x), codes.cols, active)
        if t.architecture == "relu":
            l1 = (codes.values * sae.W_dec.norm(dim=1)[codes.cols]).sum() / len(x) / sae.cfg.d_in
            loss = loss + t.l1_coeff * l1
            parts["l1"] = l1.detach()
        elif t.aux_coeff > 0 and (not self.log.sync_each_step or dead.any()):
            aux = aux_k_loss(sae, ctx, err.detach(), dead, t.aux_k, sync_free=not self.log.sync_each_step)
            loss = loss + t.aux_coeff * aux
            parts["auxk"] = aux.detach()
        tau = self.cfg.tau_replay[self.step] if self.cfg.tau_replay else self.tau.tau
        self.tau_trace.append(tau)
        penalty = self.penalty
        if penalty is not None:
            t0 = time.perf_counter()
            terms = dp.penalty_terms(penalty, sae.W_dec, codes, t.d_sae)  # gradient added after backward
            penalty_s += time.perf_counter() - t0
            parts.update(terms.parts)
            if self.step % self.cfg.ortho.log_pairs_every == 0:
                self.pair_log.append(penalty.log_rows(sae.W_dec, terms, self.step))
            self.tau.update(parts["mean_abs_cos"])
        penalty_value = tau * terms.value if penalty is not None else 0.0
        self.log.check_finite(self.step, dp.mean_over_ranks(loss.detach()), penalty_value, parts)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        dp.average_gradients(sae.parameters())  # before the penalty's gradient, which every rank adds alike
        if penalty is not None and tau > 0:
            t0 = time.perf_counter()
            penalty.add_grad_(sae.W_dec.grad, sae.W_dec, terms, tau)
            penalty_s += time.perf_counter() - t0
        sae.remove_parallel_grad()
        self.opt.step()
        sae.normalize_decoder()
        fvu = dp.global_fvu(err, xs)
        raw = {
            "step": self.step,
            "loss": loss.detach(),
            **parts,
            "tau": tau,
            "lr": lr_at(self.step, t),
            "l0": active.sum(),  # a count: host_stats divides by the batch in Python
            "fvu": fvu,
            "dead_fraction": dead.float().mean(),
            "penalty_seconds": penalty_s,
            "penalty_value": penalty_value,
        }
        self.step += 1
        return self.log.finish(dp.global_stats(raw), len(x))
