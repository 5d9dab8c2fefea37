"""Where one synthetic-benchmark run's time goes (issue 18, item 7: measure before making runs cheaper).

One run = train an SAE on SAELens's synthetic model (976 steps of 1024 samples at the default) and
evaluate it. This times, single-threaded as the synthetic stages run, the phases separately at the exact
configs: drawing the training samples alone, training on pre-drawn samples (the step without sampling),
the evaluation, and the whole run as the stage does it; at d_sae = number of features (k 8) and at 2x
(k 6, below the true L0 of 7.1), for the baseline and the top-k orthogonality arm.
`python -m bench.synthetic_run` -> metrics/bench_synthetic_run.json.
"""

from __future__ import annotations

import json
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
    source, pairs = SyntheticSource.create(model), parent_child_pairs(model)
    t = s.train
    batches, sampling_s = timed(lambda: list(islice(source.stream(t.batch_size, cfg.seed), t.steps)))
    init = source.sample(8192, cfg.seed + 1)  # what train() draws for the b_dec initialisation
    pre = PreDrawn(batches, init, source.d_in, source.norm_mean, source.fingerprint)
    _, step_s = timed(lambda: train(cfg, pre, work / "pre", work / "pre_ckpt", progress_bar=False))
    _, eval_s = timed(lambda: evaluate(SAE.load(work / "pre"), model, pairs, s))
    _, whole_s = timed(lambda: train(cfg, source, work / "run", work / "run_ckpt", progress_bar=False))
    return {
        "hierarchy": h.name,
        "arm": arm,
        "d_sae": d_sae,
        "k": k,
        "steps": t.steps,
        "batch_size": t.batch_size,
        "sampling_s": round(sampling_s, 2),
        "training_on_predrawn_s": round(step_s, 2),
        "evaluation_s": round(eval_s, 2),
        "train_as_the_stage_does_s": round(whole_s, 2),
        "run_total_s": round(whole_s + eval_s, 2),
        "sampling_share_of_training": round(sampling_s / whole_s, 3),
        "ms_per_step_without_sampling": round(1000 * step_s / t.steps, 2),
    }


def main() -> None:
    p = params_mod.load_or_exit()
    h = p.synthetic.hierarchies[0]
    n = h.num_features
    rows = []
    with single_thread(), tempfile.TemporaryDirectory() as tmp:
        for d_sae, k in ((n, 8), (2 * n, 6)):
            for arm in ("baseline", "ortho"):
                work = Path(tmp) / f"{arm}_{d_sae}"
                rows.append(one_config(p, h, arm, d_sae, k, work))
                print(json.dumps(rows[-1]))
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "threads": 1,
        "note": "one core, as the synthetic stages run each SAE; seconds, one repetition per config",
        "runs": rows,
    }
    atomic_write_text(OUT, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
