"""The training step's fast path: forward and backward touch only the active latents.

A TopK (or trained ReLU) SAE has L0 << d_sae active latents per token, yet the textbook step
(dense codes @ W_dec, autograd through the dense pre-activations) spends four B x d_sae x d_in
matmuls on zeros. Here only the encoder's forward matmul is dense (every pre-activation is
needed to choose the active set); the decoder is an embedding_bag over the active rows, and the
encoder's backward is a sparse [d_sae, B] x [B, d_in] product. This is the approach of
EleutherAI/sparsify's fused encoder; `test_sparse_step_equals_dense_autograd_step` in
`tests/test_train.py` checks it against the dense autograd step (same losses, same weights).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sae_ortho.base.device import on_host
from sae_ortho.training import kernels


@dataclass
class ActiveCodes:
    """The codes of a batch as CSR: token b's active latents are cols[offsets[b]:offsets[b+1]]."""

    rows: torch.Tensor  # [nnz] int64 token of each entry
    cols: torch.Tensor  # [nnz] int64 latent of each entry
    offsets: torch.Tensor  # [batch + 1] int64
    values: torch.Tensor  # [nnz] float32, differentiable

    @property
    def batch(self) -> int:
        return len(self.offsets) - 1

    def dense(self, d_sae: int) -> torch.Tensor:
        out = self.values.new_zeros(self.batch, d_sae)
        return out.index_put_((self.rows, self.cols), self.values)


def topk_pattern(pre: torch.Tensor, k: int, allowed: torch.Tensor | None = None):
    """(rows, cols, offsets) of each row's k largest pre-activations (among `allowed` latents), each row's
    columns ascending. CPU: the numba row kernel (ties: earliest column); other devices: torch.topk, whose
    choice among exactly tied scores is unspecified."""
    device = pre.device
    with torch.no_grad():
        scores = pre if allowed is None else pre.masked_fill(~allowed, float("-inf"))
        if on_host(device):
            out = np.empty((len(pre), k), dtype=np.int64)
            kernels.topk_rows(scores.contiguous().numpy(), k, out)
            cols = torch.from_numpy(out).reshape(-1)
        else:
            cols = torch.topk(scores, k, dim=1, sorted=False).indices.sort(dim=1).values.reshape(-1)
    batch = len(pre)
    rows = torch.arange(batch, device=device).repeat_interleave(k)
    return rows, cols, torch.arange(0, batch * k + 1, k, device=device)


def batch_topk_pattern(pre: torch.Tensor, k: int):
    """(rows, cols, offsets) of the batch's k * B largest pre-activations (BatchTopK), row-major."""
    with torch.no_grad():
        flat = torch.topk(pre.reshape(-1), k * len(pre), sorted=False).indices.sort().values
        rows, cols = flat // pre.shape[1], flat % pre.shape[1]
        offsets = torch.zeros(len(pre) + 1, dtype=torch.long, device=pre.device)
        offsets[1:] = torch.bincount(rows, minlength=len(pre)).cumsum(0)
    return rows, cols, offsets


def positive_pattern(pre: torch.Tensor):
    """(rows, cols, offsets) of the positive pre-activations (the ReLU's active set), row-major."""
    with torch.no_grad():
        rows, cols = (pre > 0).nonzero(as_tuple=True)
        offsets = torch.zeros(len(pre) + 1, dtype=torch.long, device=pre.device)
        offsets[1:] = torch.bincount(rows, minlength=len(pre)).cumsum(0)
    return rows, cols, offsets


class _GatherPreActs(torch.autograd.Function):
    """pre[rows, cols] for pre = (x - b_dec) @ W_enc + b_enc, given pre already computed (no grad).

    Backward: dW_enc[:, c] = sum over entries (b, c) of g * (x_b - b_dec), a sparse [d_sae, B]
    matrix times the centred inputs; db_enc = per-latent sum of g; db_dec = -W_enc @ db_enc.
    """

    @staticmethod
    def forward(ctx, pre, x_centred, W_enc, b_enc, b_dec, rows, cols):
        ctx.save_for_backward(x_centred, W_enc, rows, cols)
        return pre[rows, cols]

    @staticmethod
    def backward(ctx, grad):
        x_centred, W_enc, rows, cols = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        order = torch.argsort(cols, stable=True)
        crow = torch.zeros(d_sae + 1, dtype=torch.long, device=cols.device)
        crow[1:] = torch.bincount(cols, minlength=d_sae).cumsum(0)
        g = grad.contiguous()
        with warnings.catch_warnings():
            # torch warns that sparse CSR is "beta" and that invariant checks are off; this CSR is
            # valid by construction (sorted by latent, in range) and checks would cost a pass.
            warnings.simplefilter("ignore", UserWarning)
            by_latent = torch.sparse_csr_tensor(crow, rows[order], g[order], (d_sae, len(x_centred)))
        grad_w_enc = (by_latent @ x_centred).T
        grad_b_enc = torch.zeros(d_sae, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        grad_b_dec = -(W_enc @ grad_b_enc)
        return None, None, grad_w_enc, grad_b_enc, grad_b_dec, None, None


def gather_pre_acts(pre, x_centred, W_enc, b_enc, b_dec, rows, cols) -> torch.Tensor:
    return _GatherPreActs.apply(pre, x_centred, W_enc, b_enc, b_dec, rows, cols)


class _DensePreActs(torch.autograd.Function):
    """All of pre = (x - b_dec) @ W_enc + b_enc, given pre already computed (no grad), so the dense
    step does not run the encoder matmul a second time. Backward as in _GatherPreActs, dense."""

    @staticmethod
    def forward(ctx, pre, x_centred, W_enc, b_enc, b_dec):
        ctx.save_for_backward(x_centred, W_enc)
        return pre.view_as(pre)

    @staticmethod
    def backward(ctx, grad):
        x_centred, W_enc = ctx.saved_tensors
        grad_b_enc = grad.sum(0)
        return None, None, x_centred.T @ grad, grad_b_enc, -(W_enc @ grad_b_enc)


def dense_pre_acts(pre, x_centred, W_enc, b_enc, b_dec) -> torch.Tensor:
    return _DensePreActs.apply(pre, x_centred, W_enc, b_enc, b_dec)


def decode_active(cols: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor):
    """sum over a token's active latents of value * W_dec row, without the bias. On CUDA, embedding_bag's
    backward and index_add_ accumulate with atomics: W_dec's and b_enc's gradients can differ in the last
    bit between runs there (CPU runs are bitwise reproducible)."""
    return F.embedding_bag(cols, W_dec, offsets[:-1], mode="sum", per_sample_weights=values)
