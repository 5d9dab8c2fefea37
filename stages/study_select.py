"""Stage `select` (study/dvc.yaml): the best orthogonality setting of the sweep, by the rule declared in
study/params.yaml `selection` (sae_ortho/study/selection.py), before any headline run reads it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sae_ortho.base.io import atomic_write_text
from sae_ortho.base.params import ParamError
from sae_ortho.base.study_params import load_study_or_exit
from sae_ortho.study.arms import SELECTED_ARM, SELECTION
from sae_ortho.study.selection import select_arm

METRICS = Path("metrics/study")


def main() -> None:
    study = load_study_or_exit()
    synthetic, lm = {}, {}
    for name in study.sweep:
        try:
            synthetic[name] = json.loads((METRICS / "synthetic/sweep" / f"{name}.json").read_text())
            lm[name] = json.loads((METRICS / "sweep" / f"{name}.json").read_text())
        except FileNotFoundError as err:
            sys.exit(f"error: sweep arm {name} has no metrics ({err.filename}): run its stages first")
    try:
        selection = select_arm(study, synthetic, lm)
    except ParamError as err:
        sys.exit(f"error: {err}")
    atomic_write_text(SELECTION, json.dumps(selection, indent=2) + "\n")
    remedies = selection["remedies"]
    chosen = {r: {k: v[k] for k in ("selected", "settings")} for r, v in remedies.items()}
    atomic_write_text(SELECTED_ARM, json.dumps(chosen, indent=2) + "\n")
    print(json.dumps({r: {k: v[k] for k in ("selected", "any_admissible")} for r, v in remedies.items()}))


if __name__ == "__main__":
    main()
