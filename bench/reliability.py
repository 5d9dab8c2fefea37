"""The reliability suite (issue 21), `make reliability` -> metrics/reliability.json. Not a speed benchmark: it
injects faults into the real pipeline and checks what survives.

On a temporary git copy of the repository with tiny parameters (tests/pipeline_copy.py), the default pipeline
and the study are reproduced once, stage by stage, as the reference (each stage's wall time, the atomic
renames it passes, the seconds it spends verifying checksums). Then, from a seeded plan saved with the
results, each fault reruns one stage with `dvc repro -f -s` under SAE_ORTHO_FAULT (sae_ortho/base/faults.py):
SIGKILL just before the stage's last atomic rename (an output's final rename), and SIGKILL at a random time
of its run. After each kill it checks that DVC recorded nothing (both dvc.lock files and the DVC cache are as
before), reruns `dvc repro -s`, and checks that the stage's outputs equal the reference byte for byte except
the fields listed in VOLATILE (timings and what says the run resumed), with no temporary left behind.

Then the bad-input catalogue: every key of params.yaml and study/params.yaml with a wrong type and an
out-of-range value generated from the schema (one process, the loader the stages call), a few of them
through a real stage command (one line, exit 2), a missing and an empty corpus, a layer the model lacks, a
disk that fills mid-write and a read-only output directory (a small tmpfs where this machine may mount one,
else `ulimit -f`).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
import typing
from pathlib import Path

import yaml

from tests.pipeline_copy import copy_repo, write_tiny_study

# Fields that legitimately differ between an interrupted-and-resumed run and an uninterrupted one.
VOLATILE = {"seconds", "elapsed_s", "resumed", "resumed_from_context", "tokens_this_run", "timestamp", "step_seconds"}
VOLATILE_SUFFIXES = ("_seconds", "_per_s", "_per_second", "_s")
DVC = [sys.executable, "-m", "dvc"]


class _Factory:  # copy_repo takes pytest's tmp_path_factory
    def __init__(self, root: Path):
        self.root = root

    def mktemp(self, name: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.root))


def _env(**extra: str) -> dict[str, str]:
    import os

    from tests.conftest import stage_env

    return {**stage_env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **extra}


def dvc(repo: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*DVC, *args], cwd=repo, env=_env(**env), capture_output=True, text=True)


def stage_order(repo: Path) -> list[str]:
    """Both pipelines' stages, every stage after the stages it depends on."""
    code = (
        "from dvc.repo import Repo; import json, networkx as nx; g = Repo('.').index.graph; "
        "print(json.dumps([s.addressing for s in reversed(list(nx.topological_sort(g)))]))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, env=_env(), capture_output=True, text=True)
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
    if path.suffix == ".tsv":
        rows = [line.split("\t") for line in path.read_text().splitlines()]
        keep = [i for i, h in enumerate(rows[0]) if h != "timestamp"] if rows else []
        return [[r[i] for i in keep] for r in rows]
    return path.read_bytes()


def _drop_volatile(value):
    if isinstance(value, dict):
        return {
            k: _drop_volatile(v) for k, v in value.items() if k not in VOLATILE and not k.endswith(VOLATILE_SUFFIXES)
        }
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


def reference_run(repo: Path, order: list[str], work: Path) -> dict[str, dict]:
    """Every stage once, in order, with its renames traced and its verification cost logged."""
    ref = {}
    for addressing in order:
        trace, verify = work / f"trace.{len(ref)}", work / f"verify.{len(ref)}"
        start = time.perf_counter()
        out = dvc(repo, "repro", "-s", addressing, SAE_ORTHO_FAULT_TRACE=str(trace), SAE_ORTHO_VERIFY_LOG=str(verify))
        seconds = time.perf_counter() - start
        if out.returncode != 0:
            raise SystemExit(f"reference run of {addressing} failed:\n{out.stderr[-3000:]}")
        per_pid: dict[str, int] = {}
        for line in trace.read_text().splitlines() if trace.exists() else []:
            name, pid = line.split()
            if name == "rename":
                per_pid[pid] = per_pid.get(pid, 0) + 1
        costs = [json.loads(line) for line in verify.read_text().splitlines()] if verify.exists() else []
        ref[addressing] = {
            "kind": stage_kind(repo, addressing),
            "seconds": round(seconds, 2),
            "renames": max(per_pid.values(), default=0),
            "verify_seconds": round(sum(c["seconds"] for c in costs), 4),
            "verify_bytes": sum(c["bytes"] for c in costs),
        }
        print(f"reference {addressing}: {seconds:.1f} s, {ref[addressing]['renames']} renames", file=sys.stderr)
    return ref


def plan(ref: dict[str, dict], seed: int, per_kind: int = 2) -> list[dict]:
    """Per stage kind: SIGKILL before the last rename of one of its stages, and at random times of others."""
    rng = random.Random(seed)
    faults = []
    kinds = sorted({r["kind"] for r in ref.values()})
    for kind in kinds:
        stages = sorted(a for a, r in ref.items() if r["kind"] == kind)
        stage = rng.choice(stages)
        if ref[stage]["renames"]:
            faults.append(
                {"stage": stage, "kind": kind, "fault": f"rename:{ref[stage]['renames']}", "at": "last rename"}
            )
        for _ in range(per_kind - 1 if ref[stage]["renames"] else per_kind):
            stage = rng.choice(stages)
            secs = round(rng.uniform(0.1, 0.9) * max(ref[stage]["seconds"] - 4.0, 1.0), 2)  # ~4 s: dvc and imports
            faults.append({"stage": stage, "kind": kind, "fault": f"after:{secs}", "at": "random time"})
    return faults


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


def inject(repo: Path, fault: dict, ref_lock: dict, ref_files: dict) -> dict:
    stage = fault["stage"]
    lock_before, cache_before = lock_entries(repo), cache_objects(repo)
    killed = dvc(repo, "repro", "-f", "-s", stage, SAE_ORTHO_FAULT=fault["fault"])
    result = {**fault, "fired": killed.returncode != 0}
    # DVC recorded nothing of the killed run: both locks as before it, no new object in the cache.
    result["nothing_recorded"] = lock_entries(repo) == lock_before and cache_objects(repo) <= cache_before
    rerun = dvc(repo, "repro", "-s", stage)
    result["rerun_ok"] = rerun.returncode == 0
    if not result["rerun_ok"]:
        result["error"] = rerun.stderr.strip().splitlines()[-1:]
    result["differs"] = differences(repo, stage, ref_lock, ref_files) if result["rerun_ok"] else ["(rerun failed)"]
    result["stray_temps"] = stray_temps(repo)
    result["survived"] = (
        result["nothing_recorded"] and result["rerun_ok"] and not result["differs"] and not result["stray_temps"]
    )
    if not result["survived"]:  # back to the reference for the next fault
        dvc(repo, "checkout", "--force")
    return result


# ------------------------------------------------------------------------------------------------------
# Bad inputs


def _leaf_hint(cls: type, key: str):
    for part in key.split(".")[:-1]:
        cls = typing.get_type_hints(cls)[part]
    return typing.get_type_hints(cls)[key.split(".")[-1]]


def bad_values(hint) -> list[tuple[str, object]]:
    """A wrong-type and an out-of-range value for a key of this type, from the type alone."""
    origin = typing.get_origin(hint)
    if hint is bool:
        return [("type", "yes")]
    if hint is int:
        return [("type", "ten"), ("range", -(10**9))]
    if hint is float:
        return [("type", "ten"), ("range", -1e9), ("range", float("nan"))]
    if hint is str:
        return [("type", 12), ("range", "")]
    if origin is typing.Literal:
        return [("type", 3.5), ("range", "no_such_choice")]
    if origin is tuple:
        item = typing.get_args(hint)[0]
        return [("type", "x"), ("range", [-(10**9)] if item in (int, float) else [""])]  # an empty name
    return [("type", 3.5)]


def _set(raw: dict, key: str, value) -> dict:
    raw = copy.deepcopy(raw)
    node = raw
    for part in key.split(".")[:-1]:
        node = node.setdefault(part, {})
    node[key.split(".")[-1]] = value
    return raw


def parameter_catalogue(repo: Path, work: Path) -> dict:
    """Every key, every generated bad value, through the loader the stages call; what it said."""
    from sae_ortho.base import params as params_mod
    from sae_ortho.base import study_params
    from sae_ortho.base.schema import ParamError, schema_rows

    files = [
        (params_mod.Params, repo / "params.yaml", params_mod.load),
        (study_params.StudyParams, repo / "study/params.yaml", study_params.load_study),
    ]
    tried, rejected, accepted, unclean = 0, 0, [], []
    for cls, path, loader in files:
        raw = yaml.safe_load(path.read_text())
        for key, *_ in schema_rows(cls):
            default = _get(raw, key)
            for kind, value in bad_values(_leaf_hint(cls, key)):
                if value == default:  # e.g. an empty list where empty is the default: not out of range
                    continue
                tried += 1
                bad = work / "bad.yaml"
                bad.write_text(yaml.safe_dump(_set(raw, key, value)))
                try:
                    loader(bad)
                    accepted.append(f"{key}={value!r} ({kind})")
                except ParamError as err:
                    rejected += 1 if key in str(err) else 0
                    if key not in str(err):
                        unclean.append(f"{key}={value!r}: message names another key: {err}")
                except Exception as err:  # noqa: BLE001 (anything but ParamError is a finding)
                    unclean.append(f"{key}={value!r}: {type(err).__name__}: {err}")
    return {"tried": tried, "rejected_cleanly": rejected, "accepted": accepted, "unclean": unclean}


def _get(raw: dict, key: str):
    node = raw
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _listing(repo: Path) -> list[str]:
    return sorted(str(p.relative_to(repo)) for d in ("data", "models", "metrics") for p in (repo / d).rglob("*"))


def stage_inputs(repo: Path) -> list[dict]:
    """Bad inputs through real stage commands: each must give one line on stderr and a non-zero exit
    before writing anything."""
    cases = []

    def case(name: str, cmd: list[str], prepare, restore) -> None:
        prepare()
        before = cache_objects(repo), _listing(repo)
        out = subprocess.run([sys.executable, "-m", *cmd], cwd=repo, env=_env(), capture_output=True, text=True)
        restore()
        lines = out.stderr.strip().splitlines()
        after = cache_objects(repo), _listing(repo)
        ok = out.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:") and before == after
        cases.append(
            {
                "case": name,
                "exit": out.returncode,
                "stderr": lines[-3:],
                "clean": ok,
                "nothing_written": before == after,
            }
        )

    params = (repo / "params.yaml").read_text()
    corpus = repo / "data" / "corpus.parquet"
    saved = repo / "corpus.saved"

    def set_params(**change) -> None:
        raw = yaml.safe_load(params)
        for key, value in change.items():
            raw = _set(raw, key.replace("__", "."), value)
        (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    def restore_params() -> None:
        (repo / "params.yaml").write_text(params)

    case(
        "wrong type (train.k: ten)",
        ["stages.train", "--name", "ortho"],
        lambda: set_params(train__k="ten"),
        restore_params,
    )
    case(
        "out of range (train.lr: -1)",
        ["stages.train", "--name", "ortho"],
        lambda: set_params(train__lr=-1.0),
        restore_params,
    )
    case("a layer the model lacks (layer: 99)", ["stages.extract"], lambda: set_params(layer=99), restore_params)
    case("missing corpus", ["stages.extract"], lambda: corpus.rename(saved), lambda: saved.rename(corpus))

    def empty_corpus() -> None:
        import pandas as pd

        corpus.rename(saved)
        pd.DataFrame({"doc_id": [], "source": [], "text": []}).to_parquet(corpus)

    case("empty corpus", ["stages.extract"], empty_corpus, lambda: saved.replace(corpus))
    return cases


# A file of each checked kind in the tiny repository, and a stage command that reads it.
CORRUPTIONS = [
    ("data/activations/shard_00001.safetensors", ["stages.train", "--name", "ortho"]),
    ("data/activations/index/shard_00000.parquet", ["stages.llm_cache"]),
    ("data/activations/manifest.json", ["stages.train", "--name", "ortho"]),
    ("models/ortho/sae_state.safetensors", ["stages.core", "--sae", "ortho", "--dir", "models/ortho"]),
    ("models/ortho/pairs.parquet", ["stages.stability"]),
    ("models/ortho/snapshots.safetensors", ["stages.stability"]),
    ("data/heldout/heldout.safetensors", ["stages.core", "--sae", "ortho", "--dir", "models/ortho"]),
    ("data/probe_acts/language_id.safetensors", ["stages.probing", "--sae", "ortho", "--dir", "models/ortho"]),
    (
        "data/letters/seed_0/absorption_acts.safetensors",
        ["stages.absorption", "--sae", "ortho", "--dir", "models/ortho"],
    ),
    ("data/letters/tokenizer/tokenizer.json", ["stages.absorption", "--sae", "ortho", "--dir", "models/ortho"]),
]


def corruption(repo: Path) -> list[dict]:
    """Each file flipped by one byte, then truncated to half: its reader must stop with one line naming it
    and `dvc checkout --force <file>` (the advice the line gives) must bring the recorded bytes back."""
    results = []
    for rel, cmd in CORRUPTIONS:
        path = repo / rel
        if not path.exists():
            results.append({"file": rel, "skipped": "not in this pipeline"})
            continue
        original = path.read_bytes()
        for how in ("flip", "truncate"):
            data = bytearray(original)
            if how == "flip":
                data[len(data) // 2] ^= 0x01
            else:
                del data[len(data) // 2 :]
            path.unlink()  # DVC may have linked the file to its cache: never write through the link
            path.write_bytes(bytes(data))
            out = subprocess.run([sys.executable, "-m", *cmd], cwd=repo, env=_env(), capture_output=True, text=True)
            lines = out.stderr.strip().splitlines()
            restored = dvc(repo, "checkout", "--force", rel)
            results.append(
                {
                    "file": rel,
                    "damage": how,
                    "exit": out.returncode,
                    "stderr": lines[-2:],
                    "one_line_naming_it": out.returncode != 0 and len(lines) == 1 and rel in lines[0],
                    "checkout_restores": restored.returncode == 0 and path.read_bytes() == original,
                }
            )
    return results


def disk_faults(repo: Path, ref_lock: dict, ref_files: dict) -> list[dict]:
    """A disk that fills mid-write and a read-only output directory, under the train stage (its checkpoints
    and its SAE go to models/): a small tmpfs mounted over models/ where this machine allows it."""
    results = []
    target = repo / "models"
    for name, options in (("disk full", "size=256k"), ("read-only", "size=64m,ro")):
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
        cmd = [sys.executable, "-m", "stages.train", "--name", "ortho"]
        how = "tmpfs over models/"
        if mounted.returncode != 0:  # no mount here: a file-size limit stands for the full disk
            if name == "read-only":
                results.append({"case": name, "skipped": "cannot mount a filesystem on this machine"})
                continue
            cmd, how = ["bash", "-c", "ulimit -f 256 && exec " + " ".join(cmd)], "ulimit -f 256 (KiB)"
        out = subprocess.run(cmd, cwd=repo, env=_env(), capture_output=True, text=True)
        half_written = stray_temps(repo) + (
            [str(p) for p in target.rglob("*") if p.is_file()] if mounted.returncode == 0 else []
        )
        if mounted.returncode == 0:
            subprocess.run(["umount", str(target)], check=True)
        lines = out.stderr.strip().splitlines()
        rerun = dvc(repo, "repro", "-s", "train")
        results.append(
            {
                "case": name,
                "how": how,
                "exit": out.returncode,
                "stderr": lines[-3:],
                "one_line": out.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"),
                "half_written": half_written,
                "rerun_identical": rerun.returncode == 0 and not differences(repo, "train", ref_lock, ref_files),
            }
        )
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=21)
    ap.add_argument("--out", default="metrics/reliability.json")
    ap.add_argument("--kinds", nargs="*", help="only these stage kinds (default: all)")
    ap.add_argument("--workdir", help="keep the work here (default: a temporary directory, removed)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="reliability-"))
    root.mkdir(parents=True, exist_ok=True)
    state = root / "reference.json"
    if state.exists():  # a kept workdir: its reference run is reused (for working on the suite itself)
        saved = json.loads(state.read_text())
        repo, ref = Path(saved["repo"]), saved["ref"]
    else:
        repo = copy_repo(_Factory(root), "repo")
        write_tiny_study(repo)
        (root / "work").mkdir()
        ref = reference_run(repo, stage_order(repo), root / "work")
        state.write_text(json.dumps({"repo": str(repo), "ref": ref}))
    work = root / "work"
    ref_lock, ref_files = lock_entries(repo), uncached_files(repo)
    faults = plan(ref, args.seed)
    if args.kinds:
        faults = [f for f in faults if f["kind"] in args.kinds]
    results = []
    for n, fault in enumerate(faults, 1):
        results.append(inject(repo, fault, ref_lock, ref_files))
        r = results[-1]
        print(
            f"[{n}/{len(faults)}] {fault['stage']} {fault['fault']}: fired {r['fired']}, survived {r['survived']}",
            file=sys.stderr,
        )
    catalogue = parameter_catalogue(repo, work)
    inputs = stage_inputs(repo)
    corrupt = corruption(repo)
    disks = disk_faults(repo, ref_lock, ref_files)
    fired = [r for r in results if r["fired"]]
    by_kind: dict[str, dict] = {}
    for r in results:
        k = by_kind.setdefault(r["kind"], {"injected": 0, "fired": 0, "survived": 0})
        k["injected"] += 1
        k["fired"] += r["fired"]
        k["survived"] += r["fired"] and r["survived"]
    verify = {
        kind: {
            "verify_seconds": round(sum(r["verify_seconds"] for r in ref.values() if r["kind"] == kind), 3),
            "stage_seconds": round(sum(r["seconds"] for r in ref.values() if r["kind"] == kind), 1),
        }
        for kind in sorted({r["kind"] for r in ref.values()})
    }
    for v in verify.values():
        v["share"] = round(v["verify_seconds"] / v["stage_seconds"], 5) if v["stage_seconds"] else 0.0
    report = {
        "seed": args.seed,
        "command": "make reliability  (python -m bench.reliability)",
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "volatile_fields": sorted(VOLATILE) + [f"*{s}" for s in VOLATILE_SUFFIXES],
        "faults": {
            "injected": len(results),
            "fired": len(fired),
            "survived_identical": sum(r["survived"] for r in fired),
            "by_kind": by_kind,
        },
        "bad_parameters": catalogue,
        "bad_inputs": inputs,
        "corruption": corrupt,
        "disk": disks,
        "verification_cost": verify,
        "plan": faults,
        "results": results,
        "reference": ref,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("wall_seconds", "faults")}, indent=1))
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
