"""End to end: `dvc repro` on a tiny config in a temporary git copy of the repo."""

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, stage_env

TINY = {
    "data": {
        "max_chars_per_source": 300_000,
        "probe_train_per_class": 40,
        "probe_test_per_class": 20,
        "probe_min_train_per_class": 30,
        "probe_min_test_per_class": 15,
    },
    "extract": {"context_len": 32, "n_tokens": 3000, "shard_tokens": 1000, "batch_size": 8},
    "train": {
        "d_sae": 128,
        "k": 8,
        "batch_size": 128,
        "train_tokens": 128 * 12,
        "warmup_steps": 2,
        "log_every": 2,
        "checkpoint_every": 5,
        "dead_tokens": 1000,
        "aux_k": 16,
        "lr": 0.003,
    },
    "heldout": {"n_tokens": 310, "batch_size": 5},
    "core": {"pair_batch_size": 128, "pair_fraction": 0.01},
    "probing": {"train_per_class": 30, "test_per_class": 15, "context_len": 32, "k_values": [1, 5]},
    "letters": {"n_words": 60, "min_words_per_letter": 5, "seeds": [0], "batch_size": 16},
    "absorption": {"max_k": 3, "bootstrap": 100},
    "synthetic": {
        "hidden_dim": 32,
        "hierarchies": [{"name": "t", "total_root_nodes": 4, "branching_factor": 3, "num_features": 24}],
        "seeds": [0],
        "train": {"d_sae": 24, "k": 4, "lr": 0.01, "batch_size": 256, "train_tokens": 256 * 50, "aux_k": 8},
        "eval_samples": 2000,
        "bootstrap": 100,
    },
    "stability": {"null_draws": 3, "heldout_batches": 2},
}


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**stage_env(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory) -> Path:
    """Tracked files of the repo (as in a fresh clone) with a tiny params.yaml, committed."""
    dest = tmp_path_factory.mktemp("pipeline") / "repo"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (REPO / rel).exists():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stale in ("dvc.lock", "study/dvc.lock", "metrics"):
        path = dest / stale
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    (dest / "metrics").mkdir()  # as in a clone: the committed metrics live there (stages write beside them)
    run(["git", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "copy"], dest)
    return dest


def test_dvc_repro_end_to_end(repo_copy):
    run([sys.executable, "-m", "dvc", "repro"], repo_copy)
    manifest = json.loads((repo_copy / "data/activations/manifest.json").read_text())
    assert manifest["n_tokens"] >= 3000 and manifest["d_in"] == 576
    extract_metrics = json.loads((repo_copy / "metrics/extract.json").read_text())
    assert extract_metrics["tokens"] == manifest["n_tokens"]
    assert (repo_copy / "data/corpus.parquet").exists()
    assert len(list((repo_copy / "data/probing").glob("*.parquet"))) >= 5

    status = run([sys.executable, "-m", "dvc", "status", "dvc.yaml", "--json"], repo_copy)
    assert json.loads(status.stdout) == {}
    again = run([sys.executable, "-m", "dvc", "repro"], repo_copy)
    assert "Running stage" not in again.stdout
    for name in ("baseline", "ortho"):
        metrics = json.loads((repo_copy / f"metrics/train/{name}.json").read_text())
        assert 0 < metrics["fvu"] < 1 and metrics["l0"] == pytest.approx(8, abs=0.5)
        assert (repo_copy / f"models/{name}/cfg.json").exists()
    assert (repo_copy / "models/ortho/pairs.parquet").exists()
    for name in ("baseline", "ortho"):
        core = json.loads((repo_copy / f"metrics/core/{name}.json").read_text())
        assert 0 < core["fvu"] < 1 and 0 < core["ce_recovered_vs_zero"] <= 1, core
        assert core["l0"] == pytest.approx(8, abs=0.5)
        probing = json.loads((repo_copy / f"metrics/sparse_probing/{name}.json").read_text())
        sae = probing["eval_result_metrics"]["sae"]
        assert 0.5 < sae["sae_top_5_test_accuracy"] <= 1, sae
    for arm in ("baseline", "ortho"):
        synthetic = json.loads((repo_copy / f"metrics/synthetic/{arm}.json").read_text())
        assert 0 < synthetic["hierarchies"]["t"]["mcc"]["mean"] <= 1
    for name in ("baseline", "ortho"):
        absorption = json.loads((repo_copy / f"metrics/absorption/{name}.json").read_text())
        assert absorption["meaningful"] == (absorption["letters_carried_by_one_latent"] >= 10)
        assert len(absorption["per_seed"][0]["per_letter"]) == 26
    efficiency = json.loads((repo_copy / "metrics/efficiency/ortho.json").read_text())
    assert {"fvu_increase", "ce_recovered_decrease", "training_overhead"} <= set(efficiency["costs"])
    assert efficiency["costs"]["training_overhead"]["value"] > 0  # the ortho arm's penalty is timed
    assert "synthetic.t.absorption" in efficiency["reductions"]
    heldout = json.loads((repo_copy / "data/heldout/manifest.json").read_text())
    assert heldout["doc_split"]["heldout_docs"][0] > heldout["doc_split"]["training_stream_docs"][1]
    stability = json.loads((repo_copy / "metrics/stability.json").read_text())
    assert 0 <= stability["within_run"]["jaccard_at_lag"]["1"]["jaccard"] <= 1
    assert set(stability["snapshots"]) == {"baseline", "ortho"}
    assert "skipped" in stability["cross_seed"]
    for plot in ("jaccard_lag", "persistence", "seed_match"):
        assert (repo_copy / f"metrics/stability/{plot}.png").stat().st_size > 1000
    headline = json.loads((repo_copy / "metrics/headline.json").read_text())
    assert set(headline) == {"baseline", "ortho"} and 0 < headline["ortho"]["fvu"] < 1
    shown = run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], repo_copy).stdout
    assert "metrics/headline.json" in shown and "metrics/core/" not in shown  # full records are plain outs


def test_changing_tau_reruns_only_the_ortho_side(repo_copy):
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["tau"] = params["tau"] + 0.05
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(run([sys.executable, "-m", "dvc", "status", "dvc.yaml", "--json"], repo_copy).stdout)
    assert set(status) == {"train", "synthetic_ortho"}, status  # its evaluations rerun: models/ortho changes
    # efficiency@ortho reruns because its inputs' `seconds` fields changed, never the baseline's stages.
    expected = [
        "absorption@ortho",
        "core@ortho",
        "efficiency@ortho",
        "headline",
        "probing@ortho",
        "stability",
        "synthetic_ortho",
        "train",
    ]
    assert reproduced(repo_copy) == expected
    ortho = json.loads((repo_copy / "metrics/train/ortho.json").read_text())
    assert ortho["tau"] == pytest.approx(params["tau"])


def test_editing_one_sae_entry_reruns_exactly_its_evaluations(repo_copy):
    """foreach values live in cmd, so DVC tracks them: pointing `saes.ortho` at another directory
    reruns that entry's evaluations, nothing else (and nothing of the baseline)."""
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    shutil.copytree(repo_copy / "models/ortho", repo_copy / "ortho_copy")
    params["saes"]["ortho"] = "ortho_copy"
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # stability reads metrics/absorption/ortho.json (the latents it flags), so it follows.
    expected = ["absorption@ortho", "core@ortho", "efficiency@ortho", "headline", "probing@ortho", "stability"]
    assert reproduced(repo_copy) == expected


def test_stability_params_rerun_only_stability_and_extra_seeds_train_both_arms(repo_copy):
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["stability"]["null_draws"] = 2
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert reproduced(repo_copy) == ["stability"]
    params["stability"]["extra_seeds"] = [1]
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert reproduced(repo_copy) == ["stability", "train_baseline_seed@1", "train_seed@1"]
    cross = json.loads((repo_copy / "metrics/stability.json").read_text())["cross_seed"]["arms"]
    for arm in ("baseline", "ortho"):
        (entry,) = cross[arm]["pairs"]
        assert entry["seed"] == 1 and 0 < entry["mean_cos"] <= 1
        assert {"null_rotation", "null_covariance", "kept_pair_overlap"} <= set(entry)


TINY_STUDY = {
    "sweep_tokens": 128 * 6,
    "scaling_tokens": [128 * 9],
    "scaling_arms": ["best"],
    "headline_seeds": [0],
    # On the LM: the baseline, the selection and the control (the reference arms' LM runs take the same
    # code path with another RunConfig, trained in test_train.py); all five run on the synthetic benchmark.
    "headline_arms": ["baseline", "best", "control"],
    "synthetic_extra": ["control", "matryoshka", "ortsae"],
    "heldout_contexts": 3,
    "sweep": {
        "baseline": {"penalty": "none"},
        "fixed_1e1": {"tau": 10.0},
        "adaptive_3e-2": {"schedule": "adaptive", "tau": 0.1, "target": 0.03},
    },
    "ablation": {"frac_1e-2": {"from_selection": True, "topk_fraction": 0.01}},
}


def test_study_pipeline_end_to_end_and_one_arm_edit(repo_copy):
    """`make study`'s command on tiny settings: every stage runs on the default's cached outputs, the
    report and its plots appear, every headline SAE passes the science checks; editing one sweep arm
    that the selection does not pick reruns that arm and the selection/report only."""
    study = yaml.safe_load((repo_copy / "study/params.yaml").read_text()) | TINY_STUDY
    (repo_copy / "study/params.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    ran = reproduced(repo_copy, "study/dvc.yaml")
    assert "study/dvc.yaml:report" in ran and len(ran) == 3 * 2 + 1 + 2 + 3 + 3 + 1 + 1, ran
    status = run([sys.executable, "-m", "dvc", "status", "study/dvc.yaml", "--json"], repo_copy)
    assert json.loads(status.stdout) == {}
    for arm in study["headline_arms"]:
        m = json.loads((repo_copy / f"metrics/study/headline/{arm}_s0.json").read_text())
        assert 0 < m["core"]["fvu"] < 1 and m["core"]["l0"] == pytest.approx(8, abs=0.5), m
        assert 0.5 < m["probing"]["top_5"] <= 1, m
    best = json.loads((repo_copy / "metrics/study/headline/best_s0.json").read_text())
    chosen = json.loads((repo_copy / "metrics/study/selected_arm.json").read_text())
    assert best["settings"]["tau"] == chosen["settings"]["tau"] and best["train"]["penalty_overhead"] > 0
    control = json.loads((repo_copy / "metrics/study/headline/control_s0.json").read_text())
    assert control["settings"]["penalty"] == "random" and control["pair_stability"] is not None
    report = (repo_copy / "metrics/report.md").read_text()
    assert f"Selected: **{chosen['selected']}**" in report and "Which differences" in report
    for png in ("absorption_vs_tau", "absorption_vs_fvu", "probing_vs_k", "jaccard_vs_lag", "topk_ablation"):
        assert (repo_copy / f"metrics/study/plots/{png}.png").stat().st_size > 5000, png
    headline = json.loads((repo_copy / "metrics/study_headline.json").read_text())
    assert set(study["headline_arms"]) <= set(headline)
    # Edit the arm the rule did not pick: it reruns with the selection and the report, nothing derived.
    other = next(a for a in ("fixed_1e1", "adaptive_3e-2") if a != chosen["selected"])
    study["sweep"][other]["tau"] = study["sweep"][other]["tau"] * 2
    (repo_copy / "study/params.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    again = reproduced(repo_copy, "study/dvc.yaml")
    expected = {f"study/dvc.yaml:{s}@{other}" for s in ("synthetic_sweep", "lm_sweep")} | {
        "study/dvc.yaml:select",
        "study/dvc.yaml:report",
    }
    if json.loads((repo_copy / "metrics/study/selected_arm.json").read_text()) == chosen:
        assert set(again) == expected, again


def test_exp_run_set_tau_makes_an_experiment_that_metrics_diff_shows(repo_copy):
    """`dvc exp run -S tau=...` exactly as README types it: an experiment whose ortho metrics differ
    from the workspace's, shown by `dvc metrics diff` against it; the study is not rerun."""
    run(["git", "add", "-A"], repo_copy)
    run(["git", "commit", "-qm", "study done"], repo_copy)
    before = json.loads((repo_copy / "metrics/train/ortho.json").read_text())
    tau = yaml.safe_load((repo_copy / "params.yaml").read_text())["tau"] * 40
    out = run([sys.executable, "-m", "dvc", "exp", "run", "-n", "bigtau", "-S", f"tau={tau}"], repo_copy)
    assert "study/dvc.yaml" not in out.stdout
    after = json.loads((repo_copy / "metrics/train/ortho.json").read_text())
    assert after["tau"] == pytest.approx(tau) and after["fvu"] != before["fvu"]
    diff = run([sys.executable, "-m", "dvc", "metrics", "diff", "HEAD", "--json"], repo_copy)
    changed = json.loads(diff.stdout)["metrics/headline.json"]
    assert {"ortho.tau_final", "ortho.kept_pair_mean_abs_cos"} <= set(changed), changed
    assert not any(key.startswith("baseline.") for key in changed), changed  # the baseline did not rerun
    shown = run([sys.executable, "-m", "dvc", "exp", "show", "--json"], repo_copy)
    assert "bigtau" in shown.stdout


def reproduced(repo: Path, target: str = "dvc.yaml") -> list[str]:
    code = f"from dvc.repo import Repo; print(sorted(s.addressing for s in Repo('.').reproduce('{target}')))"
    return ast.literal_eval(run([sys.executable, "-c", code], repo).stdout.strip().splitlines()[-1])


def test_plots_page_is_offline_and_its_specs_render(repo_copy, tmp_path):
    """`dvc plots show` uses the committed offline template (.dvc/config plots.html_template): the page
    loads no remote script, carries the pinned vega libraries inline, and every vega-lite spec DVC
    emits renders to a non-blank PNG (vl-convert); with Chromium installed, the page itself is
    screenshotted and must not be blank."""
    import io
    import re

    import matplotlib.image
    import vl_convert

    out = tmp_path / "plots"
    run([sys.executable, "-m", "dvc", "plots", "show", "-o", str(out)], repo_copy)
    page = (out / "index.html").read_text()
    assert not re.findall(r"<script[^>]+src=[\"']?https?:", page), "the page loads a remote script"
    for pinned in ("vega@5.20.2", "vega-lite@5.2.0", "vega-embed@6.18.2"):
        assert f"/* {pinned} */" in page
    assert page.count("vegaEmbed(") >= 3
    shown = json.loads(run([sys.executable, "-m", "dvc", "plots", "show", "--json"], repo_copy).stdout)["data"]
    specs = [d["content"] for entries in shown.values() for d in entries if d["type"] == "vega"]
    assert len(specs) >= 3
    for spec in specs[:3]:
        png = matplotlib.image.imread(io.BytesIO(vl_convert.vegalite_to_png(spec)), format="png")
        assert png.shape[0] > 100 and png[..., :3].std() > 0.05, "blank plot"
    chromium = shutil.which("chromium")
    if chromium:
        shot = tmp_path / "page.png"
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                f"--screenshot={shot}",
                (out / "index.html").as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        assert matplotlib.image.imread(shot)[..., :3].std() > 0.05, "the page rendered blank"
