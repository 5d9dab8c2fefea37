"""The default pipeline's headline figures in one small file (stage `headline` -> metrics/headline.json).

`dvc exp show` and `dvc metrics diff` list metrics files column by column; the evaluation stages'
full records (per-letter, per-task, per-hierarchy) are plain outputs, and this file holds the figures
a comparison starts from, per SAE: absorption (first-letter, synthetic), probing top-1 / top-5, FVU,
L0, CE loss recovered, and from training the final tau, the kept pairs' mean |cos| and the penalty's
share of the step.
"""

from __future__ import annotations

import json
from pathlib import Path

METRICS = Path("metrics")


def _read(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: run its stage first (dvc repro)")
    return json.loads(path.read_text())


def headline(saes: list[str], root: Path = METRICS) -> dict:
    out = {}
    for name in saes:
        core = _read(root / "core" / f"{name}.json")
        absorption = _read(root / "absorption" / f"{name}.json")
        probing = _read(root / "sparse_probing" / f"{name}.json")["eval_result_metrics"]["sae"]
        row = {
            "first_letter_absorption": absorption["mean_absorption_fraction"],
            "first_letter_meaningful": absorption["meaningful"],
            "probing_top_1": round(probing["sae_top_1_test_accuracy"], 5),
            "probing_top_5": round(probing["sae_top_5_test_accuracy"], 5),
            "fvu": round(core["fvu"], 5),
            "l0": round(core["l0"], 3),
            "ce_recovered": round(core["ce_recovered_vs_zero"], 5),
        }
        trained = root / "train" / f"{name}.json"
        if trained.exists():  # the pipeline's own SAEs (a `saes` entry may point at any directory)
            t = json.loads(trained.read_text())
            row |= {"tau_final": t["tau"], "penalty_overhead": t.get("penalty_overhead"), "train_seconds": t["seconds"]}
            if "mean_abs_cos" in t:
                row["kept_pair_mean_abs_cos"] = t["mean_abs_cos"]
        synthetic = root / "synthetic" / f"{name}.json"
        if synthetic.exists():  # the synthetic arms are baseline and ortho
            for h, figures in json.loads(synthetic.read_text())["hierarchies"].items():
                row[f"synthetic_absorption_{h}"] = figures["absorption"]["mean"]
        out[name] = row
    return out
