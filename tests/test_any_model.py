"""Any model through one path: a tiny GPT-NeoX checkpoint (a second architecture family, parallel
attention) saved in a local directory goes through extract -> train -> core -> probing -> absorption
with the same `dvc repro` a user runs, its width and depth read from the checkpoint; an unreachable hub
model stops a stage with one line and exit 2 before anything is written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import stage_env
from tests.pipeline_copy import copy_repo, run
from tests.tiny_models import save_tiny_neox


def _set_params(repo: Path, **top) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in top.items():
        if isinstance(value, dict):
            params[key].update(value)
        else:
            params[key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def neox_repo(tmp_path_factory, model) -> Path:
    checkpoint = tmp_path_factory.mktemp("models") / "tiny-neox"
    save_tiny_neox(checkpoint, model.tokenizer)
    repo = copy_repo(tmp_path_factory, "any_model")
    _set_params(repo, model=str(checkpoint), layer=1, hook="resid_post", train={"d_sae": "2x", "k": 8})
    run(["git", "commit", "-qam", "a local GPT-NeoX checkpoint"], repo)
    run([sys.executable, "-m", "dvc", "repro", "core@baseline", "probing@baseline", "absorption@baseline"], repo)
    return repo


@pytest.mark.slow
def test_a_second_architecture_family_runs_the_pipeline(neox_repo):
    manifest = json.loads((neox_repo / "data/activations/manifest.json").read_text())
    assert manifest["d_in"] == 64 and manifest["hook_name"] == "blocks.1.hook_resid_post"
    sae_cfg = json.loads((neox_repo / "models/baseline/cfg.json").read_text())
    assert sae_cfg["d_in"] == 64 and sae_cfg["d_sae"] == 128  # train.d_sae: 2x of the checkpoint's width
    assert sae_cfg["metadata"]["model_name"].endswith("tiny-neox")
    core = json.loads((neox_repo / "metrics/core/baseline.json").read_text())
    assert 0 <= core["fvu"] < 1 and core["dead_fraction"] < 1 and core["n_tokens"] > 0
    probing = json.loads((neox_repo / "metrics/sparse_probing/baseline.json").read_text())
    assert 0.5 < probing["eval_result_metrics"]["llm"]["llm_test_accuracy"] <= 1
    assert 0 < probing["eval_result_metrics"]["sae"]["sae_top_5_test_accuracy"] <= 1
    letters = json.loads((neox_repo / "data/letters/manifest.json").read_text())
    assert letters["model_name"] == "tiny-neox"  # sae_bench's probe folders are keyed by it
    absorption = json.loads((neox_repo / "metrics/absorption/baseline.json").read_text())
    assert absorption["per_seed"] and "meaningful" in absorption


def test_an_unreachable_hub_model_is_one_line_and_exit_2(tmp_path_factory, tmp_path):
    repo = copy_repo(tmp_path_factory, "hub_model")
    _set_params(repo, model="EleutherAI/pythia-70m-deduped", layer=3, hook="resid_post")
    (repo / "data").mkdir(exist_ok=True)
    (repo / "data/corpus.parquet").write_bytes(b"")  # extract checks the corpus exists, then loads the model
    env = {**stage_env(), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-cache")}
    result = subprocess.run([sys.executable, "-m", "stages.extract"], cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "EleutherAI/pythia-70m-deduped" in lines[0] and "download it once" in lines[0]
    assert not (repo / "data/activations").exists() and not (repo / "metrics/extract.json").exists()
