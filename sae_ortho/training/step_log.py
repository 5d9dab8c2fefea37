"""Per-step statistics with no host sync per step off the CPU.

On the CPU reading a tensor is free, so every step's statistics become Python floats at once and a
non-finite loss stops the run before the step that produced it is applied (the last good state is the one
before it). On a GPU each `.item()` would stall the stream, so a step's statistics stay tensors, its
timing is a pair of CUDA events, and a non-finite loss is folded into one flag on the device; all three
are read when the trainer settles: at logging and checkpoint steps. A non-finite loss found there stops
the run, and its last good state is the latest checkpoint (which was settled, so finite).
"""

from __future__ import annotations

import math

import torch

from sae_ortho.base.device import StepTimer, on_host


class NonFiniteLoss(RuntimeError):
    """The step's loss was NaN or infinite; the message names the step and the loss parts."""


def host_stats(raw: dict, batch: int) -> dict[str, float]:
    """A step's statistics as floats, computed as they always were: L0 is the active count over the
    batch in Python, the logged loss the SAE loss's value plus the penalty's (a host float)."""
    out = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in raw.items()}
    out["loss"] = out["loss"] + out.pop("penalty_value")
    out["l0"] = out["l0"] / batch
    return out


class StepLog:
    """Timing, finiteness and statistics of the trainer's steps (module docstring)."""

    def __init__(self, device: torch.device, sync_each_step: bool | None = None):
        self.sync_each_step = on_host(device) if sync_each_step is None else sync_each_step
        self.timer = StepTimer(device)  # CUDA events on a GPU, perf_counter on the CPU
        self._finite = torch.ones((), dtype=torch.bool, device=device)
        self._first_unsettled: int | None = None
        self._penalty_s: list[float] = []
        self.times: list[tuple[float, float]] = []  # (step, penalty) seconds of every settled step

    def start(self) -> None:
        self.timer.start()

    def check_finite(self, step: int, loss: torch.Tensor, penalty_value: float, parts: dict) -> None:
        """Before the step is applied: on the CPU raise now; elsewhere fold into the device flag."""
        if self.sync_each_step:
            total = loss.item() + penalty_value
            if not math.isfinite(total):
                shown = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in parts.items()}
                raise NonFiniteLoss(f"non-finite loss ({total}) at step {step}: {shown}")
            return
        if self._first_unsettled is None:
            self._first_unsettled = step
        self._finite &= torch.isfinite(loss)
        if not math.isfinite(penalty_value):
            self._finite.fill_(False)

    def finish(self, raw: dict, batch: int) -> dict:
        """End of a step: its host statistics on the CPU; elsewhere `raw`, for `settle` at a logging step."""
        self.timer.stop()
        self._penalty_s.append(raw["penalty_seconds"])
        return self.settle(raw, batch) if self.sync_each_step else raw

    def settle(self, raw: dict, batch: int) -> dict[str, float]:
        """One sync: step times since the last settle, the finiteness flag, this step's statistics as floats."""
        seconds = self.timer.elapsed()
        self.times.extend(zip(seconds, self._penalty_s, strict=True))
        self._penalty_s.clear()
        if not bool(self._finite):
            first, self._first_unsettled = self._first_unsettled, None
            raise NonFiniteLoss(f"non-finite loss between steps {first} and {raw['step']}")
        self._first_unsettled = None
        stats = host_stats(raw, batch)
        # "step_seconds" sits where the trainer always put it: before "penalty_seconds".
        penalty_s = stats.pop("penalty_seconds")
        return {**stats, "step_seconds": seconds[-1], "penalty_seconds": penalty_s}
