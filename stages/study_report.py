"""Stage `report` (study/dvc.yaml): metrics/report.md, the study's plots (metrics/study/plots/) and the
compact headline metrics (metrics/study_headline.json), from the study's metrics (library: sae_ortho/report*.py)."""

from __future__ import annotations

import json
from pathlib import Path

from sae_ortho.base.io import atomic_write_text
from sae_ortho.base.study_params import load_study_or_exit
from sae_ortho.study.report import StudyResults, comparisons, hardware_noise, headline_json, headline_table
from sae_ortho.study.report_md import render
from sae_ortho.study.report_plots import PLOTS
from sae_ortho.study.synthetic_stats import decide

REPORT = Path("metrics/report.md")
PLOTS_DIR = Path("metrics/study/plots")
HEADLINE = Path("metrics/study_headline.json")


def main() -> None:
    study = load_study_or_exit()
    results = StudyResults.load(study)
    for name, plot in PLOTS.items():
        plot(results, PLOTS_DIR / name)
    atomic_write_text(REPORT, render(results, list(PLOTS)) + "\n")
    headline = headline_json(results)
    counted = [c["key"] for c in comparisons(headline_table(results), study.alpha, hardware_noise()) if c["counts"]]
    declared = {}
    if "baseline" in results.synthetic_headline:
        declared = {a: row["verdict"] for a, row in decide(study, results.synthetic_headline)["arms"].items()}
    summary = {**headline, "differences_that_count": counted, "declared_verdicts": declared}
    atomic_write_text(HEADLINE, json.dumps(summary, indent=2) + "\n")
    print(REPORT.read_text())


if __name__ == "__main__":
    main()
