"""Where one synthetic-benchmark run's time goes, and its cost before and after the replayed draws (issue 18 item 7).

One run = train an SAE on SAELens's synthetic model (976 steps of 1024 samples at the default) and
evaluate it. This times, single-threaded as the synthetic stages run, the phases separately at the exact
configs: drawing the training samples alone, training on pre-drawn samples (the step without sampling),
the evaluation, and the whole run as the stage does it; at d_sae = number of features (k 8) and at 2x
(k 6, below the true L0 of 7.1), for the baseline and the top-k orthogonality arm.
`python -m bench.synthetic_run` -> metrics/bench_synthetic_run.json.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path

import torch

from sae_ortho.base import params as params_mod
from sae_ortho.base.io import atomic_write_text
from sae_ortho.base.paths import CACHE_ENV
from sae_ortho.evaluation import synthetic_draws as draws
from sae_ortho.evaluation.synthetic import SyntheticSource, build_model, evaluate, parent_child_pairs
from sae_ortho.evaluation.synthetic_arms import single_thread, synthetic_run_config
from sae_ortho.training.sae import SAE
from sae_ortho.training.train import train

OUT = Path("metrics/bench_synthetic_run.json")


@dataclass
class PreDrawn:
    """The same batches as a SyntheticSource, drawn before training starts (a BatchSource)."""

    batches: list[torch.Tensor]
    init: torch.Tensor
    d_in: int
    norm_mean: float
    fingerprint: str

    def stream(self, batch_size: int, seed: int):
        yield from self.batches
        raise RuntimeError("pre-drawn batches exhausted")

    def sample(self, n: int, seed: int) -> torch.Tensor:
        return self.init[:n]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def one_config(p, h, arm: str, d_sae: int, k: int, work: Path) -> dict:
    s = replace(p.synthetic, train=replace(p.synthetic.train, d_sae=d_sae, k=k))
    cfg = replace(synthetic_run_config(p, arm, seed=s.seeds[0]), train=s.train)
    model = build_model(s, h)
    live, pairs = SyntheticSource.create(model), parent_child_pairs(model)
    t = s.train
    batches, sampling_s = timed(lambda: list(islice(live.stream(t.batch_size, cfg.seed), t.steps)))
    init = live.sample(8192, cfg.seed + 1)  # what train() draws for the b_dec initialisation
    pre = PreDrawn(batches, init, live.d_in, live.norm_mean, live.fingerprint)
    _, step_s = timed(lambda: train(cfg, pre, work / "pre", work / "pre_ckpt", progress_bar=False))
    # Before: samples drawn live during training, the evaluation draws its samples (cold cache).
    _, live_train_s = timed(lambda: train(cfg, live, work / "live", work / "live_ckpt", progress_bar=False))
    draws.clear_eval_draws()
    _, cold_eval_s = timed(lambda: evaluate(SAE.load(work / "live"), model, pairs, s))
    # After: the stream replayed from the per-machine cache (drawn and stored once per instance and seed,
    # timed apart), the evaluation draw shared with every other run of the process (warm).
    cached = replace(live, cached_batches=t.steps)
    _, store_s = timed(lambda: next(cached.stream(t.batch_size, cfg.seed)))
    _, replay_train_s = timed(lambda: train(cfg, cached, work / "replay", work / "replay_ckpt", progress_bar=False))
    _, warm_eval_s = timed(lambda: evaluate(SAE.load(work / "replay"), model, pairs, s))
    before, after = live_train_s + cold_eval_s, replay_train_s + warm_eval_s
    return {
        "hierarchy": h.name,
        "arm": arm,
        "d_sae": d_sae,
        "k": k,
        "steps": t.steps,
        "batch_size": t.batch_size,
        "sampling_s": round(sampling_s, 2),
        "training_on_predrawn_s": round(step_s, 2),
        "ms_per_step_without_sampling": round(1000 * step_s / t.steps, 2),
        "before_run_s": round(before, 2),
        "before_train_s": round(live_train_s, 2),
        "before_evaluation_s": round(cold_eval_s, 2),
        "after_run_s": round(after, 2),
        "after_train_s": round(replay_train_s, 2),
        "after_evaluation_s": round(warm_eval_s, 2),
        "draw_and_store_once_s": round(store_s, 2),
        "speedup": round(before / after, 2),
    }


def main() -> None:
    p = params_mod.load_or_exit()
    h = p.synthetic.hierarchies[0]
    n = h.num_features
    rows = []
    with single_thread(), tempfile.TemporaryDirectory() as tmp:
        os.environ[CACHE_ENV] = str(Path(tmp) / "cache")  # an empty draw cache: the one-off draw is timed too
        for d_sae, k in ((n, 7), (2 * n, 5)):  # the study's regimes (study/params.yaml synthetic_grid)
            for arm in ("baseline", "ortho"):
                work = Path(tmp) / f"{arm}_{d_sae}"
                rows.append(one_config(p, h, arm, d_sae, k, work))
                print(json.dumps(rows[-1]))
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "threads": 1,
        "note": "one core, as the synthetic stages run each SAE; seconds, one repetition per config. before: "
        "samples drawn live, evaluation draw cold (the old code also drew it twice: its cost was higher still); "
        "after: the study's path (stream replayed from the cache, evaluation draw shared)",
        "runs": rows,
    }
    atomic_write_text(OUT, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
