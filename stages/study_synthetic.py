"""Stage `synthetic_<group>@<arm>` (study/dvc.yaml): ground-truth absorption of one study arm on the synthetic
benchmark grid (study/params.yaml `synthetic_grid`; library: sae_ortho/study/synthetic_runs.py).

`--group sweep|ablation` runs on the grid's selection seeds, `--group headline` on its fresh seeds.
Writes models/study/synthetic/<group>/<arm>/ and metrics/study/synthetic/<group>/<arm>.json.
"""

from __future__ import annotations

import argparse
import json
import sys

from sae_ortho.base import params as params_mod
from sae_ortho.base.study_params import load_study_or_exit
from sae_ortho.study.synthetic_runs import GROUPS, run_study_synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--group", choices=GROUPS, required=True)
    parser.add_argument("--arm", required=True)
    args = parser.parse_args()
    p = params_mod.load_or_exit()
    study = load_study_or_exit()
    try:
        metrics = run_study_synthetic(p, study, args.group, args.arm)
    except (params_mod.ParamError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    print(json.dumps({k: metrics[k] for k in ("arm", "primary_mean", "guard_mean", "seconds")}))


if __name__ == "__main__":
    main()
