"""Stage `efficiency@<sae>`: absorption reduction per unit of cost against the baseline
(sae_ortho/analysis/efficiency.py).

`python -m stages.efficiency --arm NAME` -> metrics/efficiency/NAME.json, from the metrics and
per-context sums the evaluation stages wrote for NAME and for `baseline`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sae_ortho.analysis.efficiency import arm_efficiency
from sae_ortho.base.io import atomic_write_text

BASELINE = "baseline"
METRICS = Path("metrics/efficiency")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arm", required=True, help="name of an entry of `saes` (its metrics files)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    METRICS.mkdir(parents=True, exist_ok=True)
    if args.arm == BASELINE:
        result = {"arm": BASELINE, "reference": True, "note": "every other arm's reductions are relative to this one"}
    else:
        names = (BASELINE, args.arm)
        paths = [Path(f"metrics/absorption/{n}.json") for n in names] + [
            Path(f"data/core/{n}.safetensors") for n in names
        ]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            sys.exit(f"error: missing {', '.join(missing)}: run dvc repro")
        synthetic = tuple(Path(f"models/synthetic/{n}") for n in names)
        train_path = Path(f"metrics/train/{args.arm}.json")
        result = arm_efficiency(
            args.arm,
            tuple(json.loads(p.read_text()) for p in paths[:2]),
            (paths[2], paths[3]),
            synthetic if all(d.exists() for d in synthetic) else None,
            json.loads(train_path.read_text()) if train_path.exists() else {},
        )
    result["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(METRICS / f"{args.arm}.json", json.dumps(result, indent=2) + "\n")
    for measure, row in result.get("efficiency", {}).items():
        r = result["reductions"][measure]
        print(f"{measure}: reduction {r['relative_reduction']} {r['ci95']}; per cost {row}")


if __name__ == "__main__":
    main()
