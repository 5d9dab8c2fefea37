"""Shuffled, memory-bounded batches of activations streamed from the extraction shards."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from sae_ortho.data.shards import ActivationShards


def shuffled_batches(
    shards: ActivationShards, batch_size: int, seed: int, buffer_shards: int = 2
) -> Iterator[torch.Tensor]:
    """Endless fp32 batches: shard order permuted per epoch, rows shuffled within a buffer of
    `buffer_shards` shards (plus the previous buffer's remainder). Deterministic given `seed`;
    at most `buffer_shards + 1` shards are in memory."""
    rng = np.random.default_rng(seed)
    leftover = torch.empty(0, shards.d_in, dtype=torch.float32)
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
