"""Stage `train` / `train_baseline`: one SAE, with or without the orthogonality term
(library: sae_ortho/training/train.py, trainer.py).

`--seed N` trains one of the stability analysis's extra seeds (stages `train_seed@N`, `train_baseline_seed@N`)
into models/seeds/<name>_s<N>, metrics/train/seeds/<name>_s<N>.json; without it, the default SAE at `sae_seed`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import replace
from pathlib import Path

from sae_ortho.base import device, dist
from sae_ortho.base import params as params_mod
from sae_ortho.base.io import atomic_write_text
from sae_ortho.base.paths import ACTIVATIONS, CORPUS
from sae_ortho.data.stream import training_shards
from sae_ortho.training.batches import ShardSource
from sae_ortho.training.run_config import run_config
from sae_ortho.training.step_log import NonFiniteLoss
from sae_ortho.training.train import METRICS, MODELS, train


def lm_or_exit(p: params_mod.Params):
    from sae_ortho.data.lm import load_model_or_exit  # transformer_lens: imported only when streaming

    return load_model_or_exit(p)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", choices=["baseline", "ortho"], required=True)
    parser.add_argument("--seed", type=int, default=None, help="an extra SAE seed (default: sae_seed)")
    args = parser.parse_args()
    p = params_mod.load_or_exit()
    if args.seed is None:
        models, metrics_dir, run_name = MODELS, METRICS, args.name
    else:
        models, metrics_dir, run_name = MODELS / "seeds", METRICS / "seeds", f"{args.name}_s{args.seed}"
    ckpt = models / f".ckpt_{run_name}"  # removed when training ends, the streamed run's token ids with it
    processes = p.dist.nproc_per_node * p.dist.nnodes
    if p.train.batch_size % processes:
        sys.exit(f"error: train.batch_size ({p.train.batch_size}) must be a multiple of the {processes} processes")
    dist.launch(p.dist, "stages.train")  # dist.nproc_per_node > 1: rerun under torchrun, exit with it
    with dist.process_group(p.dist, p.torch_device):
        dev = dist.rank_device(p.torch_device)
        try:  # stream: the extraction's shards computed by the LM when the shuffler needs them
            lm = lambda: lm_or_exit(replace(p, device=str(dev)))  # noqa: E731
            shards = training_shards(p, ACTIVATIONS, CORPUS, ckpt / "stream_tokens", lm)
        except (FileNotFoundError, ValueError) as err:
            sys.exit(f"error: {err}")
        if shards.n_tokens < p.train.batch_size:
            sys.exit(f"error: the training data holds {shards.n_tokens} tokens, fewer than train.batch_size")
        cfg = run_config(p, args.name, args.seed)
        metrics = run(p, cfg, shards, models / run_name, ckpt, metrics_dir / f"{run_name}_live", dev)
    if dist.is_main():
        record = {"seed": cfg.seed, **metrics, **device.record(p.torch_device), "processes": dist.world_size()}
        atomic_write_text(metrics_dir / f"{run_name}.json", json.dumps(record, indent=2) + "\n")
        print(json.dumps(metrics))


def run(p: params_mod.Params, cfg, shards, out_dir: Path, ckpt: Path, live_dir: Path, dev) -> dict:
    """Train, with dvclive on rank 0 (the only rank that writes)."""
    from dvclive import Live

    live = None
    if dist.is_main():
        live_dir.parent.mkdir(parents=True, exist_ok=True)
        live = Live(str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None, resume=False)
    with live if live is not None else contextlib.nullcontext():
        try:
            names = shards.manifest["model"], shards.manifest["hook_name"]
            source = ShardSource(shards, p.train.buffer_shards)
            return train(cfg, source, out_dir, ckpt, *names, live, device=dev)
        except NonFiniteLoss as err:
            sys.exit(f"error: {err}; last good state kept in {ckpt / 'last_good'}")


if __name__ == "__main__":
    main()
