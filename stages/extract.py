"""Stage `extract`: activations at the hook, as shards (library: sae_ortho/data/extract.py)."""

from __future__ import annotations

import json
import sys

from sae_ortho.base import params as params_mod
from sae_ortho.base.io import atomic_write_text
from sae_ortho.data.extract import CORPUS, METRICS, extract
from sae_ortho.data.lm import load_model_or_exit


def main() -> None:
    p = params_mod.load_or_exit()
    if not CORPUS.exists():
        sys.exit(f"error: {CORPUS} not found: run the corpus stage first (dvc repro corpus)")
    model = load_model_or_exit(p)
    if p.layer >= model.cfg.n_layers:
        sys.exit(f"error: params.yaml: layer: {p.layer} is beyond {p.model}'s {model.cfg.n_layers} layers")
    try:
        metrics = extract(p, model)
    except ValueError as err:
        sys.exit(f"error: {err}")
    METRICS.parent.mkdir(exist_ok=True)
    atomic_write_text(METRICS, json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
