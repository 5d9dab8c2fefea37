"""The study's parameters (study/params.yaml) and how an arm becomes a training run.

Every arm is an entry of a dict keyed by its name; each entry's values are declared as that stage's
params in study/dvc.yaml, so editing one arm reruns exactly that arm. Settings an arm does not give
come from the default pipeline (../params.yaml: `train`, `ortho`, `topk_fraction`, `synthetic`).
Arms whose `from_selection` is true start from the setting the `select` stage chose by the rule in
`selection` (declared before any headline run) and override what they give (the control, the
top-k fraction ablation).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import yaml

from sae_ortho.base.params import OrthoParams, ParamError, Params, TrainParams, _build, _check
from sae_ortho.training.run_config import RunConfig

STUDY_PARAMS = Path("study/params.yaml")
SELECTION = Path("metrics/study/selection.json")
# The chosen arm's name and settings alone: what derived arms depend on, so editing a sweep arm that
# does not change the choice reruns the selection but none of the derived arms.
SELECTED_ARM = Path("metrics/study/selected_arm.json")


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
    from_selection: bool = False

    def validate(self, where: str) -> None:
        _check(self.tau is None or self.tau >= 0, f"{where}.tau", "must be >= 0")
        # Explicit, so no study arm reads the default pipeline's `tau` (`dvc exp run -S tau=...` is the default's).
        _check(
            self.tau is not None or self.penalty == "none" or self.from_selection,
            f"{where}.tau",
            "must be given (unless penalty is none or the arm takes the selection's)",
        )
        _check(self.target is None or 0 <= self.target <= 1, f"{where}.target", "must be in [0, 1]")
        _check(self.decay is None or 0 < self.decay <= 1, f"{where}.decay", "must be in (0, 1]")
        _check(self.topk_fraction is None or 0 < self.topk_fraction <= 1, f"{where}.topk_fraction", "must be in (0, 1]")
        _check(self.chunk >= 2, f"{where}.chunk", "must be >= 2")
        if self.matryoshka:
            m = self.matryoshka
            _check(
                all(0 < a < b for a, b in zip(m, m[1:], strict=False)) and m[0] > 0 and m[-1] == 1.0,
                f"{where}.matryoshka",
                f"must be increasing fractions ending at 1.0, got {list(m)}",
            )


@dataclass(frozen=True)
class Selection:
    """The rule that picks the best orthogonality setting from the sweep, before the headline runs:
    the lowest synthetic (ground-truth) absorption, mean over hierarchies and seeds, among the
    co-activation arms whose cheap LM SAE keeps its cost within bounds against the cheap baseline."""

    max_fvu_increase: float = 0.10  # relative
    max_ce_drop: float = 0.02  # CE loss recovered, absolute

    def validate(self, where: str = "selection") -> None:
        _check(self.max_fvu_increase >= 0, f"{where}.max_fvu_increase", "must be >= 0")
        _check(self.max_ce_drop >= 0, f"{where}.max_ce_drop", "must be >= 0")


@dataclass(frozen=True)
class StudyParams:
    sweep_tokens: int = 250_000  # cheap LM SAEs of the sweeps and the ablation
    topk_fraction: float = 0.001  # arms that do not give their own
    scaling_tokens: tuple[int, ...] = (500_000,)  # extra points of absorption against tokens
    headline_seeds: tuple[int, ...] = (0, 1, 2)
    headline_arms: tuple[str, ...] = ("baseline", "best", "control", "matryoshka", "ortsae")
    scaling_arms: tuple[str, ...] = ("baseline", "best")
    heldout_contexts: int = 32  # core metrics on the first held-out contexts (the default's 65 cost ~65 s an SAE)
    selection: Selection = field(default_factory=Selection)
    sweep: dict[str, Arm] = field(default_factory=dict)
    ablation: dict[str, Arm] = field(default_factory=dict)
    headline: dict[str, Arm] = field(default_factory=dict)
    synthetic_extra: tuple[str, ...] = ("control", "matryoshka", "ortsae")  # headline arms also run on synthetic
    alpha: float = 0.05  # family-wise error rate of the Holm-corrected headline comparisons

    def validate(self) -> None:
        _check(self.sweep_tokens >= 1, "sweep_tokens", "must be >= 1")
        _check(self.heldout_contexts >= 1, "heldout_contexts", "must be >= 1")
        _check(0 < self.topk_fraction <= 1, "topk_fraction", "must be in (0, 1]")
        _check(len(self.headline_seeds) >= 1, "headline_seeds", "needs at least one seed")
        _check(len(set(self.headline_seeds)) == len(self.headline_seeds), "headline_seeds", "must be distinct")
        _check("baseline" in self.sweep, "sweep", "needs a `baseline` arm (the cost reference)")
        for group in ("sweep", "ablation", "headline"):
            for name, arm in getattr(self, group).items():
                _check(name.replace(".", "_").replace("-", "_").isidentifier(), f"{group}.{name}", "bad arm name")
                arm.validate(f"{group}.{name}")
                _check(
                    not (group == "sweep" and arm.from_selection),
                    f"{group}.{name}",
                    "a sweep arm cannot use the selection",
                )
        for name in (*self.headline_arms, *self.synthetic_extra, *self.scaling_arms):
            _check(name in self.headline, "headline_arms", f"{name!r} has no entry in `headline`")
        _check(0 < self.alpha < 1, "alpha", "must be in (0, 1)")
        self.selection.validate()


def load_study(path: Path | str = STUDY_PARAMS) -> StudyParams:
    with open(path) as fh:
        raw = yaml.safe_load(fh) or {}
    study = _build(StudyParams, raw, "")
    study.validate()
    return study


def load_study_or_exit(path: Path | str = STUDY_PARAMS) -> StudyParams:
    import sys

    try:
        return load_study(path)
    except (ParamError, FileNotFoundError) as err:
        print(f"error: {path}: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def arm_spec(study: StudyParams, group: str, name: str, selection_path: Path = SELECTED_ARM) -> Arm:
    """The arm's settings, with the selected sweep arm underneath when it asks for the selection."""
    arms = getattr(study, group)
    if name not in arms:
        raise ParamError(f"{group}: no arm {name!r} (have {', '.join(arms)})")
    arm = arms[name]
    if not arm.from_selection:
        return arm
    if not selection_path.exists():
        raise FileNotFoundError(f"{selection_path} missing: run the `select` stage first")
    settings = json.loads(selection_path.read_text())["settings"]
    base = Arm(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})
    given = {k: v for k, v in arm.__dict__.items() if v is not None and k != "from_selection"}
    defaults = Arm()
    # Only what the arm sets explicitly (differs from the dataclass default) overrides the selected arm.
    overrides = {k: v for k, v in given.items() if getattr(defaults, k) != v}
    return replace(base, **overrides)


def run_config_for(arm: Arm, p: Params, train: TrainParams, seed: int, topk_fraction: float = 0.001) -> RunConfig:
    """The trainer's RunConfig for an arm on `train` (the LM's or the synthetic settings); `p` gives
    `ortho` (adaptive step, default target, pair-log interval), never `tau` or `topk_fraction`."""
    ortho = OrthoParams(
        target=arm.target if arm.target is not None else p.ortho.target,
        tau_lr=p.ortho.tau_lr,
        log_pairs_every=p.ortho.log_pairs_every,
    )
    tau = 0.0 if arm.penalty == "none" else float(arm.tau)
    schedule = arm.schedule or "fixed"
    prefixes = tuple(max(1, round(f * train.d_sae)) for f in arm.matryoshka)
    return RunConfig(
        train=train,
        seed=seed,
        tau=tau,
        topk_fraction=arm.topk_fraction if arm.topk_fraction is not None else topk_fraction,
        tau_schedule=schedule if arm.penalty != "none" else "fixed",
        ortho=ortho,
        penalty=arm.penalty if arm.penalty != "none" else "topk",
        tau_decay=arm.decay if arm.decay is not None else 0.999,
        ortsae_chunk=arm.chunk,
        matryoshka_prefixes=prefixes,
    )


def relative_increase(value: float, reference: float) -> float:
    return (value - reference) / reference if reference else math.inf


def select_arm(study: StudyParams, synthetic: dict[str, dict], lm: dict[str, dict]) -> dict:
    """Apply the declared rule to the sweep's metrics (per arm: the compact synthetic and LM files).
    Candidates are the co-activation arms (penalty topk, a term that can act); admissible ones keep
    the cheap LM SAE's FVU within `max_fvu_increase` (relative) and its CE loss recovered within
    `max_ce_drop` of the cheap baseline's; the lowest mean synthetic absorption wins (ties: sweep
    order). With no admissible arm, the cheapest candidate is taken and the record says so."""
    base = lm["baseline"]["core"]
    rule = study.selection
    table = {}
    for name, arm in study.sweep.items():
        if arm.penalty != "topk" or (arm.tau == 0 and (arm.schedule or "fixed") == "fixed"):
            continue
        core = lm[name]["core"]
        fvu_up = relative_increase(core["fvu"], base["fvu"])
        ce_drop = base["ce_recovered_vs_zero"] - core["ce_recovered_vs_zero"]
        table[name] = {
            "synthetic_absorption": synthetic[name]["absorption_mean"],
            "fvu_increase": round(fvu_up, 5),
            "ce_recovered_drop": round(ce_drop, 5),
            "admissible": fvu_up <= rule.max_fvu_increase and ce_drop <= rule.max_ce_drop,
        }
    if not table:
        raise ParamError("sweep: no co-activation arm (penalty topk with a term that acts) to select from")
    admissible = [n for n, row in table.items() if row["admissible"]]
    if admissible:
        chosen = min(admissible, key=lambda n: table[n]["synthetic_absorption"])
    else:
        chosen = min(table, key=lambda n: table[n]["fvu_increase"])
    return {
        "selected": chosen,
        "settings": asdict(study.sweep[chosen]),
        "any_admissible": bool(admissible),
        "rule": (
            "lowest mean synthetic absorption among co-activation sweep arms with cheap-LM FVU increase <= "
            f"{rule.max_fvu_increase:g} (relative) and CE-recovered drop <= {rule.max_ce_drop:g} vs the cheap baseline"
        ),
        "baseline_synthetic_absorption": synthetic["baseline"]["absorption_mean"],
        "candidates": table,
    }
