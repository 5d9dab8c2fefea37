"""SAEBench sparse probing, SAE side (stage `probing@<sae>`, and the study's evaluation of its arms).

Per SAE, from the activations that stage `llm_cache` cached (evaluation/probe_cache.py, whose docstring
says what is reused from sae_bench unchanged and what is hand-written, and why): the SAE latents, pooled
over each example's unmasked tokens by sae_bench's `activation_collection.get_sae_meaned_activations`,
are probed exactly as the cached LLM-residual baseline was (probe_cache.probe_accuracies); then a
sanity check on the accuracies.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import math
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from sae_ortho.base.device import HOST
from sae_ortho.base.io import verified
from sae_ortho.base.params import Params
from sae_ortho.evaluation.probe_cache import (
    INDEX,
    LLM_RESULTS,
    MANIFEST,
    SPLITS,
    TaskActs,
    cache_meta,
    mean_accuracies,
    probe_accuracies,
)


class _Encoder:
    """What get_sae_meaned_activations uses: `.encode` and `.dtype` (an nn.Module such as our SAE has no dtype)."""

    def __init__(self, sae):
        self.sae = sae
        dtype = getattr(sae, "dtype", None)
        if not isinstance(dtype, torch.dtype):
            params = getattr(sae, "parameters", None)
            dtype = next(iter(params()), torch.empty(0)).dtype if callable(params) else torch.float32
        self.dtype = dtype

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae.encode(x.to(self.dtype))


def load_cache_manifest(acts_dir: Path, p: Params) -> dict:
    """The cache's manifest, after checking it was built for these parameters."""
    path = acts_dir / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run dvc repro llm_cache")
    manifest = json.loads(verified(path).read_text())
    stale = [k for k, v in cache_meta(p).items() if manifest.get(k) != v]
    if stale:
        raise ValueError(
            f"{acts_dir} was built with other {', '.join(stale)} than params.yaml: run dvc repro llm_cache"
        )
    return manifest


@torch.no_grad()
def sae_probe_results(sae, acts_dir: Path, p: Params, progress_bar: bool = True) -> dict:
    """SAEBench sparse-probing result for one SAE, from the cached activations (no model needed)."""
    from sae_bench.sae_bench_utils.activation_collection import get_sae_meaned_activations

    load_cache_manifest(acts_dir, p)
    llm = json.loads((acts_dir / LLM_RESULTS).read_text())["per_class"]
    index = pd.read_parquet(verified(acts_dir / INDEX))
    sae_pool = functools.partial(get_sae_meaned_activations, sae=_Encoder(sae), sae_batch_size=p.probing.batch_size)
    device = next(iter(sae.parameters())).device if hasattr(sae, "parameters") else HOST
    details, unstructured = [], {}
    for task in tqdm(p.probing.tasks, desc="SAE probes (tasks)", disable=not progress_bar):
        ta = TaskActs.load(acts_dir, task, index)
        pooled = {s: ta.pooled(s, sae_pool, p.probing.batch_size, device) for s in SPLITS}
        sae_acc = probe_accuracies(pooled["train"], pooled["test"], p.probing.k_values, "sae", p.probing.seed)
        unstructured[task] = {**llm[task], **sae_acc}
        details.append({"dataset_name": task, **mean_accuracies(unstructured[task])})
    keys = [k for k in details[0] if k != "dataset_name"]
    overall = {k: sum(d[k] for d in details) / len(details) for k in keys}
    return {
        "eval_type_id": "sparse_probing",
        "eval_config": {**cache_meta(p), "sae_bench_version": importlib.metadata.version("sae-bench")},
        "eval_result_metrics": {
            "llm": {k: v for k, v in overall.items() if k.startswith("llm_")},
            "sae": {k: v for k, v in overall.items() if k.startswith("sae_")},
        },
        "eval_result_details": details,
        "eval_result_unstructured": unstructured,  # per class, as SAEBench keeps it
    }


def check_probing_sanity(
    result: dict, k: int = 5, chance: float = 0.5, margin: float = 0.05, llm_min: float = 0.65
) -> list[str]:
    """Failures that mean a broken SAE or pipeline: on a task where the LLM residual's top-k probes are well
    above chance, the SAE's best top-k' probe for k' <= k is at chance; or any accuracy that is not finite.

    The best over k' <= k, not the top-k figure alone: sae_bench picks the top-k' latents by mean difference,
    so they are nested, and a probe on a superset can only do as well once fitted. Its unscaled
    LogisticRegression sometimes does worse (measured: a study SAE at top-1 0.753, top-5 0.522 on
    code_language), which is the probe's fit, not latents that lost what the residual carries."""
    fails = []
    for d in result["eval_result_details"]:
        task = d["dataset_name"]
        bad = [key for key, v in d.items() if key != "dataset_name" and not math.isfinite(v)]
        if bad:
            fails.append(f"{task}: non-finite accuracy in {', '.join(bad)}")
            continue
        ks = sorted(int(key.split("_")[2]) for key in d if key.startswith("sae_top_"))
        if not ks:
            continue
        kk = k if k in ks else max(ks)  # probing.k_values need not contain 5
        sae = max(d[f"sae_top_{j}_test_accuracy"] for j in ks if j <= kk)
        llm = d[f"llm_top_{kk}_test_accuracy"]
        if abs(sae - chance) <= margin and llm > llm_min:
            fails.append(
                f"{task}: SAE top-{kk} probe accuracy (best over top-1..{kk}) {sae:.3f} is within {margin} of chance "
                f"({chance}) while the LLM residual's is {llm:.3f}; the SAE latents lost what the residual carries "
                "(broken SAE or pipeline?)"
            )
    return fails
