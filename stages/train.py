"""Stage `train` / `train_baseline`: one SAE, with or without the orthogonality term (library: sae_ortho/train.py)."""

from __future__ import annotations

import argparse
import json
import sys

from sae_ortho import params as params_mod
from sae_ortho.shards import ActivationShards, atomic_write_text
from sae_ortho.train import ACTIVATIONS, METRICS, MODELS, NonFiniteLoss, run_config, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", choices=["baseline", "ortho"], required=True)
    args = parser.parse_args()
    p = params_mod.load_or_exit()
    try:
        shards = ActivationShards(ACTIVATIONS)
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")
    if shards.n_tokens < p.train.batch_size:
        sys.exit(f"error: {ACTIVATIONS} holds {shards.n_tokens} tokens, fewer than train.batch_size")
    cfg = run_config(p, args.name)
    from dvclive import Live

    METRICS.mkdir(parents=True, exist_ok=True)
    live_dir = METRICS / f"{args.name}_live"
    with Live(str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None, resume=False) as live:
        try:
            metrics = train(
                cfg,
                shards,
                MODELS / args.name,
                MODELS / f".ckpt_{args.name}",
                shards.manifest["model"],
                shards.manifest["hook_name"],
                live,
            )
        except NonFiniteLoss as err:
            sys.exit(f"error: {err}; last good state kept in {MODELS / f'.ckpt_{args.name}' / 'last_good'}")
    atomic_write_text(METRICS / f"{args.name}.json", json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
