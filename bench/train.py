"""Benchmark: SAE training step time with and without the orthogonality term, the pair selection
(numba kernel and torch) against scipy's sparse product and a dense F^T F, and SAELens's training step for the same
architecture, side by side on the same real activation batches. Writes metrics/bench_train.json.

    python -m bench.train [--sizes 4608 16384] [--batch 4096] [--steps 9] [--warmup 3]
                                 [--archs relu topk32 topk64]

ReLU codes are benchmarked at a realistic sparsity: b_enc is set so each latent fires with
probability relu_l0 / d_sae (a freshly initialised ReLU SAE fires ~half its latents).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from sae_ortho.base.io import atomic_write_text
from sae_ortho.base.params import TrainParams
from sae_ortho.data.shards import ActivationShards
from sae_ortho.training.ortho import add_ortho_grad_, ortho_terms, pair_budget, select_pairs_csr, select_pairs_scipy
from sae_ortho.training.run_config import RunConfig
from sae_ortho.training.trainer import Trainer

ARCHS = {"relu": ("relu", 32), "topk32": ("topk", 32), "topk64": ("topk", 64)}


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ours_step(shards, x: torch.Tensor, arch: str, k: int, d_sae: int, tau: float, relu_l0: int):
    t = TrainParams(architecture=arch, d_sae=d_sae, k=k, batch_size=len(x), train_tokens=len(x) * 1000)
    trainer = Trainer(RunConfig(t, seed=0, tau=tau), shards)
    if arch == "relu":
        with torch.no_grad():
            pre = trainer.sae.pre_acts(x * trainer.sae.cfg.input_scale)
            trainer.sae.b_enc -= torch.quantile(pre[:1024], 1 - relu_l0 / d_sae, dim=0)
    stats = {}

    def step():
        stats.update(trainer.train_step(x))

    return step, stats, trainer


def dense_selection(f: torch.Tensor, fraction: float) -> None:
    coact = f.T @ f
    d = coact.shape[0]
    mask = torch.ones(d, d, dtype=torch.bool).triu(1)
    torch.topk(coact[mask], pair_budget(d, fraction))


def saelens_step(x: torch.Tensor, arch: str, k: int, d_sae: int):
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    if arch == "relu":
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=x.shape[1], d_sae=d_sae, l1_coefficient=5.0))
        coefficients = {"l1": 5.0}
    else:
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=d_sae, k=k))
        coefficients = {}
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    count = [0]

    def step():
        out = sae.training_forward_pass(TrainStepInput(x, coefficients, dead, count[0], False))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        count[0] += 1

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4608, 16384])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--fraction", type=float, default=0.001)
    parser.add_argument("--relu-l0", type=int, default=48)
    parser.add_argument("--activations", default="data/activations")
    parser.add_argument("--out", default="metrics/bench_train.json")
    args = parser.parse_args()
    shards = ActivationShards(args.activations)
    x = shards.load(0).float()[: args.batch]
    results = []
    for d_sae in args.sizes:
        for label in args.archs:
            arch, k = ARCHS[label]
            row = {"d_sae": d_sae, "arch": label, "batch": args.batch}
            base_step, _, _ = ours_step(shards, x, arch, k, d_sae, 0.0, args.relu_l0)
            ortho_step, stats, trainer = ours_step(shards, x, arch, k, d_sae, 0.1, args.relu_l0)
            lens_step = saelens_step(x, arch, k, d_sae)
            # Interleave the three so machine noise hits them alike.
            times = {"ours": [], "ours_ortho": [], "saelens": []}
            for _ in range(args.warmup):  # first steps run slow (allocator, page faults, JIT caches)
                for fn in (base_step, ortho_step, lens_step):
                    fn()
            steps = [("ours", base_step), ("ours_ortho", ortho_step), ("saelens", lens_step)]
            for r in range(args.steps):
                # Rotate the order: the step that runs right after SAELens's pays to re-fault the
                # memory SAELens freed, which biased a fixed order by about 10%.
                for name, fn in steps[r % 3 :] + steps[: r % 3]:
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
            med = {name: statistics.median(v) for name, v in times.items()}
            with torch.no_grad():
                codes, _, _ = trainer.encode_decode(x * trainer.sae.cfg.input_scale)
                f = codes.dense(d_sae)
            l0_b = torch.bincount(codes.rows[codes.values > 0], minlength=len(x))
            row["pair_products"] = int((l0_b * (l0_b - 1)).sum() // 2)
            row["selection_sparse_s"] = median_time(
                lambda c=codes, d=d_sae: select_pairs_csr(c.offsets, c.cols, c.values, d, args.fraction), 5
            )
            row["selection_torch_s"] = median_time(
                lambda c=codes, d=d_sae: select_pairs_csr(c.offsets, c.cols, c.values, d, args.fraction, "torch"), 5
            )
            row["selection_scipy_s"] = median_time(lambda f=f: select_pairs_scipy(f, args.fraction), 1)
            pairs = select_pairs_csr(codes.offsets, codes.cols, codes.values, d_sae, args.fraction)
            w_dec, grad = trainer.sae.W_dec, torch.zeros_like(trainer.sae.W_dec)

            def loss_and_grad(w_dec=w_dec, grad=grad, pairs=pairs):
                _, _, cos = ortho_terms(w_dec, pairs)
                add_ortho_grad_(grad, w_dec, pairs.i, pairs.j, cos, 0.1)

            row["ortho_loss_and_grad_s"] = median_time(loss_and_grad, 5)
            if (label == "topk32" and d_sae <= 16384) or d_sae <= 4608:  # a d_sae^2 matrix: 17 GB at 65536
                row["selection_dense_s"] = median_time(lambda f=f: dense_selection(f, args.fraction), 1)
            row.update({f"step_{name}_s": round(v, 4) for name, v in med.items()})
            row["l0"] = stats["l0"]
            row["ortho_overhead"] = round(med["ours_ortho"] / med["ours"] - 1, 4)
            # Same-round ratios too: robust to a slow patch of machine time hitting one round.
            paired = [o / b for o, b in zip(times["ours_ortho"], times["ours"], strict=True)]
            row["ortho_overhead_paired"] = round(statistics.median(paired) - 1, 4)
            row["numba_selection_vs_step"] = round(row["selection_sparse_s"] / med["ours"], 4)
            row["torch_selection_vs_step"] = round(row["selection_torch_s"] / med["ours"], 4)
            row["tokens_per_s_ours"] = round(args.batch / med["ours"], 1)
            row["tokens_per_s_saelens"] = round(args.batch / med["saelens"], 1)
            row["speedup_vs_saelens"] = round(med["saelens"] / med["ours"], 3)
            if "selection_dense_s" in row:
                row["dense_selection_vs_step"] = round(row["selection_dense_s"] / med["ours"], 3)
            row["raw_s"] = times
            results.append(row)
            print(
                f"d_sae {d_sae:>6} {label:7} L0 {row['l0']:5.1f} step {med['ours']:.3f}s "
                f"ortho +{row['ortho_overhead']:.1%} "
                f"(selection numba {row['selection_sparse_s']:.3f}s torch {row['selection_torch_s']:.3f}s, "
                f"loss {row['ortho_loss_and_grad_s']:.3f}s, "
                f"scipy {row['selection_scipy_s']:.3f}s) "
                f"saelens {med['saelens']:.3f}s "
                f"-> {row['speedup_vs_saelens']:.2f}x",
                flush=True,
            )
    out = {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "fraction": args.fraction,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
