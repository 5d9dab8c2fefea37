"""Stage `probing@<sae>`: SAEBench sparse probing of one SAE (library: sae_ortho/evaluation/probing.py).

`python -m stages.probing --sae NAME --dir SAE_DIR` -> metrics/sparse_probing/NAME.json, from the
activations cached by `llm_cache` in data/probe_acts (no model needed). Exits non-zero when the SAE's
top-5 probes sit at chance on a task where the LLM residual's do not (a broken SAE or pipeline).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from sae_ortho.base import params as params_mod
from sae_ortho.base.io import atomic_write_text
from sae_ortho.evaluation.probing import check_probing_sanity, load_cache_manifest, sae_probe_results
from sae_ortho.training.sae import CONFIG_FILE, SAE

PROBE_ACTS = Path("data/probe_acts")
METRICS = Path("metrics/sparse_probing")


def table(result: dict) -> str:
    """One line per task and a mean line: LLM / SAE accuracy with all dims and with each top-k."""
    keys = ["test_accuracy"] + [f"top_{k}_test_accuracy" for k in result["eval_config"]["k_values"]]
    heads = ["all"] + [f"top{k}" for k in result["eval_config"]["k_values"]]
    rows = [("task (llm/sae)", *heads)]
    mean = {"dataset_name": "mean", **result["eval_result_metrics"]["llm"], **result["eval_result_metrics"]["sae"]}
    for d in [*result["eval_result_details"], mean]:
        rows.append((d["dataset_name"], *(f"{d[f'llm_{k}']:.2f}/{d[f'sae_{k}']:.2f}" for k in keys)))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{r[0]:<{width}}  " + "  ".join(f"{c:>9}" for c in r[1:]) for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sae", required=True, help="name (metrics/sparse_probing/<name>.json)")
    parser.add_argument("--dir", required=True, type=Path, help="SAE directory written by a training stage")
    args = parser.parse_args()
    p = params_mod.load_or_exit()
    if "OMP_NUM_THREADS" not in os.environ:  # the machine is shared: 2 threads unless told otherwise
        torch.set_num_threads(2)
    t0 = time.perf_counter()
    try:
        manifest = load_cache_manifest(PROBE_ACTS, p)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    if not (args.dir / CONFIG_FILE).exists():
        sys.exit(f"error: SAE directory {args.dir} not found (no {CONFIG_FILE}): train it first (dvc repro)")
    sae = SAE.load(args.dir).eval()
    if sae.cfg.hook_name and sae.cfg.hook_name != manifest["hook_name"]:
        sys.exit(
            f"error: SAE {args.dir} was trained at {sae.cfg.hook_name}, {PROBE_ACTS} holds {manifest['hook_name']}"
        )
    if sae.cfg.d_in != manifest["d_in"]:
        sys.exit(f"error: SAE {args.dir} has d_in {sae.cfg.d_in}, {PROBE_ACTS} holds d {manifest['d_in']}")
    result = sae_probe_results(sae, PROBE_ACTS, p)
    result = {"sae": args.sae, "dir": str(args.dir), **result, "seconds": round(time.perf_counter() - t0, 1)}
    METRICS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(METRICS / f"{args.sae}.json", json.dumps(result, indent=2) + "\n")
    print(table(result))
    fails = check_probing_sanity(result)
    if fails:
        for fail in fails:
            print(f"error: probing@{args.sae}: {fail}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
