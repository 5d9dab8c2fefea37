"""One arm of the synthetic evaluation (stages `synthetic_baseline`, `synthetic_ortho`): train an SAE
per (hierarchy, seed) with our trainer on streamed synthetic batches, evaluate it
(sae_ortho/evaluation/synthetic.py), aggregate over seeds with pair-bootstrap intervals."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sae_ortho.base.device import HOST
from sae_ortho.base.io import temp_sibling, verified
from sae_ortho.base.params import Params, SyntheticHierarchy, SyntheticParams
from sae_ortho.base.stats import bootstrap_ci
from sae_ortho.evaluation.synthetic import (
    PAIR_KINDS,
    SyntheticSource,
    build_model,
    evaluate,
    kept_pair_kinds,
    parent_child_pairs,
)
from sae_ortho.training.ortho import pair_budget
from sae_ortho.training.run_config import RunConfig, run_config
from sae_ortho.training.sae import SAE
from sae_ortho.training.train import train

ARMS = ("baseline", "ortho")  # the LM's arms (run_config); the study's arms join here


def synthetic_run_config(p: Params, arm: str, seed: int) -> RunConfig:
    """The LM arm's RunConfig (same tau / topk_fraction / tau_schedule / ortho handling as
    `run_config`) with the synthetic training settings and this training seed."""
    return replace(run_config(p, arm), train=p.synthetic.train, seed=seed)


def json_safe(value):
    """JSON-safe: NaN -> None, floats rounded, numpy scalars and arrays to Python."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if not np.isfinite(value) else round(float(value), 5)
    if isinstance(value, np.integer):
        return int(value)
    return value


def summarise(values: np.ndarray, n_boot: int) -> dict:
    """Mean over seeds and pairs, per-seed means, and the pair-bootstrap 95% interval."""
    values = np.atleast_2d(values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows (e.g. no learned parent) -> NaN
        per_seed = np.nanmean(values, axis=1)
        mean = np.nanmean(values)
    return {"mean": float(mean), "ci95": bootstrap_ci(values, n_boot), "per_seed": per_seed}


PER_PAIR = (
    "absorption",
    "absorption_control",
    "parent_learned",
    "absorption_learned",
    "absorption_control_learned",
    "parent_recall",
    "absorption_normalised",
    "absorption_normalised_learned",
    "parent_recall_m2o",
    "absorption_m2o",
    "absorption_normalised_m2o",
    "parent_learned_m2o",
    "absorption_normalised_m2o_learned",
    "parent_latents_m2o",
    "partial",
    "partial_control",
    "activation_ratio",
    "child_parent_cos",
    "child_parent_cos_control",
)


def aggregate(h: SyntheticHierarchy, pairs: np.ndarray, runs: list[tuple[dict, dict]], s: SyntheticParams) -> dict:
    """One hierarchy's figures over seeds (runs: (training metrics, evaluate() result) per seed)."""
    stacked = {k: np.stack([ev["per_pair"][k] for _, ev in runs]) for k in PER_PAIR}
    out: dict = {
        "structure": {
            "total_root_nodes": h.total_root_nodes,
            "branching_factor": h.branching_factor,
            "max_depth": h.max_depth,
            "num_features": h.num_features,
            "n_pairs": len(pairs),
            "true_l0": float(np.mean([ev["summary"]["true_l0"] for _, ev in runs])),
        },
        **{k: summarise(v, s.bootstrap) for k, v in stacked.items()},
        "absorption_minus_control": summarise(stacked["absorption"] - stacked["absorption_control"], s.bootstrap),
    }
    for key in ("l0", "explained_variance", "mcc", "precision", "recall", "f1", "dead_latents"):
        vals = [ev["summary"][key] for _, ev in runs]
        out[key] = {"mean": float(np.mean(vals)), "per_seed": vals}
    if "kept_pairs_last20pct" in runs[0][0]:
        out["kept_pairs_last20pct"] = {
            kind: {"mean": float(np.mean(vals)), "per_seed": vals}
            for kind in PAIR_KINDS
            if (vals := [m["kept_pairs_last20pct"][kind] for m, _ in runs])
        }
    for key in ("fvu", "mean_abs_cos", "tau", "seconds"):
        if key in runs[0][0]:
            vals = [m[key] for m, _ in runs]
            out[f"train_{key}"] = {"mean": float(np.mean(vals)), "per_seed": vals}
    # Absorption against samples seen, and the figures on a second evaluation draw, of the runs that have them
    # (per run: a dict of figures; seed order kept, runs without them left out).
    curves = [m["curve"] for m, _ in runs if "curve" in m]
    if curves:
        out["curve"] = {n: {k: [c[n][k] for c in curves] for k in curves[0][n]} for n in curves[0]}
    reseeds = [(m["reseed"], ev) for m, ev in runs if "reseed" in m]
    if reseeds:
        out["reseed"] = {
            k: {"redrawn": [r[k] for r, _ in reseeds], "first": [_means(ev)[k] for _, ev in reseeds]}
            for k in reseeds[0][0]
        }
    return out


def settings(s: SyntheticParams, cfg: RunConfig, device: torch.device = HOST) -> dict:
    out = {
        "train": asdict(s.train),
        "steps": s.train.steps,
        "seeds": list(s.seeds),
        "hierarchies": [asdict(h) for h in s.hierarchies],
        **{k: v for k, v in asdict(s).items() if k not in ("train", "seeds", "hierarchies")},
        "uses_ortho": cfg.uses_ortho,
        "sae_lens_version": version("sae-lens"),
        "threads_per_run": 1,  # torch and numba (single_thread)
        "device": str(device),
    }
    if cfg.uses_ortho:
        out |= {
            "tau": cfg.tau,
            "topk_fraction": cfg.topk_fraction,
            "tau_schedule": cfg.tau_schedule,
            "ortho": asdict(cfg.ortho),
            "pair_budget": pair_budget(s.train.d_sae, cfg.topk_fraction),
        }
        if cfg.penalty != "topk":  # the study's arms (absent from the default arms' settings)
            out |= {"penalty": cfg.penalty, "tau_decay": cfg.tau_decay, "ortsae_chunk": cfg.ortsae_chunk}
    if cfg.matryoshka_prefixes:
        out["matryoshka_prefixes"] = list(cfg.matryoshka_prefixes)
    return out


@dataclass(frozen=True)
class SyntheticJob:
    """One synthetic run: train `cfg` on hierarchy `h` of the model `s` describes, evaluate, write `run_dir`.
    `curve`: also evaluate the training snapshots (absorption against samples); `reseed`: also evaluate
    on a second evaluation draw under this seed (the evaluation's own noise)."""

    s: SyntheticParams
    cfg: RunConfig
    h: SyntheticHierarchy
    run_dir: Path
    ckpt_dir: Path
    curve: bool = False
    reseed: int | None = None
    device: torch.device = HOST  # training's; the evaluation runs on the host


def run_jobs(jobs: list[SyntheticJob], workers: int, desc: str, progress_bar: bool = True) -> list[tuple]:
    """(training metrics, evaluation, pairs) per job, in order, `workers` runs at a time (results do not
    depend on it: every run is single-threaded with its own RNG streams)."""
    bar = tqdm(total=len(jobs), desc=desc, unit="run", disable=not progress_bar)
    if min(workers, len(jobs)) <= 1:  # one run: a spawned worker would only add its start-up (~10 s of imports)
        runs = []
        with single_thread():
            for job in jobs:
                runs.append(_one_run(job))
                bar.update(1)
    else:
        # spawn: a forked child would inherit torch's and numba's thread pools in an unknown state.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_single_thread_worker) as pool:
            futures = [pool.submit(_one_run, job) for job in jobs]
            for _ in as_completed(futures):
                bar.update(1)
            runs = [f.result() for f in futures]
    bar.close()
    return runs


def publish(tmp: Path, out_dir: Path, ckpt_root: Path) -> None:
    """The runs wrote into `tmp`; one rename publishes them together."""
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out_dir)
    shutil.rmtree(ckpt_root, ignore_errors=True)


def run_arm(
    p: Params,
    arm: str,
    out_dir: Path,
    ckpt_root: Path,
    workers: int = 1,
    progress_bar: bool = True,
    cfg: RunConfig | None = None,
) -> dict:
    """Train and evaluate one arm on every hierarchy and seed. Writes, atomically as one directory,
    `out_dir/<hierarchy>/seed_<s>/` (the SAE, the ortho arm's pairs.parquet, matching.json: matched
    latents and per-pair figures); returns metrics/synthetic/<arm>.json. `cfg` (any seed) is the run
    of a study arm; by default the LM arm `arm`'s (synthetic_run_config)."""
    s = p.synthetic
    base = replace(cfg, train=s.train) if cfg is not None else synthetic_run_config(p, arm, 0)
    tmp = temp_sibling(out_dir)
    jobs = [
        SyntheticJob(
            s,
            replace(base, seed=seed),
            h,
            tmp / h.name / f"seed_{seed}",
            ckpt_root / h.name / f"seed_{seed}",
            device=p.torch_device,
        )
        for h in s.hierarchies
        for seed in s.seeds
    ]
    given = {**settings(s, base, p.torch_device), "workers": workers}
    result: dict = {"arm": arm, "settings": given, "hierarchies": {}}
    t0 = time.perf_counter()
    runs = run_jobs(jobs, workers, f"synthetic {arm}", progress_bar)
    for h in s.hierarchies:
        mine = [run for job, run in zip(jobs, runs, strict=True) if job.h == h]
        result["hierarchies"][h.name] = aggregate(h, mine[0][2], [(m, ev) for m, ev, _ in mine], s)
    result["seconds"] = time.perf_counter() - t0
    publish(tmp, out_dir, ckpt_root)
    return json_safe(result)


@contextmanager
def single_thread() -> Iterator[None]:
    """One torch and one numba thread: at d_sae ~200 threads only add synchronisation (on the
    shared 2-core machine a contended thread stalls every step), and a fixed count keeps the
    floating-point results independent of the machine."""
    import numba

    torch_threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        numba.set_num_threads(numba_threads)


def _single_thread_worker() -> None:
    import numba

    from sae_ortho.base.dist import die_with_parent

    die_with_parent()  # a killed stage takes its workers with it: none writes on into a dead run's temporary
    torch.set_num_threads(1)
    numba.set_num_threads(1)


_MODELS: dict = {}  # per process: (synthetic params, hierarchy) -> (model, source, pairs)


def _one_run(job: SyntheticJob) -> tuple[dict, dict, np.ndarray]:
    """Train one SAE, evaluate it, write its matching.json; (training metrics, evaluation, pairs)."""
    s, h, run_dir = job.s, job.h, job.run_dir
    if (s, h) not in _MODELS:
        model = build_model(s, h)
        source = SyntheticSource.create(model, cached_batches=s.train.steps)  # every arm replays one draw
        _MODELS[(s, h)] = (model, source, parent_child_pairs(model))
    model, source, pairs = _MODELS[(s, h)]
    cfg = replace(job.cfg, train=replace(job.cfg.train, snapshots=CURVE_POINTS)) if job.curve else job.cfg
    metrics = train(cfg, source, run_dir, job.ckpt_dir, progress_bar=False, device=job.device)
    sae = SAE.load(run_dir)
    ev = evaluate(sae, model, pairs, s)
    matching = {
        "feature_latent": ev["matched"],
        "pairs": pairs,
        "parent_latents": ev["matched"][pairs[:, 0]],
        "child_latents": ev["matched"][pairs[:, 1]],
        "per_pair": ev["per_pair"],
    }
    (run_dir / "matching.json").write_text(json.dumps(json_safe(matching)) + "\n")
    if (run_dir / "pairs.parquet").exists():  # ortho arms: what the penalty acted on, late in training
        import pyarrow.parquet as pq

        kept = pq.read_table(verified(run_dir / "pairs.parquet")).to_pandas()
        late = kept[kept.step >= 0.8 * kept.step.max()]
        metrics["kept_pairs_last20pct"] = kept_pair_kinds(late.i.to_numpy(), late.j.to_numpy(), ev["matched"], pairs)
    if job.curve:
        metrics["curve"] = _curve(run_dir, sae, model, pairs, s, ev)
    if job.reseed is not None:
        metrics["reseed"] = _means(evaluate(sae, model, pairs, replace(s, eval_seed=job.reseed)))
    return metrics, ev, pairs


CURVE_POINTS = 4  # snapshots at 1/4, 1/2, 3/4 and all of training (the last is the final SAE, full precision)


def _means(ev: dict) -> dict[str, float]:
    """Every per-pair figure's mean over pairs, and the summary figures, of one evaluation."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN (no learned parent)
        out = {k: float(np.nanmean(ev["per_pair"][k])) for k in PER_PAIR}
    return out | {k: float(v) for k, v in ev["summary"].items()}


def _curve(run_dir: Path, sae: SAE, model, pairs: np.ndarray, s: SyntheticParams, final: dict) -> dict:
    """samples seen -> figures, from the run's snapshots (fp16 weights, the stability stage's format)."""
    from sae_ortho.training.snapshots import SNAPSHOTS, load_snapshots

    snaps = load_snapshots(run_dir / SNAPSHOTS)
    (run_dir / SNAPSHOTS).unlink()  # 4 copies of a 200-latent SAE per run: the figures are what is kept
    out = {}
    for step, weights in snaps.items():
        if step == max(snaps):
            out[step * s.train.batch_size] = _means(final)
            continue
        snap = SAE(sae.cfg)
        with torch.no_grad():
            for name, value in weights.items():
                getattr(snap, name).copy_(value)
        out[step * s.train.batch_size] = _means(evaluate(snap, model, pairs, s))
    return out
