"""Stage `absorption@<sae>`: first-letter absorption of one SAE (library: sae_ortho/evaluation/absorption.py).

`python -m stages.absorption --sae NAME --dir SAE_DIR` -> metrics/absorption/NAME.json, from the
letter cache (no model needed).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from sae_ortho.base.paths import LETTERS
from sae_ortho.evaluation.absorption import absorption_result, load_manifest
from sae_ortho.evaluation.stage_io import SAEStage

METRICS = Path("metrics/absorption")


def main() -> None:
    stage = SAEStage.from_argv(__doc__, METRICS)
    p = stage.params
    # sklearn warns on every letter whose k-sparse probe predicts no positive (F1 is then 0, as SAEBench counts it).
    warnings.filterwarnings("ignore", message=".*ill-defined.*")
    try:
        manifest = load_manifest(LETTERS)
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")
    sae = stage.load_sae(LETTERS, manifest["hook_name"])
    result = stage.write(absorption_result(sae.to_saelens(), LETTERS, p.absorption, stage.name))
    flag = "" if result["meaningful"] else f"  NOT MEANINGFUL (< {p.absorption.min_carried_letters} letters carried)"
    print(
        f"{stage.name}: mean absorption fraction {result['mean_absorption_fraction']} "
        f"(reseed range {result['mean_absorption_fraction_reseed_range']}), full absorption "
        f"{result['full_absorption_rate']}, split features {result['num_split_features']}, letters carried by one "
        f"latent {result['letters_carried_by_one_latent']}, probe-supported {result['letters_probe_supported']}{flag}"
    )


if __name__ == "__main__":
    main()
