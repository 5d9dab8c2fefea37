"""Typed, validated parameters: one dataclass per params.yaml section (params_train.py, params_eval.py).

Every stage calls `load_or_exit()`; an unknown key, a wrong type or an out-of-range value gives one
line naming the key and exit code 2, before any heavy work. params.yaml holds every default; the
dataclass defaults equal it (tests/test_params.py), and `python -m sae_ortho.base.schema_doc` prints
the table of keys in README's "Parameters".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from sae_ortho.base import device, schema
from sae_ortho.base.params_eval import (
    OFFLINE_TASKS,
    SAEBENCH_HUB_TASKS,
    AbsorptionParams,
    CoreParams,
    HeldoutParams,
    LettersParams,
    ProbingParams,
    StabilityParams,
    SyntheticHierarchy,
    SyntheticParams,
)
from sae_ortho.base.params_train import TASK_ARCHIVES, DataParams, DistParams, ExtractParams, OrthoParams, TrainParams
from sae_ortho.base.schema import ParamError, build, check, read_yaml

__all__ = [
    "OFFLINE_TASKS",
    "SAEBENCH_HUB_TASKS",
    "AbsorptionParams",
    "CoreParams",
    "DataParams",
    "DistParams",
    "ExtractParams",
    "HeldoutParams",
    "LettersParams",
    "OrthoParams",
    "ParamError",
    "Params",
    "ProbingParams",
    "StabilityParams",
    "SyntheticHierarchy",
    "SyntheticParams",
    "TrainParams",
    "load",
    "load_or_exit",
]

PARAMS_FILE = Path("params.yaml")


@dataclass(frozen=True)
class Params:
    model: str = "smollm2-135m"
    layer: int = 6
    hook: str = "resid_post"
    seed: int = 0
    corpus: str = "embedded"
    device: str = "cpu"  # cpu | cuda | cuda:N | auto (first GPU if any); cpu by default: same bits on any machine
    lm_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    dist: DistParams = field(default_factory=DistParams)
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

    @property
    def torch_device(self) -> torch.device:
        return device.resolve(self.device)

    @property
    def torch_lm_dtype(self) -> torch.dtype:
        return device.lm_dtype(self.lm_dtype)

    def validate(self) -> None:
        from sae_ortho.base.model_names import is_known_model, model_n_layers

        if not is_known_model(self.model):
            raise ParamError(
                f"model: unknown model {self.model!r}; use 'smollm2-135m' (embedded, offline) "
                "or a transformer_lens model name such as gpt2"
            )
        check(self.layer >= 0, "layer", "must be >= 0")
        n_layers = model_n_layers(self.model)
        if n_layers is not None:
            check(
                self.layer < n_layers,
                "layer",
                f"{self.layer} is beyond {self.model}'s {n_layers} layers (0..{n_layers - 1})",
            )
        check(
            self.hook in {"resid_pre", "resid_mid", "resid_post"},
            "hook",
            f"must be resid_pre, resid_mid or resid_post, got {self.hook!r}",
        )
        check(
            self.corpus == "embedded" or (self.corpus.startswith("hf:") and len(self.corpus) > 3),
            "corpus",
            f"must be 'embedded' or 'hf:<dataset>[:<split>]', got {self.corpus!r}",
        )
        try:
            device.resolve(self.device)
        except ValueError as err:
            raise ParamError(str(err)) from err
        check(self.lm_dtype in device.LM_DTYPES, "lm_dtype", f"must be one of {', '.join(device.LM_DTYPES)}")
        check(self.tau >= 0, "tau", f"must be >= 0, got {self.tau}")
        check(0 < self.topk_fraction <= 1, "topk_fraction", f"must be in (0, 1], got {self.topk_fraction}")
        self.dist.validate()
        self.data.validate()
        self.extract.validate()
        self.train.validate()
        self.ortho.validate()
        check(isinstance(self.saes, dict) and len(self.saes) >= 1, "saes", "must map SAE names to directories")
        for name, directory in self.saes.items():
            check(
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
        check(len(self.probing.k_values) >= 1, "probing.k_values", "needs at least one k")
        for task in self.probing.tasks:
            missing = [a for a in TASK_ARCHIVES.get(task, ()) if a not in self.data.sources]
            check(
                not missing,
                "probing.tasks",
                f"{task} is built from {', '.join(missing)}, which data.sources leaves out: add it there "
                "or drop the task",
            )
        # The corpus stage keeps classes with at least data.probe_min_*; probing then takes exactly
        # probing.*_per_class of each, so the first must cover the second.
        for split in ("train", "test"):
            check(
                getattr(self.data, f"probe_min_{split}_per_class") >= getattr(self.probing, f"{split}_per_class"),
                f"data.probe_min_{split}_per_class",
                f"must be >= probing.{split}_per_class ({getattr(self.probing, f'{split}_per_class')}): "
                "smaller classes would pass the corpus stage and fail probing",
            )


def load(path: Path | str = PARAMS_FILE) -> Params:
    """Load and validate params.yaml. Raises ParamError naming the first bad key."""
    params = build(Params, resolve_expansion_factor(read_yaml(path)))
    params.validate()
    return params


def resolve_expansion_factor(raw: dict) -> dict:
    """`train.d_sae: 8x` means 8 times the model's residual width (read from its config, no weights
    loaded), so one params file fits any model; an integer is used as given."""
    train = raw.get("train")
    value = train.get("d_sae") if isinstance(train, dict) else None
    if not isinstance(value, str):
        return raw
    from sae_ortho.base.model_names import model_width

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*x\s*", value)
    check(match is not None, "train.d_sae", f"must be an integer or an expansion factor such as 8x, got {value!r}")
    model = raw.get("model", Params.model)
    width = model_width(model) if isinstance(model, str) else None
    check(width is not None, "train.d_sae", f"{value} needs the width of {model!r}, not known offline: give an integer")
    d_sae = round(float(match[1]) * width)
    return {**raw, "train": {**train, "d_sae": d_sae}}


def load_or_exit(path: Path | str = PARAMS_FILE) -> Params:
    """For stage entry points: one clear line on stderr and exit code 2 on bad or missing parameters."""
    return schema.load_or_exit(load, path)
