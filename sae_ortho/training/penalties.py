"""Decoder penalties: one interface the trainer calls for every extra term on the decoder.

A penalty does four things each step: select what it penalises from the batch's codes, compute its
value (before the strength tau), add tau times its gradient to `W_dec.grad` in place after the
reconstruction's backward (no autograd graph, no second d_sae x d_in buffer), and say what to log.
The top-k co-activation term is one; the random-pairs control and the OrtSAE-style all-pairs term
of the study implement the same interface, so the trainer's step never changes for a new arm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from sae_ortho.base.device import to_numpy
from sae_ortho.training.ortho import (
    PairSelection,
    add_ortho_grad_,
    ortho_terms,
    pair_budget,
    pair_id,
    select_pairs_csr,
)


@dataclass
class PenaltyTerms:
    """One step's penalty: its value before tau, what it penalised, and the scalars to log."""

    value: float
    parts: dict[str, float]
    pairs: PairSelection
    cos: torch.Tensor  # decoder cosine of each penalised pair (same order as `pairs`)
    extra: dict = field(default_factory=dict)


class DecoderPenalty:
    """Interface: `terms` (selection + value), `add_grad_` (in place), `log_rows` (pair log)."""

    name = "penalty"
    needs_codes = False  # whether `terms` reads the batch's codes (data parallel: the global batch's, gathered)

    def terms(self, w_dec: torch.Tensor, codes, d_sae: int) -> PenaltyTerms:
        raise NotImplementedError

    def terms_for(self, w_dec: torch.Tensor, pairs: PairSelection) -> PenaltyTerms:
        """The mean-of-squared-cosine terms of given pairs."""
        value, mean_abs_cos, cos = ortho_terms(w_dec, pairs)
        return PenaltyTerms(value, {"ortho": value, "mean_abs_cos": mean_abs_cos, "n_pairs": len(pairs)}, pairs, cos)

    def add_grad_(self, grad: torch.Tensor, w_dec: torch.Tensor, terms: PenaltyTerms, tau: float) -> None:
        """grad += tau * d value / d W_dec for mean-of-squared-cosine penalties."""
        if len(terms.pairs):
            add_ortho_grad_(grad, w_dec, terms.pairs.i, terms.pairs.j, terms.cos, tau)

    def log_rows(self, w_dec: torch.Tensor, terms: PenaltyTerms, step: int) -> dict[str, np.ndarray]:
        """The penalised pairs, best first, with their decoder cosine now (pairs.parquet rows)."""
        ranked = terms.pairs.ranked()
        with torch.no_grad():  # rows are unit norm: the decoder cosine when (re)selected
            pair_cos = (w_dec[ranked.i] * w_dec[ranked.j]).sum(-1)
        return {
            "step": np.full(len(ranked), step, dtype=np.int32),
            "i": to_numpy(ranked.i).astype(np.int32),
            "j": to_numpy(ranked.j).astype(np.int32),
            "score": to_numpy(ranked.score),
            "cos": to_numpy(pair_cos).astype(np.float32),
        }

    def state_dict(self) -> dict:
        """What a checkpoint must hold so that a resumed run draws what an uninterrupted one would.
        Plain python values only: checkpoints are loaded with torch.load(weights_only=True)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SeededPenalty(DecoderPenalty):
    """A penalty that draws from a numpy RNG of its own each step: the RNG is its state."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}  # a dict of str and (128-bit) python ints

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


class TopKCoactivation(DecoderPenalty):
    """The instantaneous top-k orthogonality term: the `fraction` most co-active pairs of the batch,
    penalised by their mean squared decoder cosine."""

    name = "topk_coactivation"
    needs_codes = True

    def __init__(self, fraction: float, selector: str = "auto"):
        self.fraction = fraction
        self.selector = selector

    def select(self, codes, d_sae: int) -> PairSelection:
        return select_pairs_csr(codes.offsets, codes.cols, codes.values, d_sae, self.fraction, self.selector)

    def terms(self, w_dec: torch.Tensor, codes, d_sae: int) -> PenaltyTerms:
        return self.terms_for(w_dec, self.select(codes, d_sae))


class RandomPairs(SeededPenalty):
    """The control: as many pairs as the top-k term keeps, drawn uniformly at random each batch
    (seeded), so a study arm shows whether co-activation selection matters at all."""

    name = "random_pairs"

    def __init__(self, fraction: float, seed: int = 0):
        super().__init__(seed)
        self.fraction = fraction

    def terms(self, w_dec: torch.Tensor, codes, d_sae: int) -> PenaltyTerms:
        budget = min(pair_budget(d_sae, self.fraction), d_sae * (d_sae - 1) // 2)
        ids = np.empty(0, dtype=np.int64)
        while len(ids) < budget:  # rejection: distinct unordered pairs, i != j
            i, j = self.rng.integers(0, d_sae, (2, 2 * budget))
            keep = i != j
            ids = np.unique(np.concatenate([ids, pair_id(i[keep], j[keep], d_sae)]))
        ids = self.rng.permutation(ids)[:budget]
        ids = torch.from_numpy(ids).to(w_dec.device)  # drawn on the CPU: the same pairs on any device
        pairs = PairSelection(ids // d_sae, ids % d_sae, torch.zeros(budget, dtype=torch.float32, device=w_dec.device))
        value, mean_abs_cos, cos = ortho_terms(w_dec, pairs)
        return PenaltyTerms(value, {"ortho": value, "mean_abs_cos": mean_abs_cos, "n_pairs": len(pairs)}, pairs, cos)


class OrtSAEChunks(SeededPenalty):
    """OrtSAE-style term (Korznikov et al., arXiv 2509.22033): no co-activation, every latent is
    penalised by its largest squared decoder cosine with another latent of its chunk, the latents
    split into random chunks of `chunk_size` each step so the cost stays linear in d_sae. The value is
    the mean over latents of max_j cos_ij^2; each (i, argmax j) enters as one pair, so the pair
    gradient of the interface applies unchanged (a pair may appear twice when j's argmax is i)."""

    name = "ortsae"

    def __init__(self, chunk_size: int, seed: int = 0):
        super().__init__(seed)
        self.chunk_size = chunk_size

    def terms(self, w_dec: torch.Tensor, codes, d_sae: int) -> PenaltyTerms:
        order = torch.from_numpy(self.rng.permutation(d_sae)).to(w_dec.device)
        firsts, partners = [], []
        with torch.no_grad():
            for chunk in order.split(self.chunk_size):
                if len(chunk) < 2:
                    continue
                gram = w_dec[chunk] @ w_dec[chunk].T
                gram.fill_diagonal_(0.0)
                firsts.append(chunk)
                partners.append(chunk[gram.abs().argmax(1)])
        if not firsts:
            none = _no_pairs(w_dec.device)
            return PenaltyTerms(0.0, {"ortho": 0.0, "mean_abs_cos": 0.0, "n_pairs": 0}, none, none.score)
        i, j = torch.cat(firsts), torch.cat(partners)
        pairs = PairSelection(i, j, torch.zeros(len(i), dtype=torch.float32, device=w_dec.device))
        value, mean_abs_cos, cos = ortho_terms(w_dec, pairs)
        pairs.score = (cos**2).float()  # the log ranks pairs by the penalty they carry
        return PenaltyTerms(value, {"ortho": value, "mean_abs_cos": mean_abs_cos, "n_pairs": len(pairs)}, pairs, cos)


def _no_pairs(device: torch.device) -> PairSelection:
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    return PairSelection(empty, empty, torch.zeros(0, dtype=torch.float32, device=device))
