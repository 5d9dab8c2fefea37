"""Stage `extract`: activations at the hook, as shards (library: sae_ortho/data/extract.py)."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

from sae_ortho.base import dist
from sae_ortho.base import params as params_mod
from sae_ortho.base.io import atomic_write_text
from sae_ortho.data.extract import CORPUS, METRICS, extract
from sae_ortho.data.lm import load_model_or_exit


def main() -> None:
    p = params_mod.load_or_exit()
    if not CORPUS.exists():
        sys.exit(f"error: {CORPUS} not found: run the corpus stage first (dvc repro corpus)")
    dist.launch(p.dist, "stages.extract")  # dist.nproc_per_node > 1: rerun under torchrun, exit with it
    with dist.process_group(p.dist, p.torch_device):
        model = load_model_or_exit(replace(p, device=str(dist.rank_device(p.torch_device))))
        if p.layer >= model.cfg.n_layers:
            sys.exit(f"error: params.yaml: layer: {p.layer} is beyond {p.model}'s {model.cfg.n_layers} layers")
        try:
            metrics = extract(p, model)
        except ValueError as err:
            sys.exit(f"error: {err}")
    if dist.is_main():
        METRICS.parent.mkdir(exist_ok=True)
        metrics["processes"] = dist.world_size()
        atomic_write_text(METRICS, json.dumps(metrics, indent=2) + "\n")
        print(json.dumps(metrics))


if __name__ == "__main__":
    main()
