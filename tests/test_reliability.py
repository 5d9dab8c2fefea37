"""Corrupt inputs are caught before they are used (issue 21): every artefact a later stage or a resumed run
reads, with one byte flipped or cut to half its length, stops its real reader with one line that names the
file and the fix; intact files and a kill between a file's rename and its checksum update still read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sae_ortho.base import io
from sae_ortho.base.io import CorruptFile, atomic_dir, atomic_file, verified
from sae_ortho.data.shards import ActivationShards, write_manifest, write_shard
from sae_ortho.evaluation.heldout import MANIFEST as HELDOUT_MANIFEST
from sae_ortho.evaluation.heldout import TENSORS as HELDOUT_TENSORS
from sae_ortho.evaluation.heldout import HeldoutSet
from sae_ortho.training.checkpoint import CHECKPOINT, load_checkpoint
from sae_ortho.training.run_config import RunConfig
from sae_ortho.training.sae import CONFIG_FILE, SAE, STATE_FILE
from sae_ortho.training.snapshots import SNAPSHOTS, load_snapshots
from sae_ortho.training.train import train
from sae_ortho.training.trainer import Trainer
from tests.conftest import REPO
from tests.test_train import TINY

D_IN, CONTEXT = 32, 64


def _shards(directory: Path) -> ActivationShards:
    gen = torch.Generator().manual_seed(0)
    infos = []
    for s in range(3):
        contexts = np.arange(10 * s, 10 * s + 10)
        index = {
            "context_id": np.repeat(contexts, CONTEXT - 1),
            "position": np.tile(np.arange(1, CONTEXT, dtype=np.int16), 10),
            "doc_id": np.repeat(contexts, CONTEXT - 1),
            "token_id": np.arange(10 * (CONTEXT - 1)),
        }
        acts = torch.randn(10 * (CONTEXT - 1), D_IN, generator=gen)
        infos.append(write_shard(directory, s, acts, index, 10 * s, 10))
    write_manifest(directory, {"d_in": D_IN, "dtype": "float32", "fingerprint": "test"}, infos)
    return ActivationShards(directory)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """One of every checked artefact kind, written by the code that writes it in the pipeline."""
    root = tmp_path_factory.mktemp("artefacts")
    shards = _shards(root / "acts")
    cfg = RunConfig(replace(TINY, d_sae=64, k=4, snapshots=2, train_tokens=128 * 20), seed=0, tau=1.0)
    train(cfg, shards, root / "sae", root / ".ckpt_done", progress_bar=False)
    train(cfg, shards, root / "stopped", root / "ckpt", progress_bar=False, max_steps=15)  # checkpoint at 10
    with atomic_dir(root / "heldout", digests=True) as tmp:  # the held-out cache's layout, tiny
        tensors = {"tokens": torch.zeros(2, 4, dtype=torch.long), "resid_pre": torch.ones(2, 4, 8)}
        save_file({**tensors, "acts": torch.ones(2, 4, 8)}, tmp / HELDOUT_TENSORS)
        (tmp / HELDOUT_MANIFEST).write_text(json.dumps({"contexts": 2}))
    return {
        "shard": root / "acts" / "shard_00001.safetensors",
        "shard index": root / "acts" / "index" / "shard_00002.parquet",
        "shard manifest": root / "acts" / "manifest.json",
        "SAE weights": root / "sae" / STATE_FILE,
        "SAE config": root / "sae" / CONFIG_FILE,
        "snapshots": root / "sae" / SNAPSHOTS,
        "pair log": root / "sae" / "pairs.parquet",
        "checkpoint": root / "ckpt" / CHECKPOINT,
        "LLM-side cache": root / "heldout" / HELDOUT_TENSORS,
    }


def _read(kind: str, path: Path) -> None:
    """The pipeline's own reader of each kind."""
    if kind.startswith("shard"):
        shards = ActivationShards(path.parents[1] if kind == "shard index" else path.parent)
        shards.load(1)
        shards.index(2)
    elif kind.startswith("SAE"):
        SAE.load(path.parent)
    elif kind == "snapshots":
        load_snapshots(path)
    elif kind == "pair log":
        from sae_ortho.study.evaluate import pair_stability

        pair_stability(path.parent, 64)
    elif kind == "checkpoint":
        cfg = RunConfig(replace(TINY, d_sae=64, k=4, snapshots=2, train_tokens=128 * 20), seed=0, tau=1.0)
        shards = ActivationShards(path.parents[1] / "acts")
        trainer = Trainer(cfg, shards)
        assert load_checkpoint(trainer, path.parent, cfg.fingerprint(trainer.source.fingerprint))
    else:
        HeldoutSet.load(path.parent)


def _damage(path: Path, how: str) -> bytes:
    original = path.read_bytes()
    if how == "flip":
        data = bytearray(original)
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(original[: len(original) // 2])
    return original


KINDS = [
    "shard",
    "shard index",
    "shard manifest",
    "SAE weights",
    "SAE config",
    "snapshots",
    "pair log",
    "checkpoint",
    "LLM-side cache",
]


@pytest.mark.parametrize("how", ["flip", "truncate"])
@pytest.mark.parametrize("kind", KINDS)
def test_damaged_artefact_stops_its_reader_with_one_line(files, kind, how):
    path = files[kind]
    io._verified.clear()  # as in a fresh process (mtimes are too coarse to tell a write in the same tick)
    _read(kind, path)  # intact: reads
    original = _damage(path, how)
    try:
        io._verified.clear()
        with pytest.raises(CorruptFile) as err:
            _read(kind, path)
        message = str(err.value.code)
        assert "\n" not in message and str(path) in message
        assert "sha256 does not match" in message
        assert ("delete" in message) if kind == "checkpoint" else ("dvc checkout --force" in message)
    finally:
        path.write_bytes(original)


def test_a_stage_process_exits_with_the_one_line(files):
    path = files["SAE weights"]
    original = _damage(path, "flip")
    try:
        out = subprocess.run(
            [sys.executable, "-c", f"from sae_ortho.training.sae import SAE; SAE.load({str(path.parent)!r})"],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    finally:
        path.write_bytes(original)
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith(f"error: {path}: sha256 does not match")


def test_a_file_nothing_records_is_refused(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"abc")
    with pytest.raises(CorruptFile, match="no sha256 recorded"):
        verified(tmp_path / "x.bin")


def test_kill_between_rename_and_checksum_update_leaves_a_readable_file(tmp_path, monkeypatch):
    """atomic_file records the new digest beside the old before the rename: whichever version a kill leaves
    on disk verifies, and after a complete write only the new digest is listed."""
    target = tmp_path / "f.bin"
    with atomic_file(target, digest=True) as tmp:
        tmp.write_bytes(b"old")
    real_replace = os.replace

    def replace_then_die(src, dst):
        real_replace(src, dst)
        if Path(dst) == target:
            raise KeyboardInterrupt  # stands for a SIGKILL right after the rename, before the final update

    monkeypatch.setattr(io.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt), atomic_file(target, digest=True) as tmp:
        tmp.write_bytes(b"new")
    monkeypatch.setattr(io.os, "replace", real_replace)
    io._verified.clear()
    assert verified(target).read_bytes() == b"new"
    assert len((tmp_path / io.DIGESTS).read_text().splitlines()) == 2  # old and new listed until the next write
    with atomic_file(target, digest=True) as tmp:
        tmp.write_bytes(b"newer")
    assert len((tmp_path / io.DIGESTS).read_text().splitlines()) == 1


def test_temporaries_of_dead_writers_are_swept_and_a_live_writers_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale_dir = tmp_path / "models" / f".sae.{dead.pid}.0123abcd.tmp"
    (stale_dir / "inner").mkdir(parents=True)
    stale_file = tmp_path / "metrics" / f".m.json.{dead.pid}.89abcdef.tmp"
    stale_file.parent.mkdir()
    stale_file.write_text("{")
    live = tmp_path / "models" / f".other.{os.getpid()}.fedcba98.tmp"
    live.write_text("being written")
    assert io.remove_stale_temps_under(tmp_path) == 2
    assert not stale_dir.exists() and not stale_file.exists() and live.exists()


def test_a_disk_error_a_library_wraps_ends_in_one_line_naming_the_output(tmp_path):
    """safetensors reports a full disk as SafetensorError "... (os error 28)", not an OSError; here the file
    size limit (`ulimit -f`, EFBIG) stands for the full disk. The open progress bar is closed before the line."""
    code = (
        "import stages, torch; from tqdm import tqdm; from safetensors.torch import save_file;"
        "from sae_ortho.base.io import atomic_file; bar = tqdm(range(3)); next(iter(bar))\n"
        "with atomic_file('out/x.safetensors') as tmp: save_file({'a': torch.zeros(10**6)}, str(tmp))"
    )
    (tmp_path / "out").mkdir()
    out = subprocess.run(
        ["bash", "-c", f'ulimit -f 100 && exec {sys.executable} -c "{code}"'],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 1 and last.startswith("error: out/x.safetensors: File too large"), out.stderr
    assert "Traceback" not in out.stderr and not list((tmp_path / "out").iterdir())


def test_a_fault_fires_in_the_stage_process_never_in_its_children(tmp_path):
    """SAE_ORTHO_FAULT is inherited by a stage's workers and ranks; only the process that imported the package
    first acts on it, so `rename:1` kills the stage itself, not the worker that renames first."""
    child = "from sae_ortho.base.faults import fault_point; fault_point('rename'); print('child lived')"
    parent = (
        "import stages, subprocess, sys; from sae_ortho.base.faults import fault_point;"
        f"print(subprocess.run([sys.executable, '-c', {child!r}], capture_output=True, text=True).stdout.strip());"
        "fault_point('rename'); print('parent lived')"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "SAE_ORTHO_FAULT": "rename:1"}
    env.pop("SAE_ORTHO_FAULT_OWNER", None)
    out = subprocess.run([sys.executable, "-c", parent], env=env, capture_output=True, text=True)
    assert out.returncode == -9 and out.stdout.strip() == "child lived", (out.returncode, out.stdout, out.stderr)
