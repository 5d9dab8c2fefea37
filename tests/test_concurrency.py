"""Concurrency the project owns (issue 21): processes writing under the same names at the same time.

Temporary files are named per process (`.<name>.<pid>.<random>.tmp`), outputs land by one rename, and a
file with a digest is renamed and recorded under its directory's lock, so two writers of one name leave one
writer's whole output, and a reader never sees a file its SHA256SUMS does not list. The converted-model cache
and numba's cache are shared by every stage and every experiment on a machine: built by two processes at
once, each is whole and gives the same model and the same kernels. (DVC itself refuses a second `dvc repro`
in one workspace; a queued `dvc exp run` runs in a workspace of its own: the reliability suite runs one
beside a `dvc repro`, bench/reliability_inputs.py.)
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from sae_ortho.base.io import atomic_dir, atomic_file
    target, tag = Path(sys.argv[1]), sys.argv[2]
    for n in range(40):
        with atomic_file(target / "run" / "weights.bin", digest=True) as tmp:
            tmp.write_bytes((tag * 1000 + str(n)).encode())
        with atomic_dir(target / "sae", digests=True) as tmp:
            for part in ("a", "b"):
                (tmp / part).write_text(tag * 500)
    """
)
READER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from sae_ortho.base import io
    path, deadline, checks = Path(sys.argv[1]), time.time() + 60, 0
    while not path.exists():
        time.sleep(0.01)
    while time.time() < deadline and not Path(sys.argv[2]).exists():
        io._verified.clear()  # verify every time, as a fresh process would
        io.verified(path)
        checks += 1
    print(checks)
    """
)


def _popen(code: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_writers_of_one_name_leave_one_whole_output_and_a_reader_always_verifies(tmp_path):
    from sae_ortho.base.io import verified, verified_dir

    done = tmp_path / "writers_done"
    reader = _popen(READER, str(tmp_path / "run" / "weights.bin"), str(done))
    writers = [_popen(WRITER, str(tmp_path), tag) for tag in "xy"]
    for w in writers:
        _, err = w.communicate(timeout=120)
        assert w.returncode == 0, err[-2000:]
    done.touch()
    out, err = reader.communicate(timeout=120)
    assert reader.returncode == 0, err[-2000:]  # a CorruptFile while the writers raced would fail here
    assert int(out) > 0
    verified(tmp_path / "run" / "weights.bin")
    verified_dir(tmp_path / "sae")
    contents = {(tmp_path / "sae" / part).read_text() for part in ("a", "b")}
    assert contents in ({"x" * 500}, {"y" * 500})  # one writer's whole directory, never a mix
    assert not [p for p in tmp_path.rglob("*.tmp")], "a temporary file was left behind"


LOAD_MODEL = textwrap.dedent(
    """
    import hashlib
    from sae_ortho.data.lm import load_smollm2_tl
    model = load_smollm2_tl()
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode()); h.update(tensor.contiguous().numpy().tobytes())
    print(h.hexdigest())
    """
)


@pytest.mark.slow  # ~45 s: two cold conversions of SmolLM2 (make test-slow)
def test_two_stages_building_the_model_cache_at_once(tmp_path):
    """Two cold processes convert SmolLM2 into one empty cache at once: both load the same weights, the
    cache holds one whole entry and no temporary, and a third process loads from it."""
    env = {"SAE_ORTHO_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    procs = [_popen(LOAD_MODEL, env=env) for _ in range(2)]
    digests = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
        digests.append(out.strip())
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(entries) == 1 and not entries[0].startswith("."), entries
    third = _popen(LOAD_MODEL, env=env)
    out, err = third.communicate(timeout=600)
    assert third.returncode == 0, err[-2000:]
    assert digests[0] == digests[1] == out.strip()


@pytest.mark.slow  # ~30 s: three compilations of the parallel selection kernel (make test-slow)
def test_two_processes_compiling_into_one_numba_cache(tmp_path):
    """numba's on-disk cache (index and object files written by whoever compiles first) shared by two cold
    processes: both compute the same kernels' results, and a third loads them from the cache."""
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    code = "from tests.test_kernel_determinism import digest; print(digest())"
    procs = [_popen(code, env=env) for _ in range(2)]
    digests = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
        digests.append(out.strip())
    cached = sorted(p.suffix for p in (tmp_path / "numba").rglob("*") if p.is_file())
    assert ".nbi" in cached and ".nbc" in cached, cached
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "numba").rglob("*.nbc")}
    third = _popen(code, env=env)
    out, err = third.communicate(timeout=600)
    assert third.returncode == 0, err[-2000:]
    assert digests[0] == digests[1] == out.strip()
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "numba").rglob("*.nbc")}
    assert after == before  # loaded, not compiled and written again
