"""Where training batches come from: the BatchSource protocol, and the extraction shards as one
(shuffled, memory-bounded batches streamed from disk)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from sae_ortho.base import params as params_mod
from sae_ortho.base.device import HOST
from sae_ortho.data.shards import ActivationShards


def shuffled_batches(
    shards: ActivationShards, batch_size: int, seed: int, buffer_shards: int = 2
) -> Iterator[torch.Tensor]:
    """Endless fp32 batches: shard order permuted per epoch, rows shuffled within a buffer of
    `buffer_shards` shards (plus the previous buffer's remainder). Deterministic given `seed`;
    at most `buffer_shards + 1` shards are in memory."""
    rng = np.random.default_rng(seed)
    leftover = torch.empty(0, shards.d_in, dtype=torch.float32, device=HOST)  # host-side: batches move later
    while True:  # epochs
        order = rng.permutation(len(shards))
        for start in range(0, len(order), buffer_shards):
            parts = [leftover] + [shards.load(int(i)).float() for i in order[start : start + buffer_shards]]
            buffer = torch.cat(parts)
            buffer = buffer[torch.from_numpy(rng.permutation(len(buffer)))]
            n_full = len(buffer) // batch_size
            for b in range(n_full):
                yield buffer[b * batch_size : (b + 1) * batch_size]
            leftover = buffer[n_full * batch_size :]


class BatchSource(Protocol):
    """Where training batches come from. The LM path wraps the extraction shards (ShardSource);
    the synthetic stage streams batches from SAELens's SyntheticModel with no shards at all."""

    d_in: int
    norm_mean: float  # mean L2 norm of the raw inputs: sets input_scale (normalize_inputs)
    fingerprint: str  # identifies the data, so a checkpoint never resumes on other data

    def stream(self, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
        """Endless float32 [batch_size, d_in] batches, deterministic given seed."""
        ...

    def sample(self, n: int, seed: int) -> torch.Tensor:
        """n rows for the b_dec (geometric median) initialisation."""
        ...


@dataclass
class ShardSource:
    """The extraction shards as a BatchSource: exactly the batches the trainer always drew. `shards` is
    anything with ActivationShards's `len`, `load(i)` and `manifest` (data/stream.py's StreamedShards too)."""

    shards: ActivationShards
    buffer_shards: int

    @property
    def d_in(self) -> int:
        return self.shards.d_in

    @property
    def norm_mean(self) -> float:
        return self.shards.manifest["norm"]["mean"]

    @property
    def fingerprint(self) -> str:
        return self.shards.manifest.get("fingerprint", "")

    def stream(self, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
        return shuffled_batches(self.shards, batch_size, seed, self.buffer_shards)

    def sample(self, n: int, seed: int) -> torch.Tensor:
        return next(shuffled_batches(self.shards, n, seed, 1))


def as_source(data: ActivationShards | BatchSource, t: params_mod.TrainParams) -> BatchSource:
    return ShardSource(data, t.buffer_shards) if isinstance(data, ActivationShards) else data
