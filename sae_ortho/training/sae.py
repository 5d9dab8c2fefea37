"""The sparse autoencoder: ReLU (L1) or TopK, unit-norm decoder rows, SAELens export.

Shapes follow SAELens: W_enc [d_in, d_sae], W_dec [d_sae, d_in] (rows are features),
b_enc [d_sae], b_dec [d_in]. Inputs are multiplied by `input_scale` (chosen at training
start so the mean input norm is sqrt(d_in), as SAELens does); the scale is stored in the
checkpoint and folded into the weights on SAELens export, so both encode identically.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from sae_ortho.base.device import HOST
from sae_ortho.base.io import atomic_dir, verified

# batchtopk (Bussmann et al. 2024): training keeps the batch's k * B largest pre-activations; inference
# thresholds at `threshold` (a running estimate of the smallest kept one), exported as SAELens's JumpReLU.
Architecture = Literal["relu", "topk", "batchtopk"]
CONFIG_FILE = "sae_config.json"
STATE_FILE = "sae_state.safetensors"


@dataclass(frozen=True)
class SAEConfig:
    d_in: int
    d_sae: int
    architecture: Architecture = "topk"
    k: int = 32  # active latents per token (topk)
    input_scale: float = 1.0
    threshold: float = 0.0  # batchtopk: inference keeps pre-activations above it (of the scaled input)
    model_name: str = ""
    hook_name: str = ""


class SAE(nn.Module):
    def __init__(self, cfg: SAEConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        # Initialised on the CPU whatever the device: the same seed gives the same weights everywhere.
        cpu = HOST
        gen = torch.Generator(cpu).manual_seed(seed)
        w_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=gen, device=cpu)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        # Tied init (encoder = decoder transpose) is the common start for both architectures.
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, device=cpu))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, device=cpu))

    def pre_acts(self, x_scaled: torch.Tensor) -> torch.Tensor:
        return (x_scaled - self.b_dec) @ self.W_enc + self.b_enc

    def encode_scaled(self, x_scaled: torch.Tensor) -> torch.Tensor:
        """Latents for already-scaled inputs (training uses the sparse path in sparse_ops.py)."""
        pre = self.pre_acts(x_scaled)
        if self.cfg.architecture == "relu":
            return torch.relu(pre)
        if self.cfg.architecture == "batchtopk":
            return torch.relu(pre) * (pre > self.cfg.threshold)
        values, indices = torch.topk(pre, self.cfg.k, dim=-1, sorted=False)
        # Same order as SAELens's TopK: select by pre-activation, then ReLU.
        return torch.zeros_like(pre).scatter(-1, indices, values.relu())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_scaled(x * self.cfg.input_scale)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return (f @ self.W_dec + self.b_dec) / self.cfg.input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out each decoder row's gradient component along the row (unit-norm constraint)."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
        self.W_dec.grad -= (self.W_dec.grad * w).sum(dim=1, keepdim=True) * w

    def save(self, directory: Path) -> None:
        """Our checkpoint (config + weights) and the SAELens files, written atomically as one directory."""
        from safetensors.torch import save_file

        directory = Path(directory)
        with atomic_dir(directory, digests=True) as tmp:
            (tmp / CONFIG_FILE).write_text(json.dumps(asdict(self.cfg), indent=2))
            save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(tmp / STATE_FILE))
            self.to_saelens().save_model(tmp)

    @classmethod
    def load(cls, directory: Path | str) -> SAE:
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg = SAEConfig(**json.loads(verified(directory / CONFIG_FILE).read_text()))
        sae = cls(cfg)
        sae.load_state_dict(load_file(str(verified(directory / STATE_FILE))))
        return sae

    def to_saelens(self):
        """A sae_lens SAE that encodes raw (unscaled) activations exactly as this one does."""
        from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
        from sae_lens.saes.sae import SAEMetadata

        s = self.cfg.input_scale
        meta = SAEMetadata(model_name=self.cfg.model_name, hook_name=self.cfg.hook_name, input_scale_folded=s)
        common = {"d_in": self.cfg.d_in, "d_sae": self.cfg.d_sae, "metadata": meta}
        if self.cfg.architecture == "relu":
            sae = StandardSAE(StandardSAEConfig(**common))
        elif self.cfg.architecture == "batchtopk":
            sae = JumpReLUSAE(JumpReLUSAEConfig(**common))
            with torch.no_grad():  # folding the input scale leaves the pre-activations, so the threshold
                sae.threshold.fill_(self.cfg.threshold)
        else:
            sae = TopKSAE(TopKSAEConfig(k=self.cfg.k, **common))
        with torch.no_grad():
            # Fold the input scale: (s x - b) W + c == (x - b/s)(s W) + c, and decode / s.
            sae.W_enc.copy_(self.W_enc * s)
            sae.b_enc.copy_(self.b_enc)
            sae.W_dec.copy_(self.W_dec / s)
            sae.b_dec.copy_(self.b_dec / s)
        return sae
