"""The reliability suite's view of a pipeline copy (bench/reliability.py): running DVC in it, its stages in
dependency order, what DVC recorded, and its outputs compared with a reference modulo the volatile fields."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

# Fields that legitimately differ between an interrupted-and-resumed run and an uninterrupted one: what says
# the run resumed, and what a clock measured (times, rates, and the penalty's overhead, a ratio of times).
VOLATILE = {"resumed", "resumed_from_context", "tokens_this_run", "timestamp"}
VOLATILE_WORDS = ("seconds", "overhead")
VOLATILE_SUFFIXES = ("_s", "_per_s", "_per_second")


def volatile(key: str) -> bool:
    return key in VOLATILE or any(w in key for w in VOLATILE_WORDS) or key.endswith(VOLATILE_SUFFIXES)


DVC = [sys.executable, "-m", "dvc"]


class Factory:  # copy_repo takes pytest's tmp_path_factory
    def __init__(self, root: Path):
        self.root = root

    def mktemp(self, name: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.root))


def env(**extra: str) -> dict[str, str]:
    from tests.conftest import stage_env

    return {**stage_env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **extra}


def dvc(repo: Path, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*DVC, *args], cwd=repo, env=env(**extra_env), capture_output=True, text=True)


def stage_order(repo: Path) -> list[str]:
    """Both pipelines' stages, every stage after the stages it depends on."""
    code = (
        "from dvc.repo import Repo; import json, networkx as nx; g = Repo('.').index.graph; "
        "print(json.dumps([s.addressing for s in reversed(list(nx.topological_sort(g)))]))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env(), capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def stage_kind(repo: Path, addressing: str) -> str:
    """The stage module a stage runs (`python -m stages.<kind>`): stages of one kind share their code."""
    file, _, name = addressing.rpartition(":")
    spec = yaml.safe_load((repo / (file or "dvc.yaml")).read_text())["stages"][name.split("@")[0]]
    cmd = spec.get("do", spec).get("cmd")
    return cmd.split("stages.", 1)[1].split()[0]


def lock_entries(repo: Path) -> dict[str, dict]:
    out = {}
    for lock, prefix in (("dvc.lock", ""), ("study/dvc.lock", "study/dvc.yaml:")):
        if (repo / lock).exists():
            for name, entry in yaml.safe_load((repo / lock).read_text())["stages"].items():
                out[prefix + name] = entry
    return out


def cache_objects(repo: Path) -> set[str]:
    return {str(p.relative_to(repo)) for p in (repo / ".dvc" / "cache").rglob("*") if p.is_file()}


def normalised(path: Path):
    """A metrics file without its volatile fields (JSON), or a dvclive table without its timestamps."""
    if path.suffix == ".json":
        return _drop_volatile(json.loads(path.read_text()))
    if path.suffix == ".tsv":  # a dvclive series: a timed one keeps its steps only
        rows = [line.split("\t") for line in path.read_text().splitlines()]
        keep = [i for i, h in enumerate(rows[0]) if h == "step" or not (volatile(h) or volatile(path.stem))]
        return [[r[i] for i in keep] for r in rows] if rows else []
    return path.read_bytes()


def _drop_volatile(value):
    if isinstance(value, dict):
        return {k: _drop_volatile(v) for k, v in value.items() if not volatile(k)}
    if isinstance(value, list):
        return [_drop_volatile(v) for v in value]
    return value


def uncached_files(repo: Path) -> dict[str, object]:
    """Every metrics file (cache: false outputs live there), normalised."""
    return {str(p.relative_to(repo)): normalised(p) for p in (repo / "metrics").rglob("*") if p.is_file()}


def stray_temps(repo: Path) -> list[str]:
    return [
        str(p.relative_to(repo))
        for p in repo.rglob(".*.tmp")
        if not any(part in (".git", ".dvc") for part in p.relative_to(repo).parts)
    ]


def differences(repo: Path, stage: str, ref_lock: dict, ref_files: dict) -> list[str]:
    """Outputs of `stage` that differ from the reference beyond the volatile fields."""
    now = lock_entries(repo).get(stage, {})
    diffs = []
    for before, after in zip(ref_lock[stage].get("outs", []), now.get("outs", []), strict=False):
        if before == after:
            continue
        path = repo / before["path"]
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            rel = str(f.relative_to(repo))
            if rel not in ref_files or normalised(f) != ref_files[rel]:
                diffs.append(rel)
    if len(now.get("outs", [])) != len(ref_lock[stage].get("outs", [])):
        diffs.append("the list of outputs")
    return diffs
