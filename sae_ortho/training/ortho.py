"""Instantaneous top-k orthogonality: sparse co-activation pair selection, the loss, tau schedules.

Per batch, C_ij = sum_b f_bi f_bj over feature pairs i < j; the top `fraction` of the
d_sae (d_sae - 1) / 2 pairs by C_ij are kept and tau * mean (w_i . w_j)^2 is added to the
loss. Selection is exact but never forms a dense d_sae x d_sae matrix: the codes are a sparse
[batch, d_sae] matrix F, and the upper triangle of F^T F is accumulated only over co-active pairs
(work sum_b L0_b^2 / 2, not B * d_sae^2) with a running top-K, in kernels.py. When fewer pairs
co-activate than the budget K, only pairs with C_ij > 0 are kept. The loss and its gradient
touch only the K kept pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from sae_ortho.base.device import on_host, to_numpy
from sae_ortho.training import kernels, pairs_torch


@dataclass
class PairSelection:
    """The kept pairs in their selector's fixed order (numba: by (i, j); torch: by score, then (i, j));
    `ranked()` sorts them by score."""

    i: torch.Tensor  # [K] int64, i < j
    j: torch.Tensor  # [K] int64
    score: torch.Tensor  # [K] float32, C_ij

    def __len__(self) -> int:
        return int(self.i.numel())

    def ranked(self) -> PairSelection:
        """Best first; ties by (i, j), so the order does not depend on the kernel's thread count."""
        order = np.lexsort((to_numpy(self.j), to_numpy(self.i), -to_numpy(self.score)))
        order = torch.from_numpy(order).to(self.i.device)
        return PairSelection(self.i[order], self.j[order], self.score[order])


def pair_budget(d_sae: int, fraction: float) -> int:
    return max(1, math.ceil(fraction * d_sae * (d_sae - 1) / 2))


def pair_id(i: np.ndarray, j: np.ndarray, d_sae: int) -> np.ndarray:
    """The id of each unordered feature pair {i, j}: min * d_sae + max (int64), the numbering the
    kernels, the pair log and the stability analysis share."""
    i, j = np.asarray(i), np.asarray(j)
    return np.minimum(i, j).astype(np.int64) * d_sae + np.maximum(i, j).astype(np.int64)


def codes_to_csr(f: torch.Tensor, topk_indices: torch.Tensor | None = None) -> sp.csr_matrix:
    """The nonzero codes as a scipy CSR matrix [batch, d_sae]; uses the top-k indices when given."""
    f = f.detach()
    batch, d_sae = f.shape
    if topk_indices is not None:
        idx = topk_indices.detach()
        vals = f.gather(1, idx)
        keep = vals > 0  # TopK latents clipped by ReLU are not active
        counts = keep.sum(dim=1)
        indptr = np.zeros(batch + 1, dtype=np.int64)
        np.cumsum(counts.numpy(), out=indptr[1:])
        return sp.csr_matrix((vals[keep].numpy(), idx[keep].numpy(), indptr), shape=(batch, d_sae))
    rows, cols = f.nonzero(as_tuple=True)  # row-major order, as CSR needs
    indptr = np.zeros(batch + 1, dtype=np.int64)
    np.cumsum(torch.bincount(rows, minlength=batch).numpy(), out=indptr[1:])
    return sp.csr_matrix((f[rows, cols].numpy(), cols.numpy(), indptr), shape=(batch, d_sae))


def select_pairs_csr(
    offsets: torch.Tensor,
    cols: torch.Tensor,
    values: torch.Tensor,
    d_sae: int,
    fraction: float,
    selector: str = "auto",
) -> PairSelection:
    """Top `fraction` of feature pairs by batch co-activation, from CSR codes (token b's active
    latents are cols[offsets[b]:offsets[b+1]]; nonpositive values are not active). `selector`: numba
    (kernels.py, CPU), torch (pairs_torch.py, the codes' device) or auto (numba on CPU, torch elsewhere);
    both keep the same pairs, ties broken by (i, j)."""
    budget = pair_budget(d_sae, fraction)
    if selector == "torch" or (selector == "auto" and not on_host(values)):
        i, j, score = pairs_torch.top_coactive_pairs(offsets, cols, values.detach(), d_sae, budget)
        return PairSelection(i, j, score.float())
    i, j, score = kernels.top_coactive_pairs(to_numpy(offsets), to_numpy(cols), to_numpy(values), d_sae, budget)
    device = values.device
    return PairSelection(
        torch.from_numpy(i).to(device),
        torch.from_numpy(j).to(device),
        torch.from_numpy(score.astype(np.float32)).to(device),
    )


def select_pairs(f: torch.Tensor, fraction: float, topk_indices: torch.Tensor | None = None) -> PairSelection:
    """select_pairs_csr for dense codes [batch, d_sae] (uses the top-k indices when given)."""
    codes = codes_to_csr(f, topk_indices)
    return select_pairs_csr(
        torch.from_numpy(codes.indptr),
        torch.from_numpy(codes.indices.astype(np.int64)),
        torch.from_numpy(codes.data),
        f.shape[1],
        fraction,
    )


def select_pairs_scipy(f: torch.Tensor, fraction: float, topk_indices: torch.Tensor | None = None) -> PairSelection:
    """The same selection with scipy's sparse-sparse product (both triangles, one core, every
    co-active pair materialised before the partition): the benchmark's earlier implementation."""
    d_sae = f.shape[1]
    codes = codes_to_csr(f, topk_indices)
    coact = (codes.T.tocsr() @ codes).tocoo()
    upper = (coact.row < coact.col) & (coact.data > 0)
    rows, cols, scores = coact.row[upper], coact.col[upper], coact.data[upper]
    budget = pair_budget(d_sae, fraction)
    if len(scores) > budget:
        top = np.argpartition(-scores, budget - 1)[:budget]
        rows, cols, scores = rows[top], cols[top], scores[top]
    order = np.argsort(-scores, kind="stable")
    return PairSelection(
        torch.from_numpy(rows[order].astype(np.int64)),
        torch.from_numpy(cols[order].astype(np.int64)),
        torch.from_numpy(scores[order].astype(np.float32)),
    )


def select_pairs_dense(f: torch.Tensor, fraction: float) -> PairSelection:
    """Reference: dense F^T F and top-k over its strict upper triangle. O(B d_sae^2); tests only."""
    d_sae = f.shape[1]
    coact = f.detach().double().T @ f.detach().double()
    iu = torch.triu_indices(d_sae, d_sae, offset=1)
    scores = coact[iu[0], iu[1]]
    positive = scores > 0
    iu, scores = iu[:, positive], scores[positive]
    k = min(pair_budget(d_sae, fraction), scores.numel())
    top = torch.topk(scores, k)
    return PairSelection(iu[0, top.indices], iu[1, top.indices], top.values.float())


def pair_cosines(w_dec: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """w_i . w_j per pair, without gathering [K, d_in] copies of the rows. No autograd. numba on CPU,
    torch (in chunks) on other devices."""
    if not on_host(w_dec):
        return pairs_torch.pair_dots(w_dec.detach(), i, j)
    return torch.from_numpy(kernels.pair_dots(w_dec.detach().numpy(), i.numpy(), j.numpy()))


class _PairCosSquared(torch.autograd.Function):
    """mean_p cos_p^2, given the pairs' cosines, with a sparse backward."""

    @staticmethod
    def forward(ctx, w_dec: torch.Tensor, i: torch.Tensor, j: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w_dec, i, j, cos)
        return (cos**2).mean()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        w_dec, i, j, cos = ctx.saved_tensors
        # dL/dw_i = sum over i's pairs of coef_ij w_j: a symmetric sparse matrix times W.
        grad = torch.zeros_like(w_dec)
        add_ortho_grad_(grad, w_dec, i, j, cos, float(grad_out))
        return grad, None, None, None


def add_ortho_grad_(
    grad: torch.Tensor, w_dec: torch.Tensor, i: torch.Tensor, j: torch.Tensor, cos: torch.Tensor, weight: float
):
    """grad += weight * d/dW mean_p cos_p^2 over pairs (i_p, j_p), in place: the trainer's fast path
    (no autograd, no second d_sae x d_in buffer). d/dw_i of cos_ij^2 = 2 cos_ij w_j, and for w_j."""
    if not on_host(grad):
        pairs_torch.add_pair_grad_(grad, w_dec.detach(), i, j, (weight * 2.0 / len(cos)) * cos)
        return
    coef = (weight * 2.0 / len(cos)) * cos.numpy()
    kernels.add_pair_grad(grad.numpy(), w_dec.detach().numpy(), i.numpy(), j.numpy(), coef)


def ortho_terms(w_dec: torch.Tensor, pairs: PairSelection) -> tuple[float, float, torch.Tensor]:
    """(mean cos^2, mean |cos|, cos) of the kept pairs, without autograd (see add_ortho_grad_)."""
    if len(pairs) == 0:
        return 0.0, 0.0, torch.zeros(0, device=w_dec.device)
    cos = pair_cosines(w_dec, pairs.i, pairs.j)
    return float((cos.double() ** 2).mean()), float(cos.abs().double().mean()), cos


def ortho_loss(w_dec: torch.Tensor, pairs: PairSelection) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean squared cosine of the kept pairs, mean |cosine|) for unit-norm decoder rows.

    Rows are kept at unit norm by the trainer (renormalised every step, parallel gradient
    removed), so the dot product is the cosine.
    """
    if len(pairs) == 0:
        zero = w_dec.sum() * 0.0
        return zero, zero.detach()
    cos = pair_cosines(w_dec, pairs.i, pairs.j)
    return _PairCosSquared.apply(w_dec, pairs.i, pairs.j, cos), cos.abs().mean()


@dataclass
class TauSchedule:
    """tau_t. fixed: constant. adaptive: projected dual ascent on the kept pairs' mean |cos|:
    tau <- max(0, tau + lr * (mean|cos| - target)), so tau grows while the selected pairs are
    more aligned than `target` and decays once they are below it. decay: tau <- tau * decay each
    step, the multiplicative rule of the earlier failed attempt (background.md section 8)."""

    tau: float
    kind: str = "fixed"
    target: float = 0.1
    lr: float = 0.01
    decay: float = 0.999

    def update(self, mean_abs_cos: float) -> float:
        if self.kind == "adaptive":
            self.tau = max(0.0, self.tau + self.lr * (mean_abs_cos - self.target))
        elif self.kind == "decay":
            self.tau *= self.decay
        return self.tau
