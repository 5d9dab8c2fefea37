"""params.yaml sections of the evaluation and analysis stages: `heldout`, `core`, `probing`, `letters`,
`absorption`, `synthetic`, `stability`.

Defaults equal params.yaml (tests/test_params.py compares them); ranges are checked in `validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sae_ortho.base.params_train import TrainParams
from sae_ortho.base.schema import check

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

    n_tokens: int = 16384  # non-BOS tokens (contexts of extract.context_len); the study's headline uses 16,256
    batch_size: int = 8

    def validate(self, prefix: str = "heldout") -> None:
        check(self.n_tokens >= 1, f"{prefix}.n_tokens", "must be >= 1")
        check(self.batch_size >= 1, f"{prefix}.batch_size", "must be >= 1")


@dataclass(frozen=True)
class CoreParams:
    """Core metrics per SAE (stage `core@<sae>`)."""

    tail_factor: float = 5.0  # tokens with residual norm above tail_factor x median form the high-norm tail
    dense_threshold: float = 0.1  # a latent firing on more than this share of held-out tokens is dense
    pair_batch_size: int = 1024  # held-out tokens per batch for the pairs the selector keeps
    pair_fraction: float = 0.001  # selector budget for those pairs (not the training topk_fraction)

    def validate(self, prefix: str = "core") -> None:
        check(self.tail_factor > 1, f"{prefix}.tail_factor", "must be > 1")
        check(0 < self.dense_threshold <= 1, f"{prefix}.dense_threshold", "must be in (0, 1]")
        check(self.pair_batch_size >= 2, f"{prefix}.pair_batch_size", "must be >= 2")
        check(0 < self.pair_fraction <= 1, f"{prefix}.pair_fraction", "must be in (0, 1]")


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
        check(len(self.tasks) >= 1, f"{prefix}.tasks", "needs at least one task")
        for task in self.tasks:
            check(
                task in known,
                f"{prefix}.tasks",
                f"unknown task {task!r}; offline: {', '.join(OFFLINE_TASKS)}; hub (SAEBench): "
                + ", ".join(SAEBENCH_HUB_TASKS),
            )
        check(self.train_per_class >= 2, f"{prefix}.train_per_class", "must be >= 2")
        check(self.test_per_class >= 2, f"{prefix}.test_per_class", "must be >= 2")
        check(self.context_len >= 2, f"{prefix}.context_len", "must be >= 2")
        check(all(k >= 1 for k in self.k_values), f"{prefix}.k_values", "every k must be >= 1")
        check(self.batch_size >= 1, f"{prefix}.batch_size", "must be >= 1")


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
        check(self.n_words >= 52, f"{prefix}.n_words", "must be >= 52 (two words per letter)")
        check(self.min_words_per_letter >= 5, f"{prefix}.min_words_per_letter", "must be >= 5 (train and test words)")
        check(len(self.seeds) >= 1, f"{prefix}.seeds", "needs at least one seed")
        check(len(set(self.seeds)) == len(self.seeds), f"{prefix}.seeds", f"must be distinct, got {self.seeds}")
        check("{word}" in self.prompt_template, f"{prefix}.prompt_template", "must contain {word}")
        check(
            -len(self.prompt_template) <= self.prompt_token_pos < 0,
            f"{prefix}.prompt_token_pos",
            f"must be negative (from the end) and within the template ({len(self.prompt_template)} characters)",
        )
        check(self.max_icl_examples >= 0, f"{prefix}.max_icl_examples", "must be >= 0")
        check(self.batch_size >= 1, f"{prefix}.batch_size", "must be >= 1")
        check(self.probe_epochs >= 1, f"{prefix}.probe_epochs", "must be >= 1")
        check(self.probe_lr > 0, f"{prefix}.probe_lr", "must be > 0")
        check(self.probe_batch_size >= 1, f"{prefix}.probe_batch_size", "must be >= 1")


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
        check(self.max_k >= 1, f"{prefix}.max_k", "must be >= 1")
        check(self.f1_jump_threshold >= 0, f"{prefix}.f1_jump_threshold", "must be >= 0")
        check(0 <= self.probe_f1_gate < 1, f"{prefix}.probe_f1_gate", "must be in [0, 1)")
        check(0 <= self.latent_f1_gate < 1, f"{prefix}.latent_f1_gate", "must be in [0, 1)")
        check(1 <= self.min_carried_letters <= 26, f"{prefix}.min_carried_letters", "must be in 1..26")
        check(self.k_sparse_l1 >= 0, f"{prefix}.k_sparse_l1", "must be >= 0")
        check(self.k_sparse_epochs >= 1, f"{prefix}.k_sparse_epochs", "must be >= 1")
        check(self.k_sparse_batch_size >= 1, f"{prefix}.k_sparse_batch_size", "must be >= 1")
        check(self.bootstrap >= 100, f"{prefix}.bootstrap", "must be >= 100")


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
        aux_k=32, dead_tokens=50_000, log_every=10, checkpoint_every=200, snapshots=0,
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
    # A parent counts as learned when its latent fires on at least this share of its lone firings.
    learned_recall: float = 0.5
    # Many-to-one reading: latents with at least this decoder cosine with a feature (and closest to it) stand for it.
    many_to_one_cos: float = 0.5

    def validate(self, prefix: str = "synthetic") -> None:
        check(self.hidden_dim >= 2, f"{prefix}.hidden_dim", "must be >= 2")
        check(self.firing_exponent > 0, f"{prefix}.firing_exponent", "must be > 0")
        check(0 < self.firing_max_prob <= 1, f"{prefix}.firing_max_prob", "must be in (0, 1]")
        check(
            0 < self.firing_min_prob < self.firing_max_prob <= 1,
            f"{prefix}.firing_min_prob",
            f"need 0 < firing_min_prob < firing_max_prob <= 1, got {self.firing_min_prob}, {self.firing_max_prob}",
        )
        check(self.orthogonalization_steps >= 0, f"{prefix}.orthogonalization_steps", "must be >= 0")
        check(len(self.hierarchies) >= 1, f"{prefix}.hierarchies", "needs at least one hierarchy")
        names = [h.name for h in self.hierarchies]
        check(len(set(names)) == len(names), f"{prefix}.hierarchies", f"names must be distinct, got {names}")
        for n, h in enumerate(self.hierarchies):
            where = f"{prefix}.hierarchies[{n}]"
            check(h.name.isidentifier(), f"{where}.name", f"must be an identifier, got {h.name!r}")
            check(h.total_root_nodes >= 1, f"{where}.total_root_nodes", "must be >= 1")
            check(h.branching_factor >= 2, f"{where}.branching_factor", "must be >= 2")
            check(h.max_depth >= 1, f"{where}.max_depth", "must be >= 1")
            check(
                h.n_nodes <= h.num_features,
                f"{where}.num_features",
                f"the hierarchy has {h.n_nodes} nodes, more than num_features ({h.num_features})",
            )
            # Hungarian matching gives every true feature its own latent only if there are enough.
            check(
                h.num_features <= self.train.d_sae,
                f"{where}.num_features",
                f"must be <= {prefix}.train.d_sae ({self.train.d_sae}), got {h.num_features}",
            )
        check(len(self.seeds) >= 1, f"{prefix}.seeds", "needs at least one seed")
        check(len(set(self.seeds)) == len(self.seeds), f"{prefix}.seeds", f"must be distinct, got {self.seeds}")
        # SAE(seed=s) draws its initial decoder as randn(d_sae, d_in) from seed s, exactly as SAELens
        # draws the true directions from model_seed: equal seeds would start the SAE at the answer.
        check(
            self.model_seed not in self.seeds,
            f"{prefix}.model_seed",
            f"must differ from every training seed ({list(self.seeds)}): the SAE would start at the true features",
        )
        self.train.validate(f"{prefix}.train")
        check(self.eval_samples >= 1000, f"{prefix}.eval_samples", "must be >= 1000")
        check(self.bootstrap >= 100, f"{prefix}.bootstrap", "must be >= 100")
        check(0 < self.learned_recall <= 1, f"{prefix}.learned_recall", "must be in (0, 1]")
        check(0 < self.many_to_one_cos < 1, f"{prefix}.many_to_one_cos", "must be in (0, 1)")


@dataclass(frozen=True)
class StabilityParams:
    """Stage `stability`: kept-pair stability within a run and feature/pair stability across SAE seeds."""

    extra_seeds: tuple[int, ...] = ()
    lag_fractions: tuple[float, ...] = (0.1, 0.5)
    heldout_batches: int = 8
    null_draws: int = 5  # draws of each pair-set null (their sd is ~1e-4 at the default)
    cos_thresholds: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
    top_pairs: int = 20

    def validate(self, sae_seed: int, prefix: str = "stability") -> None:
        seeds = self.extra_seeds
        check(len(set(seeds)) == len(seeds), f"{prefix}.extra_seeds", f"must be distinct, got {list(seeds)}")
        check(sae_seed not in seeds, f"{prefix}.extra_seeds", f"must not contain sae_seed ({sae_seed})")
        check(all(0 < f < 1 for f in self.lag_fractions), f"{prefix}.lag_fractions", "must be in (0, 1)")
        check(self.heldout_batches >= 1, f"{prefix}.heldout_batches", "must be >= 1")
        check(self.null_draws >= 1, f"{prefix}.null_draws", "must be >= 1")
        check(all(0 < c < 1 for c in self.cos_thresholds), f"{prefix}.cos_thresholds", "must be in (0, 1)")
        check(len(self.cos_thresholds) > 0, f"{prefix}.cos_thresholds", "needs at least one threshold")
        check(self.top_pairs >= 1, f"{prefix}.top_pairs", "must be >= 1")
