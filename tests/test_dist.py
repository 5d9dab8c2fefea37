"""Data parallel on torchrun (sae_ortho/base/dist.py), gloo on the CPU with 2 processes, not skipped:
the stages relaunch themselves under torchrun from `dist.nproc_per_node`, rank 0 alone writes, and the
results equal one process's."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from sae_ortho.base.io import sha256_file
from sae_ortho.data.shards import ActivationShards
from tests.conftest import stage_env, write_small_corpus

EXTRACT = {"context_len": 32, "n_tokens": 31 * 4 * 24, "shard_tokens": 124, "batch_size": 4}  # 24 shards


def workdir(root: Path, nproc: int, **params) -> Path:
    write_small_corpus(root / "data" / "corpus.parquet", n_docs=300)
    (root / "params.yaml").write_text(yaml.safe_dump({"extract": EXTRACT, "dist": {"nproc_per_node": nproc}, **params}))
    return root


def stage(root: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", f"stages.{name}", *args]
    return subprocess.run(cmd, cwd=root, env=stage_env(), capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    root = workdir(tmp_path_factory.mktemp("one"), 1)
    done = stage(root, "extract")
    assert done.returncode == 0, done.stderr[-2000:]
    return root


def test_two_process_extraction_equals_one(one_process, tmp_path):
    """Same activations in the same global order: every shard's bytes and index, the manifest save timings."""
    root = workdir(tmp_path, 2)
    done = stage(root, "extract")
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = ActivationShards(one_process / "data/activations"), ActivationShards(root / "data/activations")
    assert len(two) == 24 and [s.sha256 for s in two.shards] == [s.sha256 for s in one.shards]
    assert all(sha256_file(two.directory / s.file) == s.sha256 for s in two.shards)
    for i in range(len(one)):
        assert two.index(i).equals(one.index(i)), i
    assert two.manifest == one.manifest  # no field differs: nothing in it depends on the process count
    metrics = json.loads((root / "metrics/extract.json").read_text())
    assert metrics["processes"] == 2 and metrics["tokens_this_run"] == metrics["tokens"] == 31 * 4 * 24
    assert not list((root / "data").glob("activations.partial*"))


def test_killing_one_rank_and_rerunning_resumes_to_the_same_shards(one_process, tmp_path):
    root = workdir(tmp_path, 2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.extract"], cwd=root, env=stage_env(), stderr=subprocess.PIPE, text=True
    )
    partial, victim = root / "data" / "activations.partial", None
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        recorded = partial / "progress.r1.json"
        if recorded.exists() and len(json.loads(recorded.read_text())["shards"]) >= 2:
            ranks = [
                c
                for c in psutil.Process(proc.pid).children(recursive=True)
                if "stages.extract" in " ".join(c.cmdline())
            ]
            victim = next(c for c in ranks if c.environ().get("RANK") == "1")
            victim.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=300)
    assert victim is not None, f"extraction ended before rank 1 could be killed: {proc.stderr.read()[-2000:]}"
    assert proc.returncode != 0 and not (root / "data" / "activations").exists()  # nothing for DVC to cache

    resumed = stage(root, "extract")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after" in resumed.stderr
    got, one = ActivationShards(root / "data/activations"), ActivationShards(one_process / "data/activations")
    assert [s.sha256 for s in got.shards] == [s.sha256 for s in one.shards]
    assert json.loads((root / "metrics/extract.json").read_text())["resumed_from_context"] >= 2 * 4
