"""Activation shards on disk: safetensors files + a Parquet token index + a JSON manifest.

Layout of an activation directory:
    manifest.json                 shapes, dtype, counts, sha256 per shard, norm statistics
    shard_00000.safetensors       {"activations": [n_tokens, d_in]}
    index/shard_00000.parquet     one row per activation: context_id, position, doc_id, token_id

BOS positions are never stored (their residual norm is orders of magnitude above the rest).
An index-only directory (extracted for `train.source: stream`) has the manifest and the index but no
shard files: the manifest keeps each shard's sha256 and norm statistics, and the float64 sum of every
activation (`activation_sum`), which is all the evaluation stages read from the training activations.
Files are written under a temporary name and renamed into place, so a reader (or DVC) never
sees a half-written shard.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save, save_file

from sae_ortho.base.io import atomic_file, sha256_file, verified

MANIFEST = "manifest.json"
TENSOR_KEY = "activations"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class ShardInfo:
    file: str
    index_file: str
    n_tokens: int
    first_context: int
    n_contexts: int
    sha256: str
    bytes: int
    # Sufficient statistics of the per-token L2 norm, so the manifest can aggregate exactly.
    norm_sum: float
    norm_sq_sum: float
    norm_min: float
    norm_max: float
    index_sha256: str = ""  # verified on read like the shard's (empty in manifests older than issue 21)


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


def token_norms(activations: torch.Tensor) -> np.ndarray:
    """Per-token L2 norms in numpy float64, single-threaded: torch's fp32 sum depends on how many threads
    the caller got (extraction's writer runs beside the next forward pass), which made the manifest's norm
    statistics, and so the training input scale, vary between runs in the last digits."""
    acts64 = activations.float().numpy().astype(np.float64)
    return np.sqrt(np.einsum("ij,ij->i", acts64, acts64))


def write_shard(
    directory: Path,
    shard_idx: int,
    activations: torch.Tensor,
    index: dict[str, np.ndarray],
    first_context: int,
    n_contexts: int,
    store: bool = True,
) -> ShardInfo:
    """Write one shard (unless `store` is False: index only) and its index atomically; return what the
    manifest needs. An unstored shard's sha256 is that of the file it would have been."""
    name = shard_name(shard_idx)
    path = directory / name
    if store:
        with atomic_file(path) as tmp:
            save_file({TENSOR_KEY: activations.contiguous()}, str(tmp))
        digest, size = sha256_file(path), path.stat().st_size
    else:
        blob = save({TENSOR_KEY: activations.contiguous()})
        digest, size = hashlib.sha256(blob).hexdigest(), 0

    index_dir = directory / "index"
    index_dir.mkdir(exist_ok=True)
    index_path = index_dir / name.replace(".safetensors", ".parquet")
    with atomic_file(index_path) as tmp_index:
        pq.write_table(pa.table(index), tmp_index)

    norms = token_norms(activations)
    return ShardInfo(
        file=name,
        index_file=f"index/{index_path.name}",
        n_tokens=int(activations.shape[0]),
        first_context=first_context,
        n_contexts=n_contexts,
        sha256=digest,
        bytes=size + index_path.stat().st_size,
        norm_sum=float(norms.sum()),
        norm_sq_sum=float((norms**2).sum()),
        norm_min=float(norms.min()),
        norm_max=float(norms.max()),
        index_sha256=sha256_file(index_path),
    )


def norm_summary(shards: list[ShardInfo]) -> dict[str, float]:
    n = sum(s.n_tokens for s in shards)
    mean = sum(s.norm_sum for s in shards) / n
    var = max(sum(s.norm_sq_sum for s in shards) / n - mean**2, 0.0)
    return {
        "mean": mean,
        "std": var**0.5,
        "min": min(s.norm_min for s in shards),
        "max": max(s.norm_max for s in shards),
    }


def write_manifest(directory: Path, meta: dict, shards: list[ShardInfo]) -> dict:
    manifest = {
        **meta,
        "n_tokens": sum(s.n_tokens for s in shards),
        "n_contexts": sum(s.n_contexts for s in shards),
        "n_shards": len(shards),
        "bytes": sum(s.bytes for s in shards),
        "norm": norm_summary(shards),
        "shards": [asdict(s) for s in shards],
    }
    with atomic_file(directory / MANIFEST, digest=True) as tmp:  # its norms scale the training inputs
        tmp.write_text(json.dumps(manifest, indent=1))
    return manifest


class ActivationShards:
    """Read access to an activation directory written by the extract stage."""

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST
        if not manifest_path.exists():
            raise FileNotFoundError(f"{manifest_path} not found: run the extract stage first (dvc repro extract)")
        self.manifest = json.loads(verified(manifest_path).read_text())
        self.shards = [ShardInfo(**s) for s in self.manifest["shards"]]

    @property
    def d_in(self) -> int:
        return int(self.manifest["d_in"])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def stored(self) -> bool:
        """False for an index-only directory (extracted for train.source: stream)."""
        return bool(self.manifest.get("stored", True))

    def activation_sum(self) -> torch.Tensor:
        """Float64 sum of every activation, shard by shard in order (from the manifest when index-only)."""
        if not self.stored:
            return torch.tensor(self.manifest["activation_sum"], dtype=torch.float64)
        total = torch.zeros(self.d_in, dtype=torch.float64)
        for shard in self:
            total += shard.double().sum(0)
        return total

    def __len__(self) -> int:
        return len(self.shards)

    def load(self, i: int) -> torch.Tensor:
        """Shard i, its sha256 checked against the manifest on its first read in this process."""
        if not self.stored:
            raise ValueError(
                f"{self.directory} holds only the shard index (extracted with train.source: stream): train with "
                "train.source: stream, or set train.source: shards and rerun the extract stage"
            )
        info = self.shards[i]
        path = self.directory / info.file
        return load_file(str(verified(path, info.sha256)))[TENSOR_KEY]

    def index(self, i: int):
        info = self.shards[i]
        return pq.read_table(verified(self.directory / info.index_file, info.index_sha256))

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self.load(i)
