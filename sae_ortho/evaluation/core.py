"""Core metrics of one SAE on the held-out set (stage `core@<sae>`).

Reconstruction (L0, FVU / explained variance over all tokens and outside the high-norm tail,
cosine of reconstruction), CE loss with the reconstruction spliced in at the hook against the
clean run and zero-/mean-ablation (both recovered fractions, KL to the clean logits), dead and
dense latents, and decoder geometry over all pairs and over the pairs the co-activation selector
keeps on held-out batches (for every SAE, so the baseline shows what the penalty changed).

Works on any object with `encode(x)`, `decode(f)` and `W_dec` [d_sae, d_in] on raw activations:
our `SAE` and its SAELens export give the same figures (cosines use normalised decoder rows, since
the export folds the input scale into them). Why hand-written rather than SAELens's or sae_bench's
core evals: both read a SAELens activation store and rerun the clean model for every SAE; here the
LLM side is computed once (stage llm_cache) and each SAE runs only the layers after its hook.
"""

from __future__ import annotations

import math

import torch

from sae_ortho.base.device import HOST
from sae_ortho.base.params import CoreParams
from sae_ortho.evaluation.heldout import HeldoutSet, spliced_losses
from sae_ortho.training.ortho import select_pairs

COS_THRESHOLDS = (0.3, 0.5, 0.9)


class ScienceCheckError(RuntimeError):
    """A metric that means the pipeline is broken (FVU >= 1, CE recovered < 0, NaN)."""


@torch.no_grad()
def encode_decode(sae, x: torch.Tensor, batch: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction [n, d_in], firing count per latent [d_sae], L0 per token [n]), in batches."""
    recon, counts, l0 = [], None, []
    device = sae.W_dec.device
    for start in range(0, len(x), batch):
        f = sae.encode(x[start : start + batch].to(device))
        active = f > 0
        counts = active.sum(0) if counts is None else counts + active.sum(0)
        l0.append(active.sum(1).to(HOST))
        recon.append(sae.decode(f).to(HOST))  # metrics are computed on the host, in float64
    return torch.cat(recon), counts.to(HOST), torch.cat(l0)


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2."""
    x, x_hat = x.double(), x_hat.double()
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def reconstruction_metrics(x: torch.Tensor, x_hat: torch.Tensor, tail_factor: float) -> dict:
    norms = x.norm(dim=-1)
    tail = norms > tail_factor * norms.median()
    cos = torch.nn.functional.cosine_similarity(x, x_hat, dim=-1)
    out = {
        "fvu": fvu(x, x_hat),
        "fvu_outside_tail": fvu(x[~tail], x_hat[~tail]),
        "cosine": float(cos.mean()),
        "tail_token_fraction": float(tail.float().mean()),
        "tail_variance_share": float(
            ((x[tail].double() - x.double().mean(0)) ** 2).sum() / ((x.double() - x.double().mean(0)) ** 2).sum()
        ),
        "tail_sq_error_share": float(((x - x_hat)[tail].double() ** 2).sum() / ((x - x_hat).double() ** 2).sum()),
        "mse_per_element": float(((x - x_hat).double() ** 2).mean()),
    }
    out["explained_variance"] = 1 - out["fvu"]
    out["explained_variance_outside_tail"] = 1 - out["fvu_outside_tail"]
    return out


def unit_rows(w_dec: torch.Tensor) -> torch.Tensor:
    w = w_dec.detach().float()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def cos_summary(abs_cos: torch.Tensor) -> dict:
    if abs_cos.numel() == 0:
        return {"n": 0}
    out = {
        "n": int(abs_cos.numel()),
        "mean_abs_cos": float(abs_cos.double().mean()),
        "max_abs_cos": float(abs_cos.max()),
    }
    for t in COS_THRESHOLDS:
        out[f"frac_above_{t}"] = float((abs_cos > t).double().mean())
    return out


@torch.no_grad()
def decoder_geometry_all_pairs(w_dec: torch.Tensor, block: int = 1024) -> dict:
    """|cos| over all d_sae (d_sae - 1) / 2 decoder pairs, in row blocks (no d_sae^2 matrix at once)."""
    w = unit_rows(w_dec)
    d = len(w)
    total, n, peak = 0.0, 0, 0.0
    above = dict.fromkeys(COS_THRESHOLDS, 0)
    for start in range(0, d, block):
        g = (w[start : start + block] @ w.T).abs()
        rows = torch.arange(start, min(start + block, d), device=w.device)[:, None]
        upper = g[torch.arange(d, device=w.device)[None, :] > rows]  # strict upper triangle of this block
        total += float(upper.double().sum())
        n += upper.numel()
        peak = max(peak, float(upper.max())) if upper.numel() else peak
        for t in COS_THRESHOLDS:
            above[t] += int((upper > t).sum())
    return {
        "n": n,
        "mean_abs_cos": total / n,
        "max_abs_cos": peak,
        **{f"frac_above_{t}": above[t] / n for t in COS_THRESHOLDS},
    }


@torch.no_grad()
def kept_pair_geometry(sae, x: torch.Tensor, batch_size: int, fraction: float) -> dict:
    """|cos| of the pairs the co-activation selector keeps, batch by batch, on held-out codes."""
    w = unit_rows(sae.W_dec)
    cos, distinct = [], set()
    for start in range(0, len(x) - batch_size + 1, batch_size):
        pairs = select_pairs(sae.encode(x[start : start + batch_size].to(w.device)).to(HOST), fraction)
        cos.append((w[pairs.i.to(w.device)] * w[pairs.j.to(w.device)]).sum(-1).abs().to(HOST))
        distinct.update(zip(pairs.i.tolist(), pairs.j.tolist(), strict=True))
    out = cos_summary(torch.cat(cos)) if cos else {"n": 0}
    out["n_batches"] = len(cos)
    out["distinct_pairs"] = len(distinct)
    return out


def ce_metrics(ce: dict[str, dict[str, torch.Tensor]], cached: dict[str, torch.Tensor]) -> dict:
    """CE losses, the recovered fractions and KL divergences.

    recovered vs zero = (CE_zero - CE_sae) / (CE_zero - CE_clean); the same with mean-ablation, and with
    SAELens's zero-ablation of every position (BOS included). The headline uses the first (BOS kept).
    CE_clean and KL come from this run's clean pass (same batches as the splice); the ablation
    losses are the llm_cache stage's, computed on the same path and batches.
    """
    clean, sae = ce["clean"]["ce"].mean().item(), ce["sae"]["ce"].mean().item()
    zero, mean = cached["ce_zero"].mean().item(), cached["ce_mean"].mean().item()
    zero_all = cached["ce_zero_all"].mean().item() if "ce_zero_all" in cached else math.nan
    return {
        "ce_clean": clean,
        "ce_with_sae": sae,
        "ce_zero_ablation": zero,
        "ce_mean_ablation": mean,
        "ce_recovered_vs_zero": (zero - sae) / (zero - clean),
        "ce_recovered_vs_mean": (mean - sae) / (mean - clean),
        # SAELens / SAEBench convention: zero-ablation at every position, BOS included (heldout.AllPositions)
        "ce_zero_ablation_all_positions": zero_all,
        "ce_recovered_vs_zero_all_positions": (zero_all - sae) / (zero_all - clean),
        "ce_increase": sae - clean,
        "kl_with_sae": ce["sae"]["kl"].mean().item(),
        "kl_zero_ablation": cached["kl_zero"].mean().item(),
        "kl_mean_ablation": cached["kl_mean"].mean().item(),
        "ce_clean_cached": cached["ce_clean"].mean().item(),
    }


def core_metrics(
    sae, model, hs: HeldoutSet, cp: CoreParams, progress_bar: bool = True, kl_contexts: int | None = None
) -> dict:
    """Every core metric of `sae` on the held-out set (see the module docstring). With `kl_contexts`, KL and the
    clean run come from the first that many contexts only, and CE with the SAE on the rest is set against the
    llm_cache stage's clean CE (the same path and batches): one LM pass instead of two there."""
    x = hs.token_acts()
    x_hat, counts, l0 = encode_decode(sae, x)
    freq = counts.double() / len(x)
    out = {
        "n_tokens": len(x),
        "l0": float(l0.double().mean()),
        **reconstruction_metrics(x, x_hat, cp.tail_factor),
        "dead_fraction": float((counts == 0).double().mean()),
        "dense_fraction": float((freq > cp.dense_threshold).double().mean()),
        "dead_definition": f"no activation on any of the {len(x)} held-out tokens",
    }
    splice = {"clean": None, "sae": lambda a: sae.decode(sae.encode(a))}
    n_kl = len(hs.tokens) if kl_contexts is None else min(kl_contexts, len(hs.tokens))
    batch = hs.manifest["batch_size"]
    ce = spliced_losses(model, hs.contexts(0, n_kl), splice, batch, progress_bar, desc="spliced CE and KL")
    if n_kl < len(hs.tokens):
        rest = hs.contexts(n_kl, len(hs.tokens))
        more = spliced_losses(model, rest, {"sae": splice["sae"]}, batch, progress_bar, "spliced CE", with_kl=False)
        ce["sae"]["ce"] = torch.cat([ce["sae"]["ce"], more["sae"]["ce"]])
        ce["clean"]["ce"] = torch.cat([ce["clean"]["ce"], rest.refs["ce_clean"]])
    out["kl_tokens"] = int(ce["sae"]["kl"].numel())
    out.update(ce_metrics(ce, hs.refs))
    out["decoder_all_pairs"] = decoder_geometry_all_pairs(sae.W_dec)
    out["decoder_kept_pairs"] = kept_pair_geometry(sae, x, cp.pair_batch_size, cp.pair_fraction)
    out["per_context"] = per_context_sums(x, x_hat, ce, hs.refs, len(hs.tokens))
    return out


def per_context_sums(x, x_hat, ce: dict, refs: dict, n_contexts: int) -> dict[str, torch.Tensor]:
    """Per held-out context: squared error, variance around the held-out mean, and summed CE (clean,
    with the SAE, zero- and mean-ablated). Differences between SAEs get confidence intervals from
    these by resampling contexts (tokens of one context are not independent)."""
    per = lambda t: t.reshape(n_contexts, -1).double().sum(1)  # noqa: E731
    return {
        "sq_err": per(((x - x_hat) ** 2).sum(-1)),
        "variance": per(((x - x.mean(0)) ** 2).sum(-1)),
        "ce_clean": per(ce["clean"]["ce"]),
        "ce_sae": per(ce["sae"]["ce"]),
        "ce_zero": per(refs["ce_zero"]),
        "ce_mean": per(refs["ce_mean"]),
    }


def science_failures(m: dict) -> list[str]:
    """Figures that mean a broken SAE or pipeline; the stage exits non-zero on any."""
    fails = []
    for key in ("fvu", "l0", "ce_with_sae", "ce_recovered_vs_zero", "kl_with_sae"):
        if not math.isfinite(m[key]):
            fails.append(f"{key} is {m[key]} (non-finite)")
    if m["fvu"] >= 1:
        fails.append(f"FVU {m['fvu']:.4f} >= 1: the SAE reconstructs worse than the mean activation")
    if m["ce_recovered_vs_zero"] < 0:
        fails.append(f"CE recovered {m['ce_recovered_vs_zero']:.4f} < 0: splicing the SAE is worse than zero-ablation")
    if m["dead_fraction"] >= 1:
        fails.append("every latent is dead on the held-out set")
    return fails
