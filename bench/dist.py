"""Benchmark: data-parallel training's communication per step (issue 20), in one run: one process x B against
2 gloo processes x B/2 on the same global batch, for the baseline and the top-k orthogonality arm (TopK 32).

Under torchrun every rank times the collectives the trainer makes (the gradients' and statistics' all-reduces,
the codes gathered to rank 0, the pairs broadcast) and counts the bytes it sends. A rank's time inside a
collective includes waiting for the other rank: on rank 1 of the orthogonality arm, the broadcast holds rank 0's
selection. This machine has 2 cores, so 2 processes share them and no speed-up is expected; the figures are the
overhead. `python -m bench.dist [--d-sae 4608] [--batch 4096] [--steps 10]` -> metrics/bench_dist.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.distributed as tdist

from bench.train import ours_step
from sae_ortho.base import dist
from sae_ortho.base.device import HOST
from sae_ortho.base.io import atomic_write_text
from sae_ortho.base.params_train import DistParams
from sae_ortho.data.shards import ActivationShards

COLLECTIVES = ("all_reduce", "gather", "broadcast", "all_gather_object", "gather_object", "broadcast_object_list")
ARMS = {"baseline": 0.0, "ortho": 0.1}


def _bytes_sent(first) -> int:
    tensors = first if isinstance(first, list | tuple) else [first]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class CommMeter:
    """Seconds inside, calls to and bytes sent by torch.distributed's collectives, per collective."""

    def __init__(self) -> None:
        self.reset()
        for name in COLLECTIVES:
            setattr(tdist, name, self._timed(name, getattr(tdist, name)))

    def reset(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.sent: dict[str, int] = defaultdict(int)

    def _timed(self, name: str, collective):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = collective(*args, **kwargs)
            self.seconds[name] += time.perf_counter() - t0
            self.calls[name] += 1
            self.sent[name] += _bytes_sent(args[0]) if args else 0
            return out

        return timed

    def per_step(self, steps: int) -> dict:
        return {
            "comm_s_per_step": sum(self.seconds.values()) / steps,
            "bytes_sent_per_step": sum(self.sent.values()) // steps,
            "by_collective": {
                n: {"s_per_step": self.seconds[n] / steps, "calls_per_step": self.calls[n] / steps,
                    "bytes_per_step": self.sent[n] // steps}
                for n in sorted(self.seconds)
            },
        }  # fmt: skip


def measure(args, meter: CommMeter | None = None) -> dict:
    """Median step time per arm on the same global batch (each rank trains its rows of it)."""
    shards = ActivationShards(args.activations)
    x = shards.load(0).float()[: args.batch]
    out = {}
    for arm, tau in ARMS.items():
        step, _, _ = ours_step(shards, x, "topk", 32, args.d_sae, tau, 0)
        for _ in range(args.warmup):
            step()
        if meter is not None:
            meter.reset()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        out[arm] = {"step_s": statistics.median(times)}
        if meter is not None:
            out[arm] |= meter.per_step(args.steps)
    return out


def child(args) -> None:
    """One rank under torchrun: measure with the collectives timed; rank 0 writes every rank's figures."""
    with dist.process_group(DistParams(backend="gloo"), HOST):
        meter = CommMeter()
        mine = measure(args, meter)
        meter.reset()
        ranks = dist.all_gather_objects(mine)
    if dist.is_main():
        Path(args.child_out).write_text(json.dumps(ranks))


def two_processes(args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ranks.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "bench.dist"]
        argv = [*sys.argv[1:], "--child-out", str(out)]
        subprocess.run([*cmd, *argv], env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--activations", default="data/activations")
    parser.add_argument("--out", default="metrics/bench_dist.json")
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_out:
        return child(args)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    one_thread = measure(args)
    torch.set_num_threads(threads)
    one = measure(args)
    ranks = two_processes(args)
    summary = {}
    for arm in ARMS:
        two_step = max(r[arm]["step_s"] for r in ranks)  # a step ends when the slower rank's does
        summary[arm] = {
            "one_process_step_s": one[arm]["step_s"],
            "one_process_one_thread_step_s": one_thread[arm]["step_s"],
            "two_processes_step_s": two_step,
            "comm_s_per_step_by_rank": [r[arm]["comm_s_per_step"] for r in ranks],
            "comm_share_of_step_by_rank": [r[arm]["comm_s_per_step"] / r[arm]["step_s"] for r in ranks],
            "bytes_sent_per_step_by_rank": [r[arm]["bytes_sent_per_step"] for r in ranks],
            # 2 one-thread processes on 2 cores against 1 one-thread process: 0.5 would be perfect scaling
            "two_vs_one_thread_step_ratio": two_step / one_thread[arm]["step_s"],
        }
    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor(), "torch_threads": threads},
        "config": {"d_sae": args.d_sae, "batch": args.batch, "arch": "topk32", "steps": args.steps,
                   "tau": ARMS["ortho"], "backend": "gloo"},
        "summary": summary,
        "ranks": ranks,
    }  # fmt: skip
    atomic_write_text(Path(args.out), json.dumps(record, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
