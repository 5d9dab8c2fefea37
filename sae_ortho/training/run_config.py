"""What one training run is: its parameters, its penalty, and the fingerprint a checkpoint must match."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from sae_ortho.base import params as params_mod
from sae_ortho.training.penalties import DecoderPenalty, OrtSAEChunks, RandomPairs, TopKCoactivation


@dataclass
class RunConfig:
    """Everything one training run needs; the baseline is this with tau = 0."""

    train: params_mod.TrainParams
    seed: int
    tau: float = 0.0
    topk_fraction: float = 0.001
    tau_schedule: str = "fixed"
    ortho: params_mod.OrthoParams = field(default_factory=params_mod.OrthoParams)
    # The study's arms (sae_ortho/study/arms.py); the defaults are the pipeline's two SAEs.
    penalty: str = "topk"  # topk (co-activation) | random (control) | ortsae (all pairs, random chunks)
    tau_decay: float = 0.999  # tau_schedule "decay": tau_t = tau * tau_decay**t (the earlier attempt's rule)
    ortsae_chunk: int = 1024  # ortsae: latents per random chunk
    matryoshka_prefixes: tuple[int, ...] = ()  # nested prefix sizes (the last = d_sae); () = plain SAE
    matryoshka_sum: bool = False  # sum the prefix losses (the paper's, with batchtopk) rather than their mean
    # tau at every step, replayed instead of the schedule (the study's control replays best's trajectory)
    tau_replay: tuple[float, ...] = ()

    @property
    def uses_ortho(self) -> bool:
        return self.tau > 0 or self.tau_schedule == "adaptive" or any(t > 0 for t in self.tau_replay)

    def make_penalty(self) -> DecoderPenalty | None:
        if not self.uses_ortho:
            return None
        if self.penalty == "topk":
            return TopKCoactivation(self.topk_fraction, self.ortho.selector)
        if self.penalty == "random":
            return RandomPairs(self.topk_fraction, seed=self.seed)
        if self.penalty == "ortsae":
            return OrtSAEChunks(self.ortsae_chunk, seed=self.seed)
        raise ValueError(f"unknown penalty {self.penalty!r} (topk | random | ortsae)")

    def fingerprint(self, data_fp: str) -> str:
        return hashlib.sha256(json.dumps([asdict(self), data_fp], sort_keys=True).encode()).hexdigest()


def run_config(p: params_mod.Params, name: str, seed: int | None = None) -> RunConfig:
    """The run of SAE `name` (baseline | ortho); `seed` overrides `sae_seed` (the stability seeds)."""
    seed = p.sae_seed if seed is None else seed
    if name == "baseline":
        return RunConfig(train=p.train, seed=seed)
    return RunConfig(p.train, seed, p.tau, p.topk_fraction, p.tau_schedule, p.ortho)
