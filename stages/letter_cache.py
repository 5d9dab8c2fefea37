"""Stage `letter_cache`: the LLM side of first-letter absorption, once for all SAEs
(library: sae_ortho/evaluation/letters.py).

data/letters/seed_<s>/: the letter probe and its data in sae_bench's layout, the absorption prompts
and their residuals at the word position; metrics/letter_cache.json: the probe's per-letter F1.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from sae_ortho.base import params as params_mod
from sae_ortho.base.io import atomic_write_text
from sae_ortho.base.paths import LETTERS
from sae_ortho.data.lm import load_model_or_exit
from sae_ortho.evaluation.letters import build_letter_cache, check_hook

LETTERS_DIR = LETTERS
METRICS = Path("metrics/letter_cache.json")


def main() -> None:
    p = params_mod.load_or_exit()
    try:
        check_hook(p)
    except ValueError as err:
        sys.exit(f"error: {err}")
    if "OMP_NUM_THREADS" not in os.environ:  # the machine is shared: 2 threads unless told otherwise
        torch.set_num_threads(2)
    t0 = time.perf_counter()
    model = load_model_or_exit(p)
    load_s = time.perf_counter() - t0
    try:
        manifest = build_letter_cache(model, p, LETTERS_DIR)
    except ValueError as err:
        sys.exit(f"error: {err}")
    gate = p.absorption.probe_f1_gate
    metrics = {
        "seeds": [
            {
                **{k: v for k, v in s.items() if k != "probe_f1"},
                f"letters_probe_f1_above_{gate}": sum(f > gate for f in s["probe_f1"].values()),
                "probe_f1": s["probe_f1"],
            }
            for s in manifest["seeds"]
        ],
        "vocabulary_size": manifest["vocabulary_size"],
        "sae_bench_version": manifest["sae_bench_version"],
        "seconds": {"model_load": round(load_s, 1), "total": round(time.perf_counter() - t0, 1)},
    }
    atomic_write_text(METRICS, json.dumps(metrics, indent=2) + "\n")
    for s in metrics["seeds"]:
        print(
            f"seed {s['seed']}: {s['words']} words, probe macro-F1 {s['probe_macro_f1']:.3f}, "
            f"{s[f'letters_probe_f1_above_{gate}']} letters above {gate}, {s['absorption_prompts']} absorption prompts"
        )


if __name__ == "__main__":
    main()
