"""Held-out tokens and the cached downstream path used for CE-loss metrics (stage `llm_cache`).

The held-out set is whole contexts built, exactly as the extract stage builds training contexts
(BOS, then the document stream with an EOS after each document), from the documents that come
*after* the last document the training stream touched, so no held-out token was ever trained on
and the training shards stay as they are. Stored per context: token ids, the residual entering
block `layer` (`resid_pre`, where the cached downstream runs start) and the activation at the
SAE's hook, both fp32; plus per-token CE losses of the clean run and of zero- and mean-ablation.

Why start from `resid_pre` of the hooked block rather than the hook itself: it serves every hook
point (resid_pre, resid_mid, resid_post) with one code path; the hook then fires inside block
`layer`, where the splice replaces it. Recomputing that one block costs ~1/24 of a run. Every CE
figure (clean, ablations, each SAE) goes through this same function with the same batches, so
an SAE that returns its input recovers exactly 1.0 and one that returns zeros exactly 0.0.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from sae_ortho.base.device import HOST
from sae_ortho.base.io import atomic_dir, atomic_write_text, verified
from sae_ortho.base.params import Params
from sae_ortho.data.extract import document_tokens, fill_stream
from sae_ortho.data.shards import ActivationShards

TENSORS = "heldout.safetensors"
MANIFEST = "manifest.json"
Reconstruct = Callable[[torch.Tensor], torch.Tensor]  # raw activations [..., d] -> replacement [..., d]


class AllPositions:
    """A replacement spliced at every position, BOS included: SAELens's and SAEBench's zero-ablation
    (`get_recons_loss`) zeroes BOS too, so its CE is higher (15.0 vs 10.8 nats at the default) and the
    recovered fraction against it lower. The project's own convention leaves BOS alone."""

    def __init__(self, reconstruct: Reconstruct):
        self.reconstruct = reconstruct


def last_training_doc(activations: ActivationShards) -> int:
    """doc_id of the last document the training stream reached (documents are read in corpus order)."""
    return int(activations.index(len(activations) - 1).column("doc_id").to_numpy().max())


def heldout_contexts(corpus: Path, tokenizer, first_doc: int, body_len: int, n_contexts: int) -> tuple:
    """(token ids [n, body_len], doc ids [n, body_len]) from documents with doc_id >= first_doc."""
    n = n_contexts * body_len
    token_ids = np.empty(n, dtype=np.int64)
    doc_ids = np.empty(n, dtype=np.int64)
    filled = fill_stream(document_tokens(corpus, tokenizer, first_doc), token_ids, doc_ids)
    if filled == n:
        return token_ids.reshape(n_contexts, body_len), doc_ids.reshape(n_contexts, body_len)
    raise ValueError(
        f"heldout.n_tokens: the {corpus} documents after the training stream (doc_id >= {first_doc}) give only "
        f"{filled} tokens; lower heldout.n_tokens or extract.n_tokens"
    )


@dataclass
class HeldoutSet:
    """The cached held-out tensors (all [n_contexts, context_len, ...], BOS at position 0)."""

    tokens: torch.Tensor  # int64
    resid_pre: torch.Tensor  # fp32, entering block `layer`
    acts: torch.Tensor  # fp32, at the SAE's hook
    manifest: dict
    refs: dict[str, torch.Tensor] = field(default_factory=dict)  # reference per-token CE / KL (ce_clean, ce_zero, ...)

    def contexts(self, start: int, stop: int) -> HeldoutSet:
        """Contexts [start, stop) (every tensor's first axis is the context)."""
        stop = min(stop, len(self.tokens))
        cut = {k: v[start:stop] for k, v in self.refs.items()}
        manifest = {
            **self.manifest,
            "n_contexts": stop - start,
            "n_tokens": (stop - start) * (self.tokens.shape[1] - 1),
        }
        return HeldoutSet(self.tokens[start:stop], self.resid_pre[start:stop], self.acts[start:stop], manifest, cut)

    @classmethod
    def load(cls, directory: Path | str) -> HeldoutSet:
        directory = Path(directory)
        if not (directory / MANIFEST).exists():
            raise FileNotFoundError(f"{directory / MANIFEST} not found: run the llm_cache stage (dvc repro llm_cache)")
        t = load_file(str(verified(directory / TENSORS)))
        refs = {k: v for k, v in t.items() if k.startswith(("ce_", "kl_"))}
        return cls(t["tokens"], t["resid_pre"], t["acts"], json.loads(verified(directory / MANIFEST).read_text()), refs)

    def token_acts(self) -> torch.Tensor:
        """Hook activations of the non-BOS positions, [n_tokens, d_in]: what SAE metrics are computed on."""
        return self.acts[:, 1:].reshape(-1, self.acts.shape[-1])

    def batches(self, batch_size: int) -> Iterator[slice]:
        for start in range(0, len(self.tokens), batch_size):
            yield slice(start, start + batch_size)


def splice_hook(reconstruct: Reconstruct | None):
    """Hook that replaces every non-BOS position by `reconstruct(activation)` (BOS is never spliced:
    no SAE here saw it in training)."""

    def hook(act: torch.Tensor, hook) -> torch.Tensor:
        if reconstruct is None:
            return act
        if isinstance(reconstruct, AllPositions):
            return reconstruct.reconstruct(act).to(act.dtype)
        out = act.clone()
        out[:, 1:] = reconstruct(act[:, 1:]).to(act.dtype)
        return out

    return hook


VOCAB_CHUNK = 16384  # unembedding columns at a time: [b, T, chunk] logits, never [b, T, vocab] (1 GB at 256k)


@torch.no_grad()
def final_residual(
    model, hs: HeldoutSet, rows: slice, layer: int, hook_name: str, reconstruct: Reconstruct | None
) -> torch.Tensor:
    """ln_final of the residual after the last block [b, T, d_model], run from block `layer` on with the hook
    spliced: what the unembedding reads, kept instead of the logits."""
    hooks = [(hook_name, splice_hook(reconstruct))] if reconstruct is not None else []
    resid = hs.resid_pre[rows].to(model.cfg.device, model.cfg.dtype)  # stored fp32 on the host
    with model.hooks(fwd_hooks=hooks):
        out = model(resid, start_at_layer=layer, stop_at_layer=model.cfg.n_layers)
    ln_final = getattr(model, "ln_final", None)  # absent in models without a final norm
    return (out if ln_final is None else ln_final(out))[:, 1:-1]  # predictions at non-BOS positions 1..T-2


def _logits(model, h: torch.Tensor, start: int) -> torch.Tensor:
    return (h @ model.W_U[:, start : start + VOCAB_CHUNK] + model.b_U[start : start + VOCAB_CHUNK]).float()


def log_normaliser(model, h: torch.Tensor) -> torch.Tensor:
    """logsumexp of the logits over the vocabulary, [b, T-2], chunk by chunk (fp32)."""
    out = None
    for start in range(0, model.cfg.d_vocab, VOCAB_CHUNK):
        part = _logits(model, h, start).logsumexp(-1)
        out = part if out is None else torch.logaddexp(out, part)
    return out


def token_losses(model, h: torch.Tensor, lse: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """CE of the next token at positions 1..T-2, [b, T-2]: logsumexp minus the target's logit."""
    targets = tokens[:, 2:].to(h.device)
    target_logit = (h * model.W_U.T[targets]).sum(-1).float() + model.b_U[targets].float()
    return lse - target_logit


def token_kl(model, h_clean: torch.Tensor, lse_clean: torch.Tensor, h: torch.Tensor, lse: torch.Tensor):
    """KL(clean || spliced) at positions 1..T-2, [b, T-2], summed over vocabulary chunks."""
    total = torch.zeros_like(lse)
    for start in range(0, model.cfg.d_vocab, VOCAB_CHUNK):
        clean_logp = _logits(model, h_clean, start) - lse_clean[..., None]
        logp = _logits(model, h, start) - lse[..., None]
        total += (clean_logp.exp() * (clean_logp - logp)).sum(-1)
    return total


@torch.no_grad()
def spliced_losses(
    model,
    hs: HeldoutSet,
    reconstructions: dict[str, Reconstruct | None],
    batch_size: int,
    progress_bar: bool = True,
    desc: str = "CE runs",
    with_kl: bool = True,
) -> dict[str, dict[str, torch.Tensor]]:
    """Per-token CE and KL(clean || run) for each named reconstruction (None = the clean run); without
    `with_kl` and a clean run the clean pass is skipped (CE only: half the cost).

    Logits are never held whole: each run keeps its final residual, and CE and KL are reduced over
    vocabulary chunks (a [b, T, vocab] fp32 tensor is 1 GB at 8 x 128 x Gemma's 256k tokens). The clean run
    is recomputed batch by batch, which also makes KL exactly 0 for a reconstruction that returns its input.
    """
    layer, hook_name = hs.manifest["layer"], hs.manifest["hook_name"]
    out: dict[str, dict[str, list]] = {name: {"ce": [], "kl": []} for name in reconstructions}
    need_clean = with_kl or any(r is None for r in reconstructions.values())
    n_batches = math.ceil(len(hs.tokens) / batch_size)
    for rows in tqdm(hs.batches(batch_size), total=n_batches, desc=desc, disable=not progress_bar):
        clean = None
        if need_clean:
            h = final_residual(model, hs, rows, layer, hook_name, None)
            clean = (h, log_normaliser(model, h))
        for name, reconstruct in reconstructions.items():
            if reconstruct is None:
                h, lse = clean
            else:
                h = final_residual(model, hs, rows, layer, hook_name, reconstruct)
                lse = log_normaliser(model, h)
            out[name]["ce"].append(token_losses(model, h, lse, hs.tokens[rows]).to(HOST))
            if clean is not None:
                out[name]["kl"].append(token_kl(model, *clean, h, lse).to(HOST))
    return {name: {k: torch.cat(v) for k, v in parts.items() if v} for name, parts in out.items()}


def training_mean(activations: ActivationShards) -> torch.Tensor:
    """Mean training activation (fp64 accumulation): the mean-ablation value."""
    return (activations.activation_sum() / activations.n_tokens).float()


@torch.no_grad()
def build_heldout(
    model, p: Params, corpus: Path, activations: ActivationShards, out_dir: Path, progress_bar: bool = True
) -> dict:
    """Write the held-out set and its reference CE losses to `out_dir` (atomically); return its manifest."""
    body_len = p.extract.context_len - 1
    n_contexts = math.ceil(p.heldout.n_tokens / body_len)
    last_train = last_training_doc(activations)
    token_ids, doc_ids = heldout_contexts(corpus, model.tokenizer, last_train + 1, body_len, n_contexts)
    bos = torch.full((n_contexts, 1), model.tokenizer.bos_token_id, dtype=torch.int64)
    tokens = torch.cat([bos, torch.from_numpy(token_ids)], dim=1)

    store: dict[str, torch.Tensor] = {}
    start_hook = f"blocks.{p.layer}.hook_resid_pre"

    def save(act: torch.Tensor, hook) -> None:
        store[hook.name] = act

    resid, acts = [], []
    hb = p.heldout.batch_size
    for start in tqdm(range(0, n_contexts, hb), desc="held-out activations", disable=not progress_bar):
        model.run_with_hooks(
            tokens[start : start + hb],
            stop_at_layer=p.layer + 1,
            fwd_hooks=[(start_hook, save), (p.hook_name, save)],
        )
        resid.append(store[start_hook].float())
        acts.append(store[p.hook_name].float())
    hs = HeldoutSet(tokens, torch.cat(resid), torch.cat(acts), {"layer": p.layer, "hook_name": p.hook_name})

    mean = training_mean(activations)
    refs = spliced_losses(
        model,
        hs,
        {
            "clean": None,
            "zero": torch.zeros_like,
            "mean": lambda x: mean.expand_as(x),
            "zero_all": AllPositions(torch.zeros_like),  # SAELens / SAEBench convention
        },
        hb,
        progress_bar,
        desc="clean / zero / mean-ablation runs",
    )
    norms = hs.token_acts().norm(dim=-1)
    manifest = {
        "model": p.model,
        "layer": p.layer,
        "hook_name": p.hook_name,
        "context_len": p.extract.context_len,
        "n_contexts": n_contexts,
        "n_tokens": n_contexts * body_len,
        "batch_size": hb,
        "doc_split": {
            "training_stream_docs": [0, last_train],
            "training_note": "the training stream reads documents in corpus order and stops inside doc "
            f"{last_train}; held-out contexts start at the next document",
            "heldout_docs": [int(doc_ids.min()), int(doc_ids.max())],
        },
        "ce_positions": "next-token CE at positions 1..T-2 of each context (BOS position excluded)",
        "ce_clean": refs["clean"]["ce"].mean().item(),
        "ce_zero_ablation": refs["zero"]["ce"].mean().item(),
        "ce_mean_ablation": refs["mean"]["ce"].mean().item(),
        "ce_zero_ablation_all_positions": refs["zero_all"]["ce"].mean().item(),
        "kl_zero_ablation": refs["zero"]["kl"].mean().item(),
        "kl_mean_ablation": refs["mean"]["kl"].mean().item(),
        "norm_median": norms.median().item(),
        "mean_ablation": "mean of the training activations (data/activations)",
    }
    with atomic_dir(out_dir, digests=True) as tmp:
        save_file(
            {
                "tokens": tokens,
                "doc_ids": torch.from_numpy(doc_ids),
                "resid_pre": hs.resid_pre.contiguous(),
                "acts": hs.acts.contiguous(),
                "train_mean": mean,
                **{f"ce_{name}": r["ce"].contiguous() for name, r in refs.items()},
                **{f"kl_{name}": r["kl"].contiguous() for name, r in refs.items() if name != "clean"},
            },
            str(tmp / TENSORS),
        )
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
    return manifest
