"""Which training lever makes the SAEs carry first letters? Trains baseline SAEs (tau 0) that differ from
params.yaml's `train` section in one setting each, on the extracted activations, and scores each with
the first-letter evaluation (letter cache seed 0): letters whose best single latent reaches F1 > 0.6,
the k=1 probe's mean F1, FVU on the prompts. Writes metrics/letter_levers.json.

    python -m bench.letter_levers [--arms default lr1e-3 ...] [--letters data/letters] [--activations data/activations]

Needs `dvc repro extract letter_cache` first. Each arm costs one training run plus ~1 minute.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path

from sae_ortho.base import params as params_mod
from sae_ortho.base.io import atomic_write_text
from sae_ortho.data.shards import ActivationShards
from sae_ortho.evaluation.absorption import load_manifest, seed_result
from sae_ortho.training.run_config import RunConfig
from sae_ortho.training.sae import SAE
from sae_ortho.training.train import train

# name -> overrides of params.yaml's `train` section
ARMS: dict[str, dict] = {
    "default": {},
    "lr1e-3": {"lr": 1e-3},
    "lr2e-3": {"lr": 2e-3},
    "batch256": {"batch_size": 256, "warmup_steps": 200},
    "tokens2M": {"train_tokens": 2_000_000},
    "tokens3M": {"train_tokens": 3_000_000},
    "k16": {"k": 16},
    "width2304": {"d_sae": 2304},
    "lr4e-3": {"lr": 4e-3},
    "lr8e-3": {"lr": 8e-3},
    "lr2e-3_tokens2M": {"lr": 2e-3, "train_tokens": 2_000_000},
    "lr4e-3_tokens2M": {"lr": 4e-3, "train_tokens": 2_000_000},
    "lr4e-3_batch512": {"lr": 4e-3, "batch_size": 512, "warmup_steps": 100},
    "lr2e-3_batch256": {"lr": 2e-3, "batch_size": 256, "warmup_steps": 200},
    "lr2e-3_k16": {"lr": 2e-3, "k": 16},
    "lr2e-3_width2304": {"lr": 2e-3, "d_sae": 2304},
    "lr2e-3_width9216": {"lr": 2e-3, "d_sae": 9216},
    "lr2e-3_k8": {"lr": 2e-3, "k": 8},
    "lr2e-3_k12": {"lr": 2e-3, "k": 12},
    "lr2e-3_k16_width2304": {"lr": 2e-3, "k": 16, "d_sae": 2304},
    "lr2e-3_k16_tokens2M": {"lr": 2e-3, "k": 16, "train_tokens": 2_000_000},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--letters", type=Path, default=Path("data/letters"))
    parser.add_argument("--activations", type=Path, default=Path("data/activations"))
    parser.add_argument("--out", type=Path, default=Path("metrics/letter_levers.json"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore", module="sklearn")
    p = params_mod.load_or_exit()
    shards = ActivationShards(args.activations)
    manifest = load_manifest(args.letters)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for name in args.arms:
        tp = dataclasses.replace(p.train, **ARMS[name])
        work = Path(tempfile.mkdtemp(prefix=f"lever_{name}_"))
        try:
            t0 = time.perf_counter()
            trained = train(RunConfig(tp, p.seed), shards, work / "sae", work / ".ckpt", progress_bar=True)
            train_s = time.perf_counter() - t0
            sae = SAE.load(work / "sae").eval().to_saelens()
            t1 = time.perf_counter()
            r = seed_result(sae, args.letters, manifest, manifest["seeds"][0], p.absorption, name)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        results[name] = {
            "train_overrides": ARMS[name],
            "activations_tokens": shards.n_tokens,
            "letters_carried_by_one_latent": r["letters_carried_by_one_latent"],
            "carried_letters": r["carried_letters"],
            "k1_mean_f1": r["k1_mean_f1"],
            "fvu_on_prompts": r["fvu_on_prompts"],
            "train_fvu": trained["fvu"],
            "mean_absorption_fraction": r["mean_absorption_fraction"],
            "letters_probe_supported": r["letters_probe_supported"],
            "train_seconds": round(train_s, 1),
            "eval_seconds": round(time.perf_counter() - t1, 1),
        }
        print(name, json.dumps(results[name]), flush=True)
        atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
