"""Stage `llm_cache`: every LLM-side computation the evaluations need, run once for all SAEs.

- data/heldout/: held-out contexts (documents after the training stream), their activations and the
  clean / zero- / mean-ablation CE losses (library: sae_ortho/evaluation/heldout.py);
- data/probe_acts/: per-token residuals of the probing examples and the LLM-residual probe
  baseline (library: sae_ortho/evaluation/probe_cache.py).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from sae_ortho.base import dist
from sae_ortho.base import params as params_mod
from sae_ortho.base.io import atomic_write_text
from sae_ortho.base.paths import ACTIVATIONS, CORPUS, HELDOUT, PROBE_ACTS, PROBING_DATA
from sae_ortho.data.lm import load_model_or_exit
from sae_ortho.data.shards import ActivationShards
from sae_ortho.evaluation.heldout import build_heldout
from sae_ortho.evaluation.probe_cache import check_tasks_available, collect_probe_activations

PROBING = PROBING_DATA
METRICS = Path("metrics/llm_cache.json")


def main() -> None:
    p = params_mod.load_or_exit()
    try:
        activations = ActivationShards(ACTIVATIONS)
        check_tasks_available(p, PROBING)  # hub tasks offline, missing task files: fail before the model loads
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    dist.launch(p.dist, "stages.llm_cache")  # dist.nproc_per_node > 1: rerun under torchrun, exit with it
    with dist.process_group(p.dist, p.torch_device):
        t0 = time.perf_counter()
        model = load_model_or_exit(replace(p, device=str(dist.rank_device(p.torch_device))))
        load_s = time.perf_counter() - t0
        try:
            t1 = time.perf_counter()  # the held-out set on rank 0 (16k tokens); the probe texts over every rank
            heldout = build_heldout(model, p, CORPUS, activations, HELDOUT) if dist.is_main() else {}
            heldout_s = time.perf_counter() - t1
            t2 = time.perf_counter()
            probing = collect_probe_activations(model, p, PROBING, PROBE_ACTS)
            probing_s = time.perf_counter() - t2
        except ValueError as err:
            sys.exit(f"error: {err}")
    if not dist.is_main():
        return
    metrics = {
        "heldout_tokens": heldout["n_tokens"],
        "heldout_docs": heldout["doc_split"]["heldout_docs"],
        "ce_clean": round(heldout["ce_clean"], 5),
        "ce_zero_ablation": round(heldout["ce_zero_ablation"], 5),
        "ce_mean_ablation": round(heldout["ce_mean_ablation"], 5),
        "probing": probing,
        "processes": dist.world_size(),
        "seconds": {
            "model_load": round(load_s, 1),
            "heldout": round(heldout_s, 1),
            "probing": round(probing_s, 1),
            "total": round(time.perf_counter() - t0, 1),
        },
    }
    METRICS.parent.mkdir(exist_ok=True)
    atomic_write_text(METRICS, json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
