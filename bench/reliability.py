"""The reliability suite (issue 21), `make reliability` -> metrics/reliability.json. Not a speed benchmark: it
injects faults into the real pipeline and checks what survives.

On a temporary git copy of the repository with tiny parameters (tests/pipeline_copy.py), the default pipeline
and the study are reproduced once, stage by stage, as the reference (each stage's wall time, the atomic
renames it passes, the seconds it spends verifying checksums). Then, from a seeded plan saved with the
results, each fault reruns one stage with `dvc repro -f -s` under SAE_ORTHO_FAULT (sae_ortho/base/faults.py):
SIGKILL just before the stage's last atomic rename (an output's final rename), and SIGKILL at a random time
of its run. After each kill it checks that DVC recorded nothing (both dvc.lock files and the DVC cache are as
before), reruns `dvc repro -s`, and checks that the stage's outputs equal the reference byte for byte except
the volatile fields (bench/reliability_repo.py: times, ratios of times, what says the run resumed), with no
temporary left behind once the next stage starts.

Then the bad-input catalogue: every key of params.yaml and study/params.yaml with a wrong type and an
out-of-range value generated from the schema (one process, the loader the stages call), a few of them
through a real stage command (one line, exit 2), a missing and an empty corpus, a layer the model lacks, a
disk that fills mid-write and a read-only output directory (a small tmpfs where this machine may mount one,
else `ulimit -f`), corrupted files of every checked kind, and a queued `dvc exp run` beside a running
`dvc repro` (bench/reliability_inputs.py). Identical shards mean no token was lost or duplicated.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.reliability_inputs import concurrency, corruption, disk_faults, parameter_catalogue, stage_inputs
from bench.reliability_repo import (
    VOLATILE,
    VOLATILE_SUFFIXES,
    VOLATILE_WORDS,
    Factory,
    cache_objects,
    differences,
    dvc,
    env,
    lock_entries,
    stage_kind,
    stage_order,
    stray_temps,
    uncached_files,
)
from tests.conftest import REPO
from tests.pipeline_copy import copy_repo, write_tiny_study


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


def inject(repo: Path, fault: dict) -> dict:
    """One fault: the stage killed, DVC checked to have recorded nothing, the stage rerun by `dvc repro`, its
    outputs compared with those of the uninterrupted run it replaced (same inputs), modulo volatile fields."""
    stage = fault["stage"]
    # Up to date first: an earlier fault's rerun upstream changed volatile fields this stage renders (the
    # report tabulates training times), and the comparison is with a run on the same inputs.
    dvc(repo, "repro", "-s", stage)
    ref_lock, ref_files = lock_entries(repo), uncached_files(repo)
    spec = fault["fault"]
    for _ in range(4):
        lock_before, cache_before = lock_entries(repo), cache_objects(repo)
        killed = dvc(repo, "repro", "-f", "-s", stage, SAE_ORTHO_FAULT=spec)
        if killed.returncode != 0 or not spec.startswith("after:"):
            break
        # The stage finished first (the reference's time includes cold caches): half the delay, again.
        spec = f"after:{float(spec.split(':')[1]) / 2:.2f}"
    result = {**fault, "fired": killed.returncode != 0, "fired_with": spec}
    # DVC recorded nothing of the killed run: both locks as before it, no new object in the cache.
    result["nothing_recorded"] = lock_entries(repo) == lock_before and cache_objects(repo) <= cache_before
    rerun = dvc(repo, "repro", "-s", stage)
    result["rerun_ok"] = rerun.returncode == 0
    if not result["rerun_ok"]:
        result["error"] = rerun.stderr.strip().splitlines()[-1:]
    result["differs"] = differences(repo, stage, ref_lock, ref_files) if result["rerun_ok"] else ["(rerun failed)"]
    # A rerun that DVC restores from its run cache runs no code of ours, so the killed writer's hidden
    # temporaries (ignored by DVC) stay until the next stage starts: every stage sweeps them (stages/__init__).
    result["hidden_temps_after_rerun"] = stray_temps(repo)
    subprocess.run([sys.executable, "-c", "import stages"], cwd=repo, env=env(), check=True)
    result["stray_temps"] = stray_temps(repo)
    result["survived"] = (
        result["nothing_recorded"] and result["rerun_ok"] and not result["differs"] and not result["stray_temps"]
    )
    if not result["survived"]:  # back to the recorded outputs for the next fault
        dvc(repo, "checkout", "--force")
    return result


WARM_MODEL_CACHE = "from sae_ortho.data.lm import load_smollm2_tl; load_smollm2_tl()"


def _hardware_noise() -> dict:
    """make hardware-noise's figures (a separate target: three full default runs take longer than this suite)."""
    path = REPO / "metrics/hardware_noise.json"
    if not path.exists():
        return {"measured": False, "how": "make hardware-noise"}
    noise = json.loads(path.read_text())
    keys = ("commit", "variants", "noise_by_metric", "bit_identical_everywhere", "differ_somewhere")
    return {"measured": True, "source": "metrics/hardware_noise.json", **{k: noise[k] for k in keys}}


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
        repo = copy_repo(Factory(root), "repo")
        write_tiny_study(repo)
        (root / "work").mkdir()
        # A cold converted-model cache adds renames to the first LM stage of the reference only (the cache's
        # own SHA256SUMS): warm it, so that "the last rename" of a stage is the same in every run.
        subprocess.run([sys.executable, "-c", WARM_MODEL_CACHE], cwd=repo, env=env(), check=True)
        ref = reference_run(repo, stage_order(repo), root / "work")
        state.write_text(json.dumps({"repo": str(repo), "ref": ref}))
    work = root / "work"
    faults = plan(ref, args.seed)
    if args.kinds:
        faults = [f for f in faults if f["kind"] in args.kinds]
    results = []
    for n, fault in enumerate(faults, 1):
        results.append(inject(repo, fault))
        r = results[-1]
        print(
            f"[{n}/{len(faults)}] {fault['stage']} {fault['fault']}: fired {r['fired']}, survived {r['survived']}",
            file=sys.stderr,
        )
    catalogue = parameter_catalogue(repo, work)
    inputs = stage_inputs(repo)
    corrupt = corruption(repo)
    dvc(repo, "repro", "-s", "train")  # up to date after the corruption sweep's direct stage runs
    disks = disk_faults(repo, lock_entries(repo), uncached_files(repo))
    queued = concurrency(repo, lock_entries(repo), uncached_files(repo))
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
        "volatile_fields": sorted(VOLATILE) + [f"*{w}*" for w in VOLATILE_WORDS] + [f"*{s}" for s in VOLATILE_SUFFIXES],
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
        "queued_experiment_beside_repro": queued,
        "hardware_noise": _hardware_noise(),
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
