"""study/params.yaml: the study's arms, the selection rule and its settings (schema and loader).

An arm is one entry of a dict keyed by its name; its stages declare only that entry, so editing one
arm reruns exactly that arm (study/dvc.yaml). How an arm becomes a training run is study/arms.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sae_ortho.base.schema import build, check, load_or_exit, read_yaml

STUDY_PARAMS = Path("study/params.yaml")


@dataclass(frozen=True)
class Arm:
    """One arm. `penalty: none` (or tau 0 with a fixed schedule) is the plain SAE."""

    penalty: Literal["none", "topk", "random", "ortsae"] = "topk"
    tau: float | None = None  # required unless penalty none or from_selection (the selected arm's)
    schedule: Literal["fixed", "adaptive", "decay"] | None = None
    target: float | None = None  # adaptive: wanted mean |cos| of the kept pairs
    decay: float | None = None  # decay: tau_t = tau * decay**t
    topk_fraction: float | None = None  # None: the study's `topk_fraction`
    chunk: int = 1024  # ortsae: latents per random chunk
    matryoshka: tuple[float, ...] = ()  # nested prefix sizes as fractions of d_sae (the last 1.0)
    # paper: BatchTopK, summed prefix losses, inference threshold (Bussmann et al. 2025); topk: per-sample
    # TopK, mean of the prefix losses (the study's earlier variant, kept as a secondary arm)
    matryoshka_variant: Literal["paper", "topk"] = "paper"
    # Start from the sweep arm the `select` stage chose for this remedy ("" = no).
    from_selection: Literal["", "topk", "ortsae", "matryoshka"] = ""
    # Replay this headline arm's tau at every step of the same cell and seed (the matched control).
    tau_from: str = ""  # headline arm whose tau this arm replays step by step

    @property
    def remedy(self) -> str | None:
        """Which remedy a sweep arm tunes (each gets the same budget and rule); None for the baseline."""
        if self.matryoshka:  # the TopK variant is reported, never selected: the paper's is the remedy
            return "matryoshka" if self.matryoshka_variant == "paper" else "matryoshka_topk"
        if self.penalty == "ortsae":
            return "ortsae"
        acts = not (self.tau == 0 and (self.schedule or "fixed") == "fixed")
        return "topk" if self.penalty == "topk" and acts else None

    def validate(self, where: str) -> None:
        check(self.tau is None or self.tau >= 0, f"{where}.tau", "must be >= 0")
        # Explicit, so no study arm reads the default pipeline's `tau` (`dvc exp run -S tau=...` is the default's).
        check(
            self.tau is not None or self.penalty == "none" or self.from_selection,
            f"{where}.tau",
            "must be given (unless penalty is none or the arm takes the selection's)",
        )
        check(self.target is None or 0 <= self.target <= 1, f"{where}.target", "must be in [0, 1]")
        check(self.decay is None or 0 < self.decay <= 1, f"{where}.decay", "must be in (0, 1]")
        check(self.topk_fraction is None or 0 < self.topk_fraction <= 1, f"{where}.topk_fraction", "must be in (0, 1]")
        check(self.chunk >= 2, f"{where}.chunk", "must be >= 2")
        if self.matryoshka:
            m = self.matryoshka
            check(
                all(0 < a < b for a, b in zip(m, m[1:], strict=False)) and m[0] > 0 and m[-1] == 1.0,
                f"{where}.matryoshka",
                f"must be increasing fractions ending at 1.0, got {list(m)}",
            )


@dataclass(frozen=True)
class Regime:
    """A dictionary regime of the synthetic benchmark: its width and TopK's k."""

    d_sae: int
    k: int

    def validate(self, where: str) -> None:
        check(self.d_sae >= 2, f"{where}.d_sae", "must be >= 2")
        check(1 <= self.k <= self.d_sae, f"{where}.k", "must be in [1, d_sae]")


@dataclass(frozen=True)
class SyntheticGrid:
    """Where every study arm runs on the synthetic benchmark: several benchmark instances (synthetic
    model seeds), both hierarchies of ../params.yaml `synthetic`, each dictionary regime, and seeds:
    the sweep and the ablation on `selection_seeds`, the headline on `seeds` (disjoint: the selection
    would favour its own seeds). Seed s gives every arm the same SAE init and sample stream."""

    instances: tuple[int, ...] = (100, 101, 102)  # synthetic model_seed of each benchmark instance
    regimes: dict[str, Regime] = field(  # name -> dictionary width and TopK k
        default_factory=lambda: {"matched": Regime(200, 7), "wide": Regime(400, 5)}
    )
    selection_seeds: tuple[int, ...] = (0, 1)  # SAE seeds of the sweep and the ablation
    selection_instances: tuple[int, ...] = (100,)  # instances of the sweep and the ablation (the headline: all)
    seeds: tuple[int, ...] = (10, 11, 12, 13, 14, 15, 16, 17)  # SAE seeds of the headline (fresh)
    curve_seeds: int = 2  # headline runs of the first seeds also evaluated at 1/4, 1/2, 3/4 of training
    reseed: int = 1  # the baseline's headline runs also evaluated on the draw at eval_seed + this

    def validate(self, where: str = "synthetic_grid") -> None:
        check(len(self.instances) >= 1, f"{where}.instances", "needs at least one synthetic model seed")
        check(all(i >= 0 for i in self.instances), f"{where}.instances", "model seeds must be >= 0")
        for name, regime in self.regimes.items():
            regime.validate(f"{where}.regimes.{name}")
        check(len(self.regimes) >= 1, f"{where}.regimes", "needs at least one regime")
        check(set(self.selection_instances) <= set(self.instances), f"{where}.selection_instances",
              "must be among the instances")  # fmt: skip
        for key in ("instances", "selection_instances", "selection_seeds", "seeds"):
            values = getattr(self, key)
            check(len(set(values)) == len(values), f"{where}.{key}", "must be distinct")
        check(len(self.seeds) >= 2, f"{where}.seeds", "needs at least two (a paired test)")
        check(not set(self.seeds) & set(self.selection_seeds), f"{where}.seeds", "must not overlap selection_seeds")
        check(not set(self.instances) & {*self.seeds, *self.selection_seeds}, f"{where}.instances",
              "must differ from the training seeds")  # fmt: skip
        check(0 <= self.curve_seeds <= len(self.seeds), f"{where}.curve_seeds", "must be in [0, len(seeds)]")
        check(self.reseed >= 1, f"{where}.reseed", "must be >= 1 (0 is the first draw; seeds are >= 0)")


@dataclass(frozen=True)
class Selection:
    """The rule that picks the best orthogonality setting from the sweep, before the headline runs:
    the lowest synthetic (ground-truth) absorption, mean over hierarchies and seeds, among the
    co-activation arms whose cheap LM SAE keeps its cost within bounds against the cheap baseline."""

    max_fvu_increase: float = 0.10  # relative
    max_ce_drop: float = 0.02  # CE loss recovered, absolute

    def validate(self, where: str = "selection") -> None:
        check(self.max_fvu_increase >= 0, f"{where}.max_fvu_increase", "must be >= 0")
        check(self.max_ce_drop >= 0, f"{where}.max_ce_drop", "must be >= 0")


# The per-pair figures of the synthetic benchmark (evaluation/synthetic.py) and its per-SAE summaries
# that a measure may name; tests/test_study.py checks this list against what the evaluation writes.
PAIR_MEASURES = (
    "absorption",
    "absorption_normalised",
    "absorption_normalised_learned",
    "absorption_normalised_m2o",
    "absorption_normalised_m2o_learned",
    "absorption_m2o",
    "parent_recall",
    "parent_recall_m2o",
    "parent_learned",
    "parent_learned_m2o",
    "child_parent_cos",
)
SUMMARY_MEASURES = ("mcc", "explained_variance")


@dataclass(frozen=True)
class Measures:
    """What the study's conclusion rests on, declared before the runs that decide it (README "Measures").

    An arm reduces absorption when, against the baseline on the same seeds, the primary measure falls by
    at least `smallest_effect` (relative), the paired test is rejected by Holm over `holm_family` at the
    study's `alpha`, and the guard (the share of parents learned) falls by no more than `guard_max_drop`:
    a remedy that wins by forgetting parents does not count."""

    primary: str = "absorption_normalised_m2o_learned"  # per (parent, child) pair, synthetic benchmark
    guard: str = "parent_learned_m2o"  # reported beside the primary in every table
    guard_max_drop: float = 0.05  # absolute drop of the guard against the baseline that voids a reduction
    secondary: tuple[str, ...] = ("absorption", "absorption_normalised", "parent_recall_m2o", "child_parent_cos")
    cost: tuple[str, ...] = ("mcc", "explained_variance")  # on the same benchmark
    smallest_effect: float = 0.10  # relative reduction of the primary against the baseline
    test: Literal["paired_t"] = "paired_t"  # over seeds, plus a bootstrap CI of the mean paired difference
    holm_family: tuple[str, ...] = ("best", "control", "ortsae", "matryoshka")  # each vs baseline, primary
    power: float = 0.8  # target power at the smallest effect, Holm-corrected level
    min_seeds: int = 8  # synthetic training seeds per arm at least, whatever the power calculation says

    def validate(self, headline: dict, where: str = "measures") -> None:
        pair_or_summary = (*PAIR_MEASURES, *SUMMARY_MEASURES)
        check(self.primary in PAIR_MEASURES, f"{where}.primary", f"must be one of {', '.join(PAIR_MEASURES)}")
        check(self.guard in PAIR_MEASURES, f"{where}.guard", f"must be one of {', '.join(PAIR_MEASURES)}")
        for key in ("secondary", "cost"):
            for name in getattr(self, key):
                check(name in pair_or_summary, f"{where}.{key}", f"unknown measure {name!r}")
        check(0 <= self.guard_max_drop <= 1, f"{where}.guard_max_drop", "must be in [0, 1]")
        check(0 < self.smallest_effect < 1, f"{where}.smallest_effect", "must be in (0, 1)")
        check(len(self.holm_family) >= 1, f"{where}.holm_family", "needs at least one arm")
        for arm in self.holm_family:
            check(arm in headline and arm != "baseline", f"{where}.holm_family", f"{arm!r} is not a headline arm")
        check(0.5 <= self.power < 1, f"{where}.power", "must be in [0.5, 1)")
        check(self.min_seeds >= 2, f"{where}.min_seeds", "must be >= 2 (a paired test needs two)")


@dataclass(frozen=True)
class StudyParams:
    """study/params.yaml. The arms (`sweep`, `ablation`, `headline`) have no default: they are the study."""

    sweep: dict[str, Arm]  # tau schedules and strengths tried; `baseline` is the cost reference
    ablation: dict[str, Arm]  # top-k fraction ablation at the selected setting
    headline: dict[str, Arm]  # arms compared over seeds; `best` and `control` take the selection's
    sweep_tokens: int = 250_000  # cheap LM SAEs for the sweep and the ablation (the default trains 1M)
    topk_fraction: float = 0.001  # pairs kept per batch, for arms that do not set their own
    scaling_tokens: tuple[int, ...] = (250_000, 500_000)  # absorption against tokens: these + 1M (the headline's)
    headline_seeds: tuple[int, ...] = (0, 1, 2)  # LM SAE seeds of every headline arm (paired: shared init and data)
    headline_arms: tuple[str, ...] = ("baseline", "best", "control", "matryoshka", "ortsae")
    # headline arms on the synthetic grid by stage `synthetic_headline`; the control has its own stage
    synthetic_extra: tuple[str, ...] = ("baseline", "best", "matryoshka", "ortsae")
    scaling_arms: tuple[str, ...] = ()  # LM first-letter absorption against tokens (stage lm_scaling); none by default
    heldout_contexts: int = 16  # core metrics (FVU, CE) of the sweep, ablation and scaling SAEs: first contexts
    headline_heldout_contexts: int = 128  # of the headline SAEs: 128 x 127 = 16,256 tokens
    alpha: float = 0.05  # family-wise error of the Holm-corrected headline comparisons
    selection: Selection = field(default_factory=Selection)  # declared before any headline run
    synthetic_grid: SyntheticGrid = field(default_factory=SyntheticGrid)
    measures: Measures = field(default_factory=Measures)  # declared before any run they decide

    def validate(self) -> None:
        check(self.sweep_tokens >= 1, "sweep_tokens", "must be >= 1")
        check(all(t >= 1 for t in self.scaling_tokens), "scaling_tokens", "must be >= 1 each")
        check(len(self.headline_arms) >= 1, "headline_arms", "needs at least one arm (the baseline)")
        check(self.heldout_contexts >= 1, "heldout_contexts", "must be >= 1")
        check(self.headline_heldout_contexts >= 1, "headline_heldout_contexts", "must be >= 1")
        check(0 < self.topk_fraction <= 1, "topk_fraction", "must be in (0, 1]")
        check(len(self.headline_seeds) >= 1, "headline_seeds", "needs at least one seed")
        check(len(set(self.headline_seeds)) == len(self.headline_seeds), "headline_seeds", "must be distinct")
        check("baseline" in self.sweep, "sweep", "needs a `baseline` arm (the cost reference)")
        for group in ("sweep", "ablation", "headline"):
            for name, arm in getattr(self, group).items():
                check(name.replace(".", "_").replace("-", "_").isidentifier(), f"{group}.{name}", "bad arm name")
                arm.validate(f"{group}.{name}")
                check(
                    not (group == "sweep" and arm.from_selection),
                    f"{group}.{name}",
                    "a sweep arm cannot use the selection",
                )
        for name, arm in self.headline.items():
            where = f"headline.{name}.tau_from"
            check(not arm.tau_from or arm.tau_from in self.headline, where, "must name a headline arm")
        for key in ("headline_arms", "synthetic_extra", "scaling_arms"):
            for name in getattr(self, key):
                check(name in self.headline, key, f"{name!r} has no entry in `headline`")
        check(0 < self.alpha < 1, "alpha", "must be in (0, 1)")
        self.selection.validate()
        self.synthetic_grid.validate()
        self.measures.validate(self.headline)
        check(len(self.synthetic_grid.seeds) >= self.measures.min_seeds, "synthetic_grid.seeds",
              f"needs at least measures.min_seeds = {self.measures.min_seeds}")  # fmt: skip


def load_study(path: Path | str = STUDY_PARAMS) -> StudyParams:
    study = build(StudyParams, read_yaml(path))
    study.validate()
    return study


def load_study_or_exit(path: Path | str = STUDY_PARAMS) -> StudyParams:
    """For stage entry points: one clear line on stderr and exit code 2 on bad or missing parameters."""
    return load_or_exit(load_study, path)
