"""Streamed activations (`train.source: stream`): the extraction's shards computed from the LM when the
trainer asks for them, for runs where storing activations is impractical (gemma-2-2b at 500M tokens is
about 2.3 TB of fp16 shards).

`StreamedShards` has the interface the shuffler reads from `ActivationShards` (`len`, `d_in`, `load(i)`,
`manifest`), and shard i holds exactly what extraction stores as shard i: the same contexts from the same
tokenisation, the same batches (they restart at every shard) and the same stored dtype. So the shuffler
draws the same batches for the same seed, and a resumed run replays its stream like the stored one does.
The input scale's mean norm comes from the extraction's manifest when one is given (the DVC pipeline's
`extract` stage writes an index-only directory for `train.source: stream`, norm statistics included): then
the streamed run is the stored run, bit for bit. Without one it is estimated from the first `norm_shards`
shards (SAELens's activation store estimates it from a few batches too). A resumed run recomputes the shards
it already consumed (the shuffle buffer carries rows across shards, so they cannot be skipped).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sae_ortho.base import params as params_mod
from sae_ortho.base.io import sha256_file
from sae_ortho.data.extract import capture_fn, fingerprint, shard_activations, shard_layout, tokenise
from sae_ortho.data.shards import DTYPES, ActivationShards, token_norms


class StreamedShards:
    """The extraction's shard layout over `corpus`, each shard computed by `model` on demand."""

    def __init__(
        self,
        p: params_mod.Params,
        model,
        corpus: Path,
        token_dir: Path,
        norm_shards: int = 2,
        extraction: dict | None = None,
    ):
        ex = p.extract
        self.body_len, n_contexts, self.per_shard, self.n_shards = shard_layout(ex)
        self.n_contexts = n_contexts
        self.bos = model.tokenizer.bos_token_id
        if self.bos is None:
            raise ValueError(f"model {p.model} has no BOS token; streaming prepends BOS to every context")
        token_dir.mkdir(parents=True, exist_ok=True)
        self.token_ids, _ = tokenise(corpus, model.tokenizer, self.body_len, n_contexts, token_dir)
        self.run = capture_fn(model, p.hook_name, stop_at_layer=p.layer + 1)
        self.batch_size, self.dtype, self.lm_device = ex.batch_size, DTYPES[ex.dtype], model.cfg.device
        self.d_in = int(model.cfg.d_model)
        self.shards_computed = 0  # LM passes over a shard, resumes and epochs included
        if extraction is not None:
            self._check_layout(extraction, p)
            norm = {"mean": extraction["norm"]["mean"], "from": "the extraction's manifest"}
            scale_key = "manifest"
        else:  # summed per shard as the manifest's statistics are: over all shards, the stored run's bits
            norms = [token_norms(self.load(i)) for i in range(min(norm_shards, self.n_shards))]
            norm = {"mean": sum(float(n.sum()) for n in norms) / sum(n.size for n in norms)}
            norm["estimated_from_tokens"] = sum(n.size for n in norms)
            scale_key = str(norm_shards)
        corpus_fp = fingerprint(p, sha256_file(corpus))
        self.manifest = {
            "model": p.model,
            "hook_name": p.hook_name,
            "d_in": self.d_in,
            "n_tokens": n_contexts * self.body_len,
            "norm": norm,
            # A streamed run never resumes from a checkpoint taken at another input scale.
            "fingerprint": hashlib.sha256(f"{corpus_fp}:stream:{scale_key}".encode()).hexdigest(),
            "source": "stream",
        }

    def _check_layout(self, extraction: dict, p: params_mod.Params) -> None:
        """The extraction's manifest describes the shards this stream computes, or a one-line error."""
        want = {
            "model": p.model,
            "hook_name": p.hook_name,
            "context_len": p.extract.context_len,
            "dtype": p.extract.dtype,
            "n_shards": self.n_shards,
            "n_contexts": self.n_contexts,
        }
        stale = [k for k, v in want.items() if extraction.get(k) != v]
        if stale:
            raise ValueError(f"the extraction's manifest differs from params.yaml in {', '.join(stale)}: rerun extract")

    @property
    def n_tokens(self) -> int:
        return self.manifest["n_tokens"]

    def __len__(self) -> int:
        return self.n_shards

    def load(self, i: int) -> torch.Tensor:
        first = i * self.per_shard
        count = min(self.per_shard, self.n_contexts - first)
        token_ids = np.array(self.token_ids[first : first + count])
        self.shards_computed += 1
        with torch.inference_mode():
            return shard_activations(self.run, token_ids, self.bos, self.batch_size, self.dtype, self.lm_device)


def training_shards(p: params_mod.Params, activations: Path, corpus: Path, token_dir: Path, load_model: Callable):
    """The training activations `train.source` names: the extraction's stored shards, or the stream over its
    index (the model from `load_model()`, called only then). A one-line ValueError / FileNotFoundError when
    the extraction cannot serve that source."""
    extraction = ActivationShards(activations)
    if p.train.source == "shards":
        if not extraction.stored:
            raise ValueError(
                f"{activations} holds only the shard index (extracted for train.source: stream): "
                "rerun the extract stage with train.source: shards"
            )
        return extraction
    return StreamedShards(p, load_model(), corpus, token_dir, extraction=extraction.manifest)
