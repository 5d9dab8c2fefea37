"""Hardware noise of the headline metrics (issue 21), `make hardware-noise` -> metrics/hardware_noise.json.

The default pipeline up to `headline` is reproduced from a clean clone of HEAD once per kernel path on this
machine: the defaults (2 threads, the host's instruction set: AVX-512 here), torch's AVX2 kernels with numba
compiling for haswell (a machine without AVX-512), and one thread for torch, OpenMP and numba. Each clone
runs its own code with its own DVC cache and model cache (the converted model, the synthetic draws), so
nothing is shared between the variants but the venv and the sha256-checked downloads. The default can
instead be taken from a clone that `make repro` reproduced on the same pipeline code (`--default-from`).

Written: per output DVC records, whether its bytes equal the default run's; per headline metric (arm x
metric, timings excluded), each variant's value and the largest absolute difference from the default.
The study's report counts an LM difference only when it exceeds this noise as well as the evaluation's
reseed noise (sae_ortho/study/report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from sae_ortho.base.paths import CACHE_ENV, downloads_dir

VARIANTS: dict[str, dict[str, str]] = {
    "default": {},
    "avx2_haswell": {"ATEN_CPU_CAPABILITY": "avx2", "NUMBA_CPU_NAME": "haswell"},
    "one_thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"},
}
# Headline fields that measure time, not the SAE.
TIMINGS = {"train_seconds", "penalty_overhead"}
REPO = Path(__file__).resolve().parents[1]


# What decides the pipeline's outputs: a clone whose commit differs from HEAD only elsewhere (README, bench/)
# ran the same pipeline.
PIPELINE_CODE = ["sae_ortho", "stages", "dvc.yaml", "params.yaml", "requirements.txt", "pyproject.toml", "Makefile"]


def head(repo: Path) -> str:
    return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=repo, text=True).strip()


def same_pipeline(repo: Path) -> bool:
    diff = subprocess.run(["git", "diff", "--quiet", head(repo), "HEAD", "--", *PIPELINE_CODE], cwd=REPO)
    return diff.returncode == 0


def run_variant(name: str, work: Path, target: str) -> dict:
    clone = work / name
    if (clone / "done.json").exists():  # a rerun of the suite keeps the variants it finished
        return json.loads((clone / "done.json").read_text())
    if not (clone / ".git").exists() or not same_pipeline(clone):  # an interrupted clone resumes
        subprocess.run(["rm", "-rf", str(clone)], check=True)
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    # Each variant converts the model and draws the synthetic data under its own kernels (the conversion
    # dequantises and folds layer norms: arithmetic); the sha256-checked downloads are shared, hard-linked.
    cache = work / f"{name}.cache"
    if not cache.exists() and downloads_dir().exists():
        cache.mkdir(parents=True)
        subprocess.run(["cp", "-al", str(downloads_dir()), str(cache / "downloads")], check=True)
    env = {
        **{k: v for k, v in os.environ.items() if k not in {"OMP_NUM_THREADS", "MKL_NUM_THREADS"}},
        CACHE_ENV: str(cache),
        "PYTHONPATH": str(clone),  # the clone's own code, whatever happens to the working tree meanwhile
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "TQDM_DISABLE": "1",
        **VARIANTS[name],
    }
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", target],
        cwd=clone,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    (clone / "repro.log").write_text(proc.stdout)
    if proc.returncode:
        sys.exit(f"error: variant {name}: dvc repro failed (log: {clone / 'repro.log'})")
    result = {"env": VARIANTS[name], "wall_s": round(time.time() - start, 1), **finished_run(clone)}
    (clone / "done.json").write_text(json.dumps(result))
    return result


def finished_run(repo: Path) -> dict:
    """The outputs and headline of a repo whose pipeline ran to `headline` on HEAD's pipeline code."""
    if not same_pipeline(repo):
        sys.exit(f"error: {repo} is at {head(repo)[:8]}, whose pipeline code differs from HEAD's")
    return {
        "outs": lock_outs(repo / "dvc.lock"),
        "headline": json.loads((repo / "metrics/headline.json").read_text()),
    }


def lock_outs(lock: Path) -> dict[str, str]:
    outs = {}
    for stage in yaml.safe_load(lock.read_text())["stages"].values():
        for out in stage.get("outs", []):
            outs[out["path"]] = out["md5"]
    return outs


def summarise(runs: dict[str, dict]) -> dict:
    ref = runs["default"]
    others = [run for name, run in runs.items() if name != "default"]
    outputs = {  # a default taken from a full `dvc repro` has outputs past the variants' target
        path: {name: run["outs"].get(path) == md5 for name, run in runs.items() if name != "default"}
        for path, md5 in ref["outs"].items()
        if all(path in run["outs"] for run in others)
    }
    metrics = {}
    for arm, figures in ref["headline"].items():
        for metric, value in figures.items():
            if metric in TIMINGS or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            values = {name: run["headline"][arm][metric] for name, run in runs.items()}
            metrics[f"{arm}:{metric}"] = {
                "values": values,
                "max_abs_difference": max(abs(v - value) for v in values.values()),
            }
    by_metric: dict[str, float] = {}
    for key, m in metrics.items():
        metric = key.split(":", 1)[1]
        by_metric[metric] = max(by_metric.get(metric, 0.0), m["max_abs_difference"])
    return {
        "variants": {
            name: {k: v for k, v in run.items() if k not in {"outs", "headline"}} for name, run in runs.items()
        },
        "outputs_identical": outputs,
        "bit_identical_everywhere": sorted(p for p, same in outputs.items() if all(same.values())),
        "differ_somewhere": sorted(p for p, same in outputs.items() if not all(same.values())),
        "headline": metrics,
        "noise_by_metric": by_metric,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--target", default="headline", help="the DVC stage each variant reproduces up to")
    ap.add_argument("--workdir", default="/tmp/hardware_noise", help="the clones (kept: a rerun resumes)")
    ap.add_argument("--out", default="metrics/hardware_noise.json")
    ap.add_argument(
        "--default-from",
        type=Path,
        help="take the default variant from this clone of HEAD, already reproduced (e.g. `make repro`'s)",
    )
    ap.add_argument("--parallel", action="store_true", help="run the variants at once (outputs only: timings lose)")
    args = ap.parse_args()
    if "default" not in args.variants:
        sys.exit("error: --variants must include default (the reference)")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    runs = {}
    if args.default_from:
        runs["default"] = {"env": {}, "wall_s": None, "from": str(args.default_from), **finished_run(args.default_from)}
    todo = [name for name in args.variants if name not in runs]
    print(f"[hardware noise] running {', '.join(todo)}", flush=True)
    # Thread counts, not load, decide the kernels' partitions: running the variants at once changes no output.
    with ThreadPoolExecutor(len(todo) if args.parallel else 1) as pool:
        for name, run in zip(todo, pool.map(lambda n: run_variant(n, work, args.target), todo), strict=True):
            runs[name] = run
            print(f"[hardware noise] {name} done in {run['wall_s']} s", flush=True)
    result = {"commit": head(REPO), "target": args.target, "parallel": args.parallel, **summarise(runs)}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["noise_by_metric"], indent=1))


if __name__ == "__main__":
    main()
