"""End to end: `dvc repro study/dvc.yaml` (what `make study` adds) on tiny settings in a temporary git
copy; DVC runs the default stages the study reads (corpus, extract, llm_cache, letter_cache) first."""

import json
import sys
from pathlib import Path

import pytest
import yaml

from tests.pipeline_copy import copy_repo, reproduced, run, write_tiny_study


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory) -> Path:
    return copy_repo(tmp_path_factory, "study")


def test_study_pipeline_end_to_end_and_one_arm_edit(repo_copy):
    """`make study`'s command on tiny settings: every stage runs on the default's cached outputs, the
    report and its plots appear, every headline SAE passes the science checks; editing one sweep arm
    marks exactly that arm's stages, the selection and the report as changed."""
    study = write_tiny_study(repo_copy)
    ran = reproduced(repo_copy, "study/dvc.yaml")
    study_ran = [s for s in ran if s.startswith("study/")]
    # sweep (2 x 2), select, ablation (2), synthetic headline (2) + control, LM headline (2), cross-seed (2),
    # scaling, report
    assert "study/dvc.yaml:report" in ran and len(study_ran) == 2 * 2 + 1 + 2 + 2 + 1 + 2 + 2 + 1 + 1, ran
    assert {"extract", "llm_cache", "letter_cache"} <= set(ran) and "train" not in ran  # only what it reads
    status = run([sys.executable, "-m", "dvc", "status", "study/dvc.yaml", "--json"], repo_copy)
    assert json.loads(status.stdout) == {}
    for arm in study["headline_arms"]:
        m = json.loads((repo_copy / f"metrics/study/headline/{arm}_s0.json").read_text())
        assert 0 < m["core"]["fvu"] < 1 and m["core"]["l0"] == pytest.approx(8, abs=0.5), m
        assert 0.5 < m["probing"]["top_5"] <= 1, m
        assert 0 <= m["absorption"]["mean_absorption_fraction"] <= 1, m
    # The cheap sweep SAEs measure the cost only; first-letter absorption is for the full-size ones.
    sweep = json.loads((repo_copy / "metrics/study/sweep/baseline.json").read_text())
    assert 0 < sweep["core"]["fvu"] < 1 and "absorption" not in sweep and "probing" not in sweep, sweep
    # The headline's synthetic comparison: every arm on the grid's two fresh seeds; the control replays
    # best's tau at every step, so its final tau per seed is best's.
    syn = {
        arm: json.loads((repo_copy / f"metrics/study/synthetic/headline/{arm}.json").read_text())["cells"][
            "m100_matched"
        ]["t"]
        for arm in ("baseline", "best", "control")
    }
    primary = study["measures"]["primary"]
    assert all(len(s[primary]["per_seed"]) == 2 for s in syn.values()), syn
    assert syn["control"]["tau"]["per_seed"] == syn["best"]["tau"]["per_seed"], syn
    assert len(syn["baseline"]["reseed"][primary]["redrawn"]) == 2 and len(syn["best"]["curve"]) == 4, syn
    best = json.loads((repo_copy / "metrics/study/headline/best_s0.json").read_text())
    chosen = json.loads((repo_copy / "metrics/study/selected_arm.json").read_text())["topk"]
    assert best["settings"]["tau"] == chosen["settings"]["tau"] and best["train"]["penalty_overhead"] > 0
    cross = json.loads((repo_copy / "metrics/study/cross_seed/best.json").read_text())
    assert cross["skipped"] and cross["pairs"] == [], cross  # one LM seed here: nothing to match, said so
    report = (repo_copy / "metrics/report.md").read_text()
    assert f"Selected for topk: **{chosen['selected']}**" in report and "Which differences" in report
    assert "## The declared test" in report
    for png in ("absorption_vs_tau", "absorption_vs_fvu", "probing_vs_k", "jaccard_vs_lag", "topk_ablation"):
        assert (repo_copy / f"metrics/study/plots/{png}.png").stat().st_size > 5000, png
    headline = json.loads((repo_copy / "metrics/study_headline.json").read_text())
    assert set(study["headline_arms"]) <= set(headline)
    # Editing one sweep arm touches that arm's two stages, the selection and the report; the derived
    # arms depend on the chosen arm's file only (rewritten by `select` if the choice changes).
    other = "fixed_1e1"
    study["sweep"][other]["tau"] = study["sweep"][other]["tau"] * 2
    (repo_copy / "study/params.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    status = json.loads(run([sys.executable, "-m", "dvc", "status", "study/dvc.yaml", "--json"], repo_copy).stdout)
    expected = {f"study/dvc.yaml:{s}@{other}" for s in ("synthetic_sweep", "lm_sweep")} | {
        "study/dvc.yaml:select",
        "study/dvc.yaml:report",
    }
    assert set(status) == expected, status
    # The edited arm's LM stage on 2 gloo processes (dist.nproc_per_node, as `dvc exp run -S` would set it):
    # training on both ranks, the evaluation on rank 0.
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["dist"]["nproc_per_node"] = 2
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run([sys.executable, "-m", "dvc", "repro", "--single-item", f"study/dvc.yaml:lm_sweep@{other}"], repo_copy)
    two = json.loads((repo_copy / f"metrics/study/sweep/{other}.json").read_text())
    assert two["processes"] == 2 and 0 < two["core"]["fvu"] < 1 and two["settings"]["tau"] == 20.0, two
