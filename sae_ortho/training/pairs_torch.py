"""The orthogonality term's three hot loops in plain torch, for any device (kernels.py is CPU-only numba).

Selection: the `budget` pairs i < j with the largest C_ij = sum_b f_bi f_bj > 0, never forming a
d_sae x d_sae matrix. Each token's active latents, sorted by index, give its co-active pairs (i, j)
with i < j; a pair's key is i * d_sae + j, so sorting keys groups a pair's products and orders pairs
by (i, j). Products are summed in float64 per key in token order, then the running top-K keeps the
best `budget`. Latents are visited in ranges of i whose pair count fits `chunk_pairs`, so memory is
O(budget + chunk_pairs) whatever the batch. Order of the result: score descending, then i, then j
(the tie order both selectors share); a pair tied with the K-th score is kept by that order.

Determinism: the selection sums each pair's products in token order (segment_reduce over a stably sorted
key), so on CPU its pairs and scores do not depend on the thread count (tested); on CUDA it is untested
here (no GPU), and the CUDA test compares it with the CPU result. The pair
gradient's `index_add_` uses atomics on CUDA: its float32 sums can differ in the last bit between runs
there (on CPU it is deterministic).
"""

from __future__ import annotations

import torch


def _sorted_positive_rows(offsets: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, d_sae: int):
    """Token ids, columns and values of the positive entries, each token's columns ascending."""
    n_tokens = offsets.numel() - 1
    token = torch.repeat_interleave(torch.arange(n_tokens, device=cols.device), offsets.diff())
    keep = vals > 0
    token, cols, vals = token[keep], cols[keep], vals[keep]
    order = torch.sort(token * d_sae + cols).indices  # keys are unique: no stability needed
    return token[order], cols[order], vals[order]


def _pair_entries(cols, vals, n_partners, first: torch.Tensor):
    """(i, j, f_bi f_bj in float64) for every pair whose first entry is at a position in `first`
    (ascending), pairs in token order: an entry's partners are the next n_partners entries of its token."""
    counts = n_partners[first]
    anchor = torch.repeat_interleave(first, counts)
    start = torch.cumsum(counts, 0) - counts
    step = torch.arange(anchor.numel(), device=cols.device) - torch.repeat_interleave(start, counts)
    partner = anchor + 1 + step
    return cols[anchor], cols[partner], vals[anchor].double() * vals[partner].double()


def _top_k(key: torch.Tensor, score: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `budget` best by (score descending, key ascending); key must already be ascending."""
    order = torch.sort(-score, stable=True).indices[:budget]
    return key[order], score[order]


def top_coactive_pairs(
    offsets: torch.Tensor,
    cols: torch.Tensor,
    vals: torch.Tensor,
    d_sae: int,
    budget: int,
    chunk_pairs: int = 1 << 22,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(i, j, score float64) of the `budget` best co-active pairs of the CSR codes (token b's latents are
    cols[offsets[b]:offsets[b+1]], nonpositive values inactive), ranked as the module docstring says."""
    device = cols.device
    token, cols, vals = _sorted_positive_rows(offsets.to(device), cols.long(), vals.detach(), d_sae)
    empty = torch.empty(0, dtype=torch.long, device=device)
    if token.numel() == 0:
        return empty, empty, torch.empty(0, dtype=torch.float64, device=device)
    ends = torch.searchsorted(token, token, right=True)
    n_partners = ends - torch.arange(token.numel(), device=device) - 1
    # Pairs per first latent i, then contiguous ranges of i holding at most chunk_pairs pairs each
    # (one latent with more pairs than that is a range of its own).
    per_latent = torch.zeros(d_sae, dtype=torch.long, device=device).index_add_(0, cols, n_partners)
    cum = torch.cumsum(per_latent, 0).cpu()
    bounds, lo = [], 0
    while lo < d_sae:
        base = int(cum[lo - 1]) if lo else 0
        hi = int(torch.searchsorted(cum, base + chunk_pairs, right=True))
        hi = max(hi, lo + 1)
        bounds.append((lo, min(hi, d_sae)))
        lo = hi
    best_key = empty
    best_score = torch.empty(0, dtype=torch.float64, device=device)
    for lo, hi in bounds:
        if int(cum[hi - 1]) == (int(cum[lo - 1]) if lo else 0):
            continue
        first = torch.nonzero((cols >= lo) & (cols < hi) & (n_partners > 0)).squeeze(1)
        i, j, product = _pair_entries(cols, vals, n_partners, first)
        key = i * d_sae + j
        key, order = torch.sort(key, stable=True)  # stable: a key's products stay in token order
        uniq, counts = torch.unique_consecutive(key, return_counts=True)
        score = torch.segment_reduce(product[order], "sum", lengths=counts)
        # Candidates: the running best (all keys below this range) then this range's, so keys ascend.
        best_key, best_score = _top_k(torch.cat([best_key, uniq]), torch.cat([best_score, score]), budget)
        resort = torch.sort(best_key).indices
        best_key, best_score = best_key[resort], best_score[resort]
    best_key, best_score = _top_k(best_key, best_score, budget)
    return best_key // d_sae, best_key % d_sae, best_score


def pair_dots(w: torch.Tensor, i: torch.Tensor, j: torch.Tensor, chunk: int = 1 << 14) -> torch.Tensor:
    """w_i . w_j for each pair, gathering at most `chunk` rows at a time (never [K, d_in] at once)."""
    out = torch.empty(i.numel(), dtype=w.dtype, device=w.device)
    for s in range(0, i.numel(), chunk):
        out[s : s + chunk] = (w[i[s : s + chunk]] * w[j[s : s + chunk]]).sum(1)
    return out


def add_pair_grad_(
    grad: torch.Tensor, w: torch.Tensor, i: torch.Tensor, j: torch.Tensor, coef: torch.Tensor, chunk: int = 1 << 14
) -> None:
    """grad += S @ w in place, S symmetric sparse with S_ij = S_ji = coef_p (kernels.add_pair_grad in torch)."""
    coef = coef.to(w.dtype)
    for s in range(0, i.numel(), chunk):
        a, b, c = i[s : s + chunk], j[s : s + chunk], coef[s : s + chunk, None]
        grad.index_add_(0, a, c * w[b])
        grad.index_add_(0, b, c * w[a])
