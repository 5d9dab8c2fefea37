"""The study's parameters (study/params.yaml) and how an arm becomes a training run.

Every arm is an entry of a dict keyed by its name; each entry's values are declared as that stage's
params in study/dvc.yaml, so editing one arm reruns exactly that arm. Settings an arm does not give
come from the default pipeline (../params.yaml: `train`, `ortho`, `topk_fraction`, `synthetic`).
Arms whose `from_selection` names a remedy (topk, ortsae, matryoshka) start from the sweep arm the
`select` stage chose for it by the rule in `selection` (declared before any headline run, the same
rule and the same number of sweep settings for every remedy) and override what they give (the
control, the top-k fraction ablation).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from sae_ortho.base.params import OrthoParams, ParamError, Params, TrainParams
from sae_ortho.base.study_params import Arm, StudyParams
from sae_ortho.training.run_config import RunConfig

SELECTION = Path("metrics/study/selection.json")
# The chosen arm's name and settings alone: what derived arms depend on, so editing a sweep arm that
# does not change the choice reruns the selection but none of the derived arms.
SELECTED_ARM = Path("metrics/study/selected_arm.json")


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
    chosen = json.loads(selection_path.read_text())
    if arm.from_selection not in chosen:
        raise ParamError(f"{group}.{name}: the selection chose no {arm.from_selection} arm (have {', '.join(chosen)})")
    settings = chosen[arm.from_selection]["settings"]
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
    paper = bool(prefixes) and arm.matryoshka_variant == "paper"
    if paper:
        train = replace(train, architecture="batchtopk")
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
        matryoshka_sum=paper,
    )
