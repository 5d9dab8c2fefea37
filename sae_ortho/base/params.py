"""Typed, validated parameters: one dataclass per params.yaml section.

Every stage calls `load(section)` (or `load_all()`); an unknown key, a wrong type or an
out-of-range value raises ParamError with one line naming the key, before any heavy work.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PARAMS_FILE = Path("params.yaml")


class ParamError(ValueError):
    """A parameter is unknown, of the wrong type, or out of range. The message names the key."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ParamError(f"{key}: {msg}")


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

    def validate(self, prefix: str = "data") -> None:
        _check(self.max_chars_per_source > 0, f"{prefix}.max_chars_per_source", "must be > 0")
        _check(self.probe_train_per_class >= 2, f"{prefix}.probe_train_per_class", "must be >= 2")
        _check(self.probe_test_per_class >= 1, f"{prefix}.probe_test_per_class", "must be >= 1")
        _check(self.probe_chars >= 20, f"{prefix}.probe_chars", "must be >= 20")
        _check(self.probe_min_train_per_class >= 1, f"{prefix}.probe_min_train_per_class", "must be >= 1")
        _check(self.probe_min_test_per_class >= 1, f"{prefix}.probe_min_test_per_class", "must be >= 1")


@dataclass(frozen=True)
class ExtractParams:
    """Activation extraction (stage `extract`)."""

    context_len: int = 128
    n_tokens: int = 500_000
    batch_size: int = 16
    shard_tokens: int = 65_536
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"

    def validate(self, prefix: str = "extract") -> None:
        _check(self.context_len >= 2, f"{prefix}.context_len", "must be >= 2 (BOS + at least one token)")
        _check(
            self.n_tokens >= self.context_len,
            f"{prefix}.n_tokens",
            f"must be >= context_len ({self.context_len}), got {self.n_tokens}",
        )
        _check(self.batch_size >= 1, f"{prefix}.batch_size", "must be >= 1")
        _check(
            self.shard_tokens >= self.context_len - 1,
            f"{prefix}.shard_tokens",
            f"must hold at least one context ({self.context_len - 1} tokens)",
        )


@dataclass(frozen=True)
class TrainParams:
    """SAE training shared by the baseline and the orthogonality run (stages `train_baseline`, `train`)."""

    architecture: Literal["relu", "topk"] = "topk"
    d_sae: int = 4608
    k: int = 12  # active latents per token (topk)
    l1_coeff: float = 1.0  # relu: weight of sum_i f_i ||w_i||, relative to the per-element MSE
    lr: float = 2e-3
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # lr decays linearly to 0 over this last fraction of steps
    batch_size: int = 1024
    train_tokens: int = 1_000_000
    buffer_shards: int = 2  # shards mixed in the shuffle buffer
    normalize_inputs: bool = True  # scale inputs to mean norm sqrt(d_in); stored in the checkpoint
    aux_k: int = 256  # topk: AuxK latents used to revive dead ones
    aux_coeff: float = 0.03125
    dead_tokens: int = 200_000  # a latent silent for this many tokens counts as dead
    log_every: int = 10
    checkpoint_every: int = 100
    snapshots: int = 0  # encoder/decoder snapshots saved evenly over the run (stability stage); 0 = none

    def validate(self, prefix: str = "train") -> None:
        _check(self.d_sae >= 2, f"{prefix}.d_sae", "must be >= 2")
        _check(1 <= self.k <= self.d_sae, f"{prefix}.k", f"must be in 1..d_sae ({self.d_sae}), got {self.k}")
        _check(self.l1_coeff >= 0, f"{prefix}.l1_coeff", "must be >= 0")
        _check(self.lr > 0, f"{prefix}.lr", "must be > 0")
        _check(self.warmup_steps >= 0, f"{prefix}.warmup_steps", "must be >= 0")
        _check(0 <= self.decay_fraction <= 1, f"{prefix}.decay_fraction", "must be in [0, 1]")
        _check(self.batch_size >= 2, f"{prefix}.batch_size", "must be >= 2")
        _check(self.train_tokens >= self.batch_size, f"{prefix}.train_tokens", "must be >= batch_size")
        _check(self.buffer_shards >= 1, f"{prefix}.buffer_shards", "must be >= 1")
        _check(self.aux_k >= 1 and self.aux_coeff >= 0, f"{prefix}.aux_k", "aux_k must be >= 1, aux_coeff >= 0")
        _check(self.dead_tokens >= 1, f"{prefix}.dead_tokens", "must be >= 1")
        _check(self.log_every >= 1, f"{prefix}.log_every", "must be >= 1")
        _check(self.checkpoint_every >= 1, f"{prefix}.checkpoint_every", "must be >= 1")
        _check(0 <= self.snapshots <= self.steps, f"{prefix}.snapshots", f"must be in 0..steps ({self.steps})")

    @property
    def steps(self) -> int:
        return self.train_tokens // self.batch_size


@dataclass(frozen=True)
class OrthoParams:
    """Settings of the orthogonality term other than the three top-level keys users sweep."""

    target: float = 0.1  # adaptive tau: wanted mean |cos| of the kept pairs
    tau_lr: float = 0.05  # adaptive tau: dual-ascent step
    log_pairs_every: int = 10  # steps between saved pair selections (for the stability stage)

    def validate(self, prefix: str = "ortho") -> None:
        _check(0 <= self.target <= 1, f"{prefix}.target", "must be in [0, 1]")
        _check(self.tau_lr >= 0, f"{prefix}.tau_lr", "must be >= 0")
        _check(self.log_pairs_every >= 1, f"{prefix}.log_pairs_every", "must be >= 1")


# SAEBench's sparse-probing datasets (need the Hugging Face hub); the other task names are the
# corpus stage's offline tasks (data/probing/<task>.parquet).
SAEBENCH_HUB_TASKS = (
    "LabHC/bias_in_bios_class_set1",
    "LabHC/bias_in_bios_class_set2",
    "LabHC/bias_in_bios_class_set3",
    "canrager/amazon_reviews_mcauley_1and5",
    "canrager/amazon_reviews_mcauley_1and5_sentiment",
    "codeparrot/github-code",
    "fancyzhx/ag_news",
    "Helsinki-NLP/europarl",
)
OFFLINE_TASKS = ("language_id", "review_sentiment", "code_language", "party", "review_domain", "genre")


@dataclass(frozen=True)
class HeldoutParams:
    """Held-out tokens for the core metrics (stage `llm_cache`): whole contexts from the documents
    after the end of the training stream, never seen in training."""

    n_tokens: int = 8192  # non-BOS tokens (contexts of extract.context_len)
    batch_size: int = 8

    def validate(self, prefix: str = "heldout") -> None:
        _check(self.n_tokens >= 1, f"{prefix}.n_tokens", "must be >= 1")
        _check(self.batch_size >= 1, f"{prefix}.batch_size", "must be >= 1")


@dataclass(frozen=True)
class CoreParams:
    """Core metrics per SAE (stage `core@<sae>`)."""

    tail_factor: float = 5.0  # tokens with residual norm above tail_factor x median form the high-norm tail
    dense_threshold: float = 0.1  # a latent firing on more than this share of held-out tokens is dense
    pair_batch_size: int = 1024  # held-out tokens per batch for the pairs the selector keeps
    pair_fraction: float = 0.001  # selector budget for those pairs (not the training topk_fraction)

    def validate(self, prefix: str = "core") -> None:
        _check(self.tail_factor > 1, f"{prefix}.tail_factor", "must be > 1")
        _check(0 < self.dense_threshold <= 1, f"{prefix}.dense_threshold", "must be in (0, 1]")
        _check(self.pair_batch_size >= 2, f"{prefix}.pair_batch_size", "must be >= 2")
        _check(0 < self.pair_fraction <= 1, f"{prefix}.pair_fraction", "must be in (0, 1]")


@dataclass(frozen=True)
class ProbingParams:
    """SAEBench sparse probing (residuals in stage `llm_cache`, SAE probes in `probing@<sae>`)."""

    tasks: tuple[str, ...] = OFFLINE_TASKS
    train_per_class: int = 250
    test_per_class: int = 60
    context_len: int = 128  # tokens per example, BOS included (SAEBench: 128)
    k_values: tuple[int, ...] = (1, 2, 5, 10, 20, 50)
    batch_size: int = 16
    seed: int = 42

    def validate(self, prefix: str = "probing") -> None:
        known = set(OFFLINE_TASKS) | set(SAEBENCH_HUB_TASKS)
        _check(len(self.tasks) >= 1, f"{prefix}.tasks", "needs at least one task")
        for task in self.tasks:
            _check(
                task in known,
                f"{prefix}.tasks",
                f"unknown task {task!r}; offline: {', '.join(OFFLINE_TASKS)}; hub (SAEBench): "
                + ", ".join(SAEBENCH_HUB_TASKS),
            )
        _check(self.train_per_class >= 2, f"{prefix}.train_per_class", "must be >= 2")
        _check(self.test_per_class >= 2, f"{prefix}.test_per_class", "must be >= 2")
        _check(self.context_len >= 2, f"{prefix}.context_len", "must be >= 2")
        _check(all(k >= 1 for k in self.k_values), f"{prefix}.k_values", "every k must be >= 1")
        _check(self.batch_size >= 1, f"{prefix}.batch_size", "must be >= 1")


@dataclass(frozen=True)
class LettersParams:
    """First-letter absorption, LLM side (stage `letter_cache`): vocabulary sample, letter probe, prompts."""

    n_words: int = 2000  # vocabulary sample (SAEBench: all ~47k single-token alphabetic words)
    min_words_per_letter: int = 20  # rare letters (x, z, q) get at least this many (or all they have)
    seeds: tuple[int, ...] = (0, 1)  # each draws its own sample, split and prompts: >= 2 measure reseed noise
    prompt_template: str = "{word} has the first letter:"  # SAEBench's
    prompt_token_pos: int = -6  # the word's position in that template (checked on every prompt)
    max_icl_examples: int = 10  # in-context examples per prompt (SAEBench: 10)
    batch_size: int = 32  # prompts per forward pass
    probe_epochs: int = 50  # SAEBench's letter probe: 50 epochs, lr 1e-2, batch 64
    probe_lr: float = 0.01
    probe_batch_size: int = 64

    def validate(self, prefix: str = "letters") -> None:
        _check(self.n_words >= 52, f"{prefix}.n_words", "must be >= 52 (two words per letter)")
        _check(self.min_words_per_letter >= 5, f"{prefix}.min_words_per_letter", "must be >= 5 (train and test words)")
        _check(len(self.seeds) >= 1, f"{prefix}.seeds", "needs at least one seed")
        _check(len(set(self.seeds)) == len(self.seeds), f"{prefix}.seeds", f"must be distinct, got {self.seeds}")
        _check("{word}" in self.prompt_template, f"{prefix}.prompt_template", "must contain {word}")
        _check(self.prompt_token_pos < 0, f"{prefix}.prompt_token_pos", "must be negative (from the end)")
        _check(self.max_icl_examples >= 0, f"{prefix}.max_icl_examples", "must be >= 0")
        _check(self.batch_size >= 1, f"{prefix}.batch_size", "must be >= 1")
        _check(self.probe_epochs >= 1, f"{prefix}.probe_epochs", "must be >= 1")
        _check(self.probe_lr > 0, f"{prefix}.probe_lr", "must be > 0")
        _check(self.probe_batch_size >= 1, f"{prefix}.probe_batch_size", "must be >= 1")


@dataclass(frozen=True)
class AbsorptionParams:
    """First-letter absorption, SAE side (stage `absorption@<sae>`): SAEBench's settings unless noted."""

    max_k: int = 10  # k-sparse probes k = 1..max_k (feature splitting)
    f1_jump_threshold: float = 0.03  # a k whose F1 rises by this over k-1 counts as a split feature
    probe_f1_gate: float = 0.6  # letters whose LLM probe F1 is at most this are left out (SAEBench min_GT_probe_f1)
    latent_f1_gate: float = 0.6  # a letter is "carried" when its best single latent (k=1) has F1 above this
    min_carried_letters: int = 10  # fewer carried letters: the absorption figure is marked not meaningful
    k_sparse_l1: float = 0.01
    k_sparse_epochs: int = 50
    # SAEBench's 4096 suits its ~37k training words (~9 steps an epoch); on a 2k-word sample it would
    # leave the L1 probe that picks each letter's latents with one Adam step per epoch.
    k_sparse_batch_size: int = 128
    bootstrap: int = 1000  # resamples of letters for the confidence intervals

    def validate(self, prefix: str = "absorption") -> None:
        _check(self.max_k >= 1, f"{prefix}.max_k", "must be >= 1")
        _check(self.f1_jump_threshold >= 0, f"{prefix}.f1_jump_threshold", "must be >= 0")
        _check(0 <= self.probe_f1_gate < 1, f"{prefix}.probe_f1_gate", "must be in [0, 1)")
        _check(0 <= self.latent_f1_gate < 1, f"{prefix}.latent_f1_gate", "must be in [0, 1)")
        _check(1 <= self.min_carried_letters <= 26, f"{prefix}.min_carried_letters", "must be in 1..26")
        _check(self.k_sparse_l1 >= 0, f"{prefix}.k_sparse_l1", "must be >= 0")
        _check(self.k_sparse_epochs >= 1, f"{prefix}.k_sparse_epochs", "must be >= 1")
        _check(self.k_sparse_batch_size >= 1, f"{prefix}.k_sparse_batch_size", "must be >= 1")
        _check(self.bootstrap >= 100, f"{prefix}.bootstrap", "must be >= 100")


@dataclass(frozen=True)
class SyntheticHierarchy:
    """One hierarchy of SAELens's synthetic model: `total_root_nodes` trees, `branching_factor`
    children per node, `max_depth` levels below the roots. Features 0.. are the tree nodes
    (breadth-first, so parents get the highest Zipfian firing probabilities), the rest fire
    independently."""

    name: str
    total_root_nodes: int = 20
    branching_factor: int = 4
    max_depth: int = 1
    num_features: int = 200

    @property
    def n_nodes(self) -> int:
        return self.total_root_nodes * sum(self.branching_factor**d for d in range(self.max_depth + 1))


def _synthetic_train() -> TrainParams:
    # Same keys and meaning as the LM's `train` section (train_tokens counts synthetic samples).
    return TrainParams(
        d_sae=200, k=8, lr=0.01, warmup_steps=20, batch_size=1024, train_tokens=1_000_000, buffer_shards=1,
        aux_k=32, dead_tokens=50_000, log_every=10, checkpoint_every=200,
    )  # fmt: skip


@dataclass(frozen=True)
class SyntheticParams:
    """Ground-truth absorption on SAELens's synthetic model (stages `synthetic_<arm>`)."""

    hidden_dim: int = 128
    firing_exponent: float = 0.5  # Zipfian firing probabilities (background.md section 6)
    firing_max_prob: float = 0.25
    firing_min_prob: float = 0.02
    orthogonalization_steps: int = 100  # SAELens's orthogonalisation of the true directions
    model_seed: int = 100
    hierarchies: tuple[SyntheticHierarchy, ...] = (
        SyntheticHierarchy("h20x4"),
        SyntheticHierarchy("h10x3x3", total_root_nodes=10, branching_factor=3, max_depth=2),
    )
    seeds: tuple[int, ...] = (0, 1, 2)  # training seeds (SAE init and sample stream)
    train: TrainParams = field(default_factory=_synthetic_train)
    eval_samples: int = 100_000
    eval_seed: int = 1000
    bootstrap: int = 1000  # resamples of parent/child pairs for the confidence intervals

    def validate(self, prefix: str = "synthetic") -> None:
        _check(self.hidden_dim >= 2, f"{prefix}.hidden_dim", "must be >= 2")
        _check(self.firing_exponent > 0, f"{prefix}.firing_exponent", "must be > 0")
        _check(
            0 < self.firing_min_prob < self.firing_max_prob <= 1,
            f"{prefix}.firing_min_prob",
            f"need 0 < firing_min_prob < firing_max_prob <= 1, got {self.firing_min_prob}, {self.firing_max_prob}",
        )
        _check(self.orthogonalization_steps >= 0, f"{prefix}.orthogonalization_steps", "must be >= 0")
        _check(len(self.hierarchies) >= 1, f"{prefix}.hierarchies", "needs at least one hierarchy")
        names = [h.name for h in self.hierarchies]
        _check(len(set(names)) == len(names), f"{prefix}.hierarchies", f"names must be distinct, got {names}")
        for n, h in enumerate(self.hierarchies):
            where = f"{prefix}.hierarchies[{n}]"
            _check(h.name.isidentifier(), f"{where}.name", f"must be an identifier, got {h.name!r}")
            _check(h.total_root_nodes >= 1, f"{where}.total_root_nodes", "must be >= 1")
            _check(h.branching_factor >= 2, f"{where}.branching_factor", "must be >= 2")
            _check(h.max_depth >= 1, f"{where}.max_depth", "must be >= 1")
            _check(
                h.n_nodes <= h.num_features,
                f"{where}.num_features",
                f"the hierarchy has {h.n_nodes} nodes, more than num_features ({h.num_features})",
            )
            # Hungarian matching gives every true feature its own latent only if there are enough.
            _check(
                h.num_features <= self.train.d_sae,
                f"{where}.num_features",
                f"must be <= {prefix}.train.d_sae ({self.train.d_sae}), got {h.num_features}",
            )
        _check(len(self.seeds) >= 1, f"{prefix}.seeds", "needs at least one seed")
        _check(len(set(self.seeds)) == len(self.seeds), f"{prefix}.seeds", f"must be distinct, got {self.seeds}")
        # SAE(seed=s) draws its initial decoder as randn(d_sae, d_in) from seed s, exactly as SAELens
        # draws the true directions from model_seed: equal seeds would start the SAE at the answer.
        _check(
            self.model_seed not in self.seeds,
            f"{prefix}.model_seed",
            f"must differ from every training seed ({list(self.seeds)}): the SAE would start at the true features",
        )
        self.train.validate(f"{prefix}.train")
        _check(self.eval_samples >= 1000, f"{prefix}.eval_samples", "must be >= 1000")
        _check(self.bootstrap >= 100, f"{prefix}.bootstrap", "must be >= 100")


@dataclass(frozen=True)
class StabilityParams:
    """Stage `stability`: kept-pair stability within a run and feature/pair stability across SAE seeds."""

    extra_seeds: tuple[int, ...] = ()
    lag_fractions: tuple[float, ...] = (0.1, 0.5)
    heldout_batches: int = 8
    null_draws: int = 20
    cos_thresholds: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
    top_pairs: int = 20

    def validate(self, sae_seed: int, prefix: str = "stability") -> None:
        seeds = self.extra_seeds
        _check(len(set(seeds)) == len(seeds), f"{prefix}.extra_seeds", f"must be distinct, got {list(seeds)}")
        _check(sae_seed not in seeds, f"{prefix}.extra_seeds", f"must not contain sae_seed ({sae_seed})")
        _check(all(0 < f < 1 for f in self.lag_fractions), f"{prefix}.lag_fractions", "must be in (0, 1)")
        _check(self.heldout_batches >= 1, f"{prefix}.heldout_batches", "must be >= 1")
        _check(self.null_draws >= 1, f"{prefix}.null_draws", "must be >= 1")
        _check(all(0 < c < 1 for c in self.cos_thresholds), f"{prefix}.cos_thresholds", "must be in (0, 1)")
        _check(self.top_pairs >= 1, f"{prefix}.top_pairs", "must be >= 1")


@dataclass(frozen=True)
class Params:
    model: str = "smollm2-135m"
    layer: int = 6
    hook: str = "resid_post"
    seed: int = 0
    corpus: str = "embedded"
    data: DataParams = field(default_factory=DataParams)
    extract: ExtractParams = field(default_factory=ExtractParams)
    tau: float = 0.1
    topk_fraction: float = 0.001
    tau_schedule: Literal["fixed", "adaptive"] = "fixed"
    sae_seed: int = 0  # SAE init and batch order of the default SAEs (`seed` also feeds the corpus)
    train: TrainParams = field(default_factory=TrainParams)
    ortho: OrthoParams = field(default_factory=OrthoParams)
    # SAEs the per-SAE evaluation stages run on (dvc.yaml foreach): name -> trained SAE directory.
    saes: dict[str, str] = field(default_factory=lambda: {"baseline": "models/baseline", "ortho": "models/ortho"})
    heldout: HeldoutParams = field(default_factory=HeldoutParams)
    core: CoreParams = field(default_factory=CoreParams)
    probing: ProbingParams = field(default_factory=ProbingParams)
    synthetic: SyntheticParams = field(default_factory=SyntheticParams)
    letters: LettersParams = field(default_factory=LettersParams)
    absorption: AbsorptionParams = field(default_factory=AbsorptionParams)
    stability: StabilityParams = field(default_factory=StabilityParams)

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.hook_{self.hook}"

    def validate(self) -> None:
        from sae_ortho.base.model_names import is_known_model, model_n_layers

        if not is_known_model(self.model):
            raise ParamError(
                f"model: unknown model {self.model!r}; use 'smollm2-135m' (embedded, offline) "
                "or a transformer_lens model name such as gpt2"
            )
        _check(self.layer >= 0, "layer", "must be >= 0")
        n_layers = model_n_layers(self.model)
        if n_layers is not None:
            _check(
                self.layer < n_layers,
                "layer",
                f"{self.layer} is beyond {self.model}'s {n_layers} layers (0..{n_layers - 1})",
            )
        _check(
            self.hook in {"resid_pre", "resid_mid", "resid_post"},
            "hook",
            f"must be resid_pre, resid_mid or resid_post, got {self.hook!r}",
        )
        _check(
            self.corpus == "embedded" or (self.corpus.startswith("hf:") and len(self.corpus) > 3),
            "corpus",
            f"must be 'embedded' or 'hf:<dataset>[:<split>]', got {self.corpus!r}",
        )
        _check(self.tau >= 0, "tau", f"must be >= 0, got {self.tau}")
        _check(0 < self.topk_fraction <= 1, "topk_fraction", f"must be in (0, 1], got {self.topk_fraction}")
        self.data.validate()
        self.extract.validate()
        self.train.validate()
        self.ortho.validate()
        _check(isinstance(self.saes, dict) and len(self.saes) >= 1, "saes", "must map SAE names to directories")
        for name, directory in self.saes.items():
            _check(
                isinstance(name, str) and name.isidentifier() and isinstance(directory, str),
                f"saes.{name}",
                f"names must be identifiers and values directory paths, got {name!r}: {directory!r}",
            )
        self.heldout.validate()
        self.core.validate()
        self.probing.validate()
        self.synthetic.validate()
        self.letters.validate()
        self.absorption.validate()
        self.stability.validate(self.sae_seed)
        _check(len(self.probing.k_values) >= 1, "probing.k_values", "needs at least one k")
        # The corpus stage keeps classes with at least data.probe_min_*; probing then takes exactly
        # probing.*_per_class of each, so the first must cover the second.
        for split in ("train", "test"):
            _check(
                getattr(self.data, f"probe_min_{split}_per_class") >= getattr(self.probing, f"{split}_per_class"),
                f"data.probe_min_{split}_per_class",
                f"must be >= probing.{split}_per_class ({getattr(self.probing, f'{split}_per_class')}): "
                "smaller classes would pass the corpus stage and fail probing",
            )


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Construct dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise ParamError(f"{prefix or 'params'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise ParamError(f"{where}: unknown parameter (known: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in raw.items():
        where = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _coerce(hints[key], value, where)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        _check(value in allowed, where, f"must be one of {', '.join(map(str, allowed))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(hint):
            if arm is type(None) and value is None:
                return None
            try:
                return _coerce(arm, value, where)
            except ParamError:
                continue
        raise ParamError(f"{where}: {value!r} does not match {hint}")
    if origin is tuple:
        _check(isinstance(value, (list, tuple)), where, f"must be a list, got {value!r}")
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        return tuple(_coerce(item, v, f"{where}[{n}]") for n, v in enumerate(value))
    if origin is dict:
        _check(isinstance(value, dict), where, f"must be a mapping, got {value!r}")
        key_hint, value_hint = typing.get_args(hint)
        return {_coerce(key_hint, k, where): _coerce(value_hint, v, f"{where}.{k}") for k, v in value.items()}
    if hint is float:
        _check(
            isinstance(value, (int, float)) and not isinstance(value, bool), where, f"must be a number, got {value!r}"
        )
        return float(value)
    if hint is int:
        _check(isinstance(value, int) and not isinstance(value, bool), where, f"must be an integer, got {value!r}")
        return value
    if hint is bool:
        _check(isinstance(value, bool), where, f"must be true or false, got {value!r}")
        return value
    if hint is str:
        _check(isinstance(value, str), where, f"must be a string, got {value!r}")
        return value
    return value


def load(path: Path | str = PARAMS_FILE) -> Params:
    """Load and validate params.yaml. Raises ParamError naming the first bad key."""
    with open(path) as fh:
        raw = yaml.safe_load(fh) or {}
    params = _build(Params, raw, "")
    params.validate()
    return params


def load_or_exit(path: Path | str = PARAMS_FILE) -> Params:
    """For stage entry points: one clear line on stderr and exit code 2 on bad parameters."""
    try:
        return load(path)
    except ParamError as err:
        print(f"error: params.yaml: {err}", file=sys.stderr)
        raise SystemExit(2) from None
