"""Stage `lm_<group>@...` (study/dvc.yaml): one study SAE on the LM's activations, trained and evaluated.

`--group sweep|ablation` trains a cheap SAE (study `sweep_tokens`) of that group's arm and measures its
cost (core metrics: the selection rule's FVU and CE); `--group headline --seed S` the full-size SAE of a
headline arm at SAE seed S, with SAEBench probing, on `headline_heldout_contexts` held-out contexts, and
first-letter absorption on the first headline seed;
`--group scaling --tokens N` a headline arm at N training tokens, with absorption. Writes
models/study/<group>/<run>/ (SAE, pair log, full evaluation records in eval/) and
metrics/study/<group>/<run>.json (compact figures).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from sae_ortho.base import dist
from sae_ortho.base import params as params_mod
from sae_ortho.base.io import atomic_write_text
from sae_ortho.base.paths import ACTIVATIONS, CORPUS
from sae_ortho.base.study_params import load_study_or_exit
from sae_ortho.data.lm import load_model_or_exit
from sae_ortho.data.stream import training_shards
from sae_ortho.study.arms import arm_spec, run_config_for
from sae_ortho.study.evaluate import BrokenSAE, evaluate, pair_stability
from sae_ortho.training.batches import ShardSource
from sae_ortho.training.step_log import NonFiniteLoss
from sae_ortho.training.train import train

MODELS = Path("models/study")
METRICS = Path("metrics/study")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--group", choices=["sweep", "ablation", "headline", "scaling"], required=True)
    parser.add_argument("--arm", required=True)
    parser.add_argument("--seed", type=int, default=None, help="headline: the SAE seed")
    parser.add_argument("--tokens", type=int, default=None, help="scaling: training tokens")
    args = parser.parse_args()
    p = params_mod.load_or_exit()
    study = load_study_or_exit()
    spec_group = "headline" if args.group == "scaling" else args.group
    try:
        spec = arm_spec(study, spec_group, args.arm)
    except params_mod.ParamError as err:
        sys.exit(f"error: {err}")
    seed = args.seed if args.seed is not None else p.sae_seed
    tokens = {"sweep": study.sweep_tokens, "ablation": study.sweep_tokens, "headline": p.train.train_tokens}.get(
        args.group, args.tokens
    )
    if tokens is None or tokens < p.train.batch_size:
        sys.exit(f"error: --tokens must be >= train.batch_size ({p.train.batch_size}), got {tokens}")
    run = {"headline": f"{args.arm}_s{seed}", "scaling": f"{args.arm}_t{tokens}"}.get(args.group, args.arm)
    train_params = replace(p.train, train_tokens=tokens, snapshots=0)
    cfg = run_config_for(spec, p, train_params, seed, study.topk_fraction)
    out_dir, ckpt = MODELS / args.group / run, MODELS / args.group / f".ckpt_{run}"
    processes = p.dist.nproc_per_node * p.dist.nnodes
    if p.train.batch_size % processes:
        sys.exit(f"error: train.batch_size ({p.train.batch_size}) must be a multiple of the {processes} processes")
    dist.launch(p.dist, "stages.study_lm")  # dist.nproc_per_node > 1: train under torchrun, evaluate on rank 0
    with dist.process_group(p.dist, p.torch_device):
        dev = dist.rank_device(p.torch_device)
        model = load_model_or_exit(replace(p, device=str(dev)))  # before training: a missing model fails at once
        try:  # train.source: stream reads the extraction's index and computes its shards with the model
            shards = training_shards(p, ACTIVATIONS, CORPUS, ckpt / "stream_tokens", lambda: model)
        except (FileNotFoundError, ValueError) as err:
            sys.exit(f"error: {err}")
        t0 = time.perf_counter()
        try:
            names = shards.manifest["model"], shards.manifest["hook_name"]
            source = ShardSource(shards, p.train.buffer_shards)
            training = train(cfg, source, out_dir, ckpt, *names, device=dev)
        except NonFiniteLoss as err:
            sys.exit(f"error: {err}; last good state kept in {ckpt / 'last_good'}")
    if not dist.is_main():  # the evaluations run once, on rank 0 (seconds to minutes against training)
        return
    train_seconds = time.perf_counter() - t0
    torch.set_num_threads(2)
    try:
        # First-letter absorption is not meaningful on a 250k-token SAE (at most 5 letters carried), so the
        # sweep and the ablation measure only the cost; probing (~90 s an SAE) is a secondary figure.
        # Headline SAEs: probing on every seed, core metrics on >= 16k held-out tokens; first-letter absorption
        # (secondary: not meaningful at this scale) on the first seed and the scaling runs only.
        with_probing = args.group == "headline"
        with_absorption = args.group == "scaling" or (args.group == "headline" and seed == study.headline_seeds[0])
        contexts = study.headline_heldout_contexts if args.group == "headline" else study.heldout_contexts
        figures = evaluate(out_dir, p, model, with_probing, contexts, with_absorption=with_absorption)
    except BrokenSAE as err:
        shutil.rmtree(out_dir, ignore_errors=True)  # nothing DVC could cache from a broken run
        sys.exit(f"error: {args.group}/{run}: {err}")
    keep = ("fvu", "l0", "dead_fraction", "tau", "mean_abs_cos", "penalty_overhead", "seconds")
    metrics = {
        "arm": args.arm,
        "seed": seed,
        "train_tokens": tokens,
        "settings": {k: v for k, v in spec.__dict__.items() if v is not None},
        **figures,
        "train": {k: training[k] for k in keep if k in training},
        "pair_stability": pair_stability(out_dir, p.train.d_sae),
        "stage_seconds": round(time.perf_counter() - t0, 1),
        "train_seconds": round(train_seconds, 1),
        "processes": dist.world_size(),
    }
    (METRICS / args.group).mkdir(parents=True, exist_ok=True)
    atomic_write_text(METRICS / args.group / f"{run}.json", json.dumps(metrics, indent=2, default=list) + "\n")
    print(json.dumps({k: metrics.get(k) for k in ("core", "absorption")}))


if __name__ == "__main__":
    main()
