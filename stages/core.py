"""Stage `core@<sae>`: held-out core metrics of one SAE (library: sae_ortho/evaluation/core.py).

`python -m stages.core --sae NAME --dir SAE_DIR` -> metrics/core/NAME.json, and per-context sums in
data/core/NAME.safetensors (for confidence intervals on differences between SAEs). Exits non-zero when a
figure means a broken SAE or pipeline (FVU >= 1, CE recovered < 0, all latents dead, NaN).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from sae_ortho.base.io import atomic_file
from sae_ortho.base.paths import CORE_PER_CONTEXT, HELDOUT
from sae_ortho.data.lm import load_model_or_exit
from sae_ortho.evaluation.core import core_metrics, science_failures
from sae_ortho.evaluation.heldout import HeldoutSet
from sae_ortho.evaluation.stage_io import SAEStage

METRICS = Path("metrics/core")


def main() -> None:
    stage = SAEStage.from_argv(__doc__, METRICS, threads=torch.get_num_threads())
    try:
        hs = HeldoutSet.load(HELDOUT)
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")
    sae = stage.load_sae(HELDOUT, hs.manifest["hook_name"])
    model = load_model_or_exit(stage.params)
    with torch.no_grad():
        metrics = core_metrics(sae, model, hs, stage.params.core)
    per_context = metrics.pop("per_context")
    with atomic_file(CORE_PER_CONTEXT / f"{stage.name}.safetensors", digest=True) as tmp:
        save_file({k: v.contiguous() for k, v in per_context.items()}, str(tmp))
    metrics = stage.write(metrics)
    stage.fail_on("core", science_failures(metrics))
    keys = ("l0", "fvu", "fvu_outside_tail", "ce_recovered_vs_zero", "kl_with_sae", "dead_fraction")
    print(json.dumps({k: round(metrics[k], 4) for k in keys}))


if __name__ == "__main__":
    main()
