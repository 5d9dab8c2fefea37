"""Where tensors live and how the LM computes: the one place that turns `device` and `lm_dtype` into torch.

Every stage resolves its device here (a test greps the library for device literals elsewhere). `cpu` is
the default so that the same params give the same results on any machine; `auto` takes the first CUDA
GPU when one is present. The resolved device is recorded in every output's metrics (`record`).
"""

from __future__ import annotations

import re
import time

import numpy as np
import torch

HOST = torch.device("cpu")  # where host-side work happens (numpy, numba, files, RNG draws) whatever the device
DEVICE_SPEC = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")
LM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve(spec: str) -> torch.device:
    """`cpu | cuda | cuda:N | auto` as a torch.device; a CUDA device that is not there is a one-line error."""
    if not DEVICE_SPEC.match(spec):
        raise ValueError(f"device: {spec!r} is not one of cpu, cuda, cuda:N, auto")
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {spec} asked for, but torch sees no CUDA GPU (use device: cpu or auto)")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device: {spec} asked for, but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
        device = torch.device("cuda", index)
    return device


def on_local_rank(device: torch.device, local_rank: int) -> torch.device:
    """Data parallel: each process on a node takes the GPU of its local rank; CPU ranks share the host."""
    return torch.device("cuda", local_rank) if device.type == "cuda" else device


def on_host(x: torch.Tensor | torch.device) -> bool:
    """Whether a tensor (or device) is on the CPU, where the numba kernels run."""
    return (x if isinstance(x, torch.device) else x.device).type == HOST.type


def lm_dtype(name: str) -> torch.dtype:
    if name not in LM_DTYPES:
        raise ValueError(f"lm_dtype: {name!r} is not one of {', '.join(LM_DTYPES)}")
    return LM_DTYPES[name]


def record(device: torch.device, dtype: torch.dtype | None = None) -> dict:
    """What a metrics file says about where it was computed."""
    out = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(device)
    if dtype is not None:
        out["lm_dtype"] = str(dtype).removeprefix("torch.")
    return out


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A host copy for numpy/numba code: works for tensors on any device (a no-op copy on CPU)."""
    return t.detach().cpu().numpy()


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host batch onto `device`: through pinned memory with a non-blocking copy on CUDA, unchanged on CPU."""
    device = torch.device(device)
    if device.type != "cuda" or t.device == device:
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class StepTimer:
    """Wall time of training steps without a host sync per step: CUDA events recorded every step and read
    only at logging steps (`elapsed`), perf_counter on CPU. Times the work, not the kernel launches."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._seconds: list[float] = []
        self._start: torch.cuda.Event | float | None = None

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._start, end))
        else:
            self._seconds.append(time.perf_counter() - self._start)

    def elapsed(self) -> list[float]:
        """Seconds of each step since the last call (syncs once on CUDA: call at logging steps only)."""
        if self.cuda and self._events:
            self._events[-1][1].synchronize()
            self._seconds.extend(a.elapsed_time(b) / 1000 for a, b in self._events)
            self._events.clear()
        out, self._seconds = self._seconds, []
        return out
