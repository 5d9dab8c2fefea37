"""Data parallel over torchrun (params.yaml `dist`): one launcher, the rank facts, and the collectives the
stages use. With one process every function here is a no-op, so single-process code runs unchanged.

A stage's entry point calls `launch(p.dist, "stages.<name>")` before any work. With `dist.nproc_per_node`
> 1 and not already under torchrun, it reruns the same command as
`python -m torch.distributed.run --standalone --nproc-per-node N -m stages.<name> <args>` and exits with
its status, so `dvc repro` and `dvc exp run -S dist.nproc_per_node=2` need nothing else. Across nodes the
user starts torchrun on every node (README: "Data parallel"); the stage sees torchrun's environment and
does not relaunch.

Rank 0 alone writes outputs, metrics and dvclive; the others write only their own shards or nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as tdist

from sae_ortho.base import device
from sae_ortho.base.params_train import DistParams

UNDER_TORCHRUN = "TORCHELASTIC_RUN_ID"  # set by torchrun for its workers


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def launch(dp: DistParams, module: str, argv: list[str] | None = None) -> None:
    """Return when this process should do the stage's work; otherwise run it under torchrun and exit."""
    if UNDER_TORCHRUN in os.environ or dp.nproc_per_node * dp.nnodes == 1:
        return
    if dp.nnodes > 1:
        sys.exit(
            f"error: dist.nnodes is {dp.nnodes}: start torchrun on every node yourself "
            "(README, 'Data parallel': torchrun --nnodes ... --rdzv-backend c10d --rdzv-endpoint host:port ...)"
        )
    args = sys.argv[1:] if argv is None else argv
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={dp.nproc_per_node}"]
    # One thread per process unless the user says otherwise (torchrun's own default, stated here so that it
    # does not warn); on this project's 2-core machines two processes share the cores.
    # PYTHONFAULTHANDLER: a rank killed by a fatal signal (SIGABRT, SIGSEGV) prints its Python stack, which
    # torchrun's summary ("exitcode: -6") does not.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONFAULTHANDLER": "1"}
    raise SystemExit(subprocess.call([*cmd, "-m", module, *args], env=env))


def die_with_parent() -> None:
    """torchrun starts its workers in sessions of their own, so a SIGKILL of torchrun (or of the `dvc repro`
    above it, or of its process group) would leave the ranks running on, writing outputs nobody asked for
    and removing the checkpoint a rerun needs. On Linux a worker asks the kernel for SIGKILL when its parent
    dies (prctl PR_SET_PDEATHSIG), and exits at once if the parent is already gone."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request: nothing would signal us
        os._exit(1)


def backend_for(dp: DistParams, dev: torch.device) -> str:
    if dp.backend != "auto":
        return dp.backend
    return "gloo" if device.on_host(dev) else "nccl"


def rank_device(dev: torch.device) -> torch.device:
    """The device of this rank: GPU ranks take the GPU of their local rank on their node."""
    return device.on_local_rank(dev, local_rank()) if world_size() > 1 else dev


@contextmanager
def process_group(dp: DistParams, dev: torch.device) -> Iterator[None]:
    """The default process group while the stage works (nothing with one process)."""
    if world_size() == 1:
        yield
        return
    die_with_parent()
    backend = backend_for(dp, dev)
    if backend == "nccl":
        torch.cuda.set_device(rank_device(dev))
    tdist.init_process_group(backend, timeout=timedelta(minutes=30))
    try:
        yield
    finally:
        tdist.destroy_process_group()


def active() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def barrier() -> None:
    if active():
        tdist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In place: the sum over ranks (float sums arrive in the backend's order)."""
    if active():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank."""
    if not active():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not active():
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def gather_to_main(obj):
    """Every rank's `obj` on rank 0, in rank order (None elsewhere). Pickled over the process group: for
    evaluation caches of a few hundred MB, not for per-step traffic."""
    if not active():
        return [obj]
    out = [None] * tdist.get_world_size() if is_main() else None
    tdist.gather_object(obj, out, dst=0)
    return out
