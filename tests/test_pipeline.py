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
    for stale in ("dvc.lock", "metrics"):
        path = dest / stale
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
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

    status = run([sys.executable, "-m", "dvc", "status", "--json"], repo_copy)
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


def test_changing_tau_reruns_only_the_ortho_side(repo_copy):
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["tau"] = params["tau"] + 0.05
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(run([sys.executable, "-m", "dvc", "status", "--json"], repo_copy).stdout)
    assert set(status) == {"train", "synthetic_ortho"}, status  # its evaluations rerun: models/ortho changes
    # efficiency@ortho reruns because its inputs' `seconds` fields changed, never the baseline's stages.
    expected = [
        "absorption@ortho",
        "core@ortho",
        "efficiency@ortho",
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
    expected = ["absorption@ortho", "core@ortho", "efficiency@ortho", "probing@ortho", "stability"]
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


def reproduced(repo: Path) -> list[str]:
    code = "from dvc.repo import Repo; print(sorted(s.addressing for s in Repo('.').reproduce()))"
    return ast.literal_eval(run([sys.executable, "-c", code], repo).stdout.strip().splitlines()[-1])
