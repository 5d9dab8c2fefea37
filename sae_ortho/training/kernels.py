"""Numba kernels for the orthogonality term's hot loops, kept apart from the readable code in ortho.py.

Why hand-written: the selection needs the top K entries of the strict upper triangle of F^T F for
a sparse F, and no library offers a sparse-sparse product fused with a top-K. scipy's SMMP
computes both triangles on one core and materialises every co-active pair (tens of millions for
heavy-tailed ReLU codes) before a separate partition; this kernel does the upper triangle only,
on all cores, and keeps a running per-thread top-K so the candidate list stays small.

Work is at most sum over tokens of L0_b (L0_b - 1) / 2 multiply-adds (Gustavson's row-wise SpGEMM
with a dense accumulator per latent row). Rows are visited in decreasing order of an upper bound
on their best score, so once the K-th best score seen exceeds a row's bound the remaining rows
are skipped; a first pass over the top 1/8 of rows sets a K-th best shared by all threads.
Results are exact: a skipped row or dropped candidate provably scores below K complete scores
already found. Ties at the K-th score go to the smallest (i, j), so the result does not depend on the
thread count or the order candidates arrive in.
"""

from __future__ import annotations

import numba as nb
import numpy as np


@nb.njit(parallel=True, cache=True)
def _positive_sorted_rows(indptr, cols, vals):
    """The CSR restricted to positive values, each row's columns ascending."""
    n_rows = len(indptr) - 1
    out_ptr = np.zeros(n_rows + 1, np.int64)
    for b in range(n_rows):
        n = 0
        for p in range(indptr[b], indptr[b + 1]):
            if vals[p] > 0:
                n += 1
        out_ptr[b + 1] = out_ptr[b] + n
    out_cols = np.empty(out_ptr[n_rows], np.int64)
    out_vals = np.empty(out_ptr[n_rows], np.float32)
    for b in nb.prange(n_rows):
        w = out_ptr[b]
        for p in range(indptr[b], indptr[b + 1]):
            if vals[p] > 0:
                out_cols[w], out_vals[w] = cols[p], vals[p]
                w += 1
        lo, hi = out_ptr[b], out_ptr[b + 1]
        order = np.argsort(out_cols[lo:hi])
        out_cols[lo:hi] = out_cols[lo:hi][order]
        out_vals[lo:hi] = out_vals[lo:hi][order]
    return out_ptr, out_cols, out_vals


@nb.njit(cache=True)
def _to_csc(indptr, cols, vals, d_sae):
    """Column-major copy: for each latent, its tokens (ascending), values, and the entry's position
    in the CSR (so a token's row can be scanned from just after it)."""
    n_rows = len(indptr) - 1
    colptr = np.zeros(d_sae + 1, np.int64)
    for p in range(len(cols)):
        colptr[cols[p] + 1] += 1
    for c in range(d_sae):
        colptr[c + 1] += colptr[c]
    fill = colptr[:-1].copy()
    tokens = np.empty(colptr[d_sae], np.int64)
    tvals = np.empty(colptr[d_sae], np.float64)
    tpos = np.empty(colptr[d_sae], np.int64)
    for b in range(n_rows):
        for p in range(indptr[b], indptr[b + 1]):
            q = fill[cols[p]]
            tokens[q], tvals[q], tpos[q] = b, vals[p], p
            fill[cols[p]] += 1
    return colptr, tokens, tvals, tpos


@nb.njit(cache=True)
def _keep_top(out_i, out_j, out_s, n, budget):
    """Compact the first n candidates to the `budget` best in place; return (budget, K-th score).

    Best = score descending, then (i, j) ascending: a total order, so whichever part or thread a
    candidate arrived in, the kept set is the same (pairs_torch.py uses the same order)."""
    kth = np.partition(out_s[:n].copy(), n - budget)[n - budget]
    above = 0
    n_tied = 0
    for p in range(n):
        if out_s[p] > kth:
            above += 1
        elif out_s[p] == kth:
            n_tied += 1
    # Of the candidates tied at the K-th score, the ones with the smallest (i, j) stay.
    tied_key = np.empty(n_tied, np.int64)
    t = 0
    d = out_j[:n].max() + 1
    for p in range(n):
        if out_s[p] == kth:
            tied_key[t] = out_i[p] * d + out_j[p]
            t += 1
    tied_key.sort()
    last_kept = tied_key[budget - above - 1] if budget > above else -1
    w = 0
    for p in range(n):
        s = out_s[p]
        if s > kth or (s == kth and out_i[p] * d + out_j[p] <= last_kept):
            out_i[w], out_j[w], out_s[w] = out_i[p], out_j[p], s
            w += 1
    return w, kth


@nb.njit(parallel=True, cache=True)
def _row_bounds(indptr, vals, colptr, tokens, tvals, tpos, d_sae):
    """U_i >= max_{j > i} C_ij: sum over i's tokens of f_bi times the largest f_bj after i in b's row."""
    suffix_max = np.zeros(len(vals), np.float64)
    for b in nb.prange(len(indptr) - 1):
        m = 0.0
        for p in range(indptr[b + 1] - 1, indptr[b] - 1, -1):
            suffix_max[p] = m
            if vals[p] > m:
                m = vals[p]
    bound = np.zeros(d_sae, np.float64)
    for i in nb.prange(d_sae):
        u = 0.0
        for q in range(colptr[i], colptr[i + 1]):
            u += tvals[q] * suffix_max[tpos[q]]
        bound[i] = u
    return bound


@nb.njit(parallel=True, cache=True)
def _top_pairs_parts(indptr, cols, vals, colptr, tokens, tvals, tpos, d_sae, budget, n_parts, order, bound, floor0):
    cap = 2 * budget + d_sae  # one latent row adds at most d_sae candidates before a prune
    out_i = np.empty((n_parts, cap), np.int64)
    out_j = np.empty((n_parts, cap), np.int64)
    out_s = np.empty((n_parts, cap), np.float64)
    counts = np.zeros(n_parts, np.int64)
    # Each part's K-th best complete score is a lower bound on the global K-th best; parts read
    # each other's (a stale read is only a weaker bound, so results stay exact).
    floors = np.full(n_parts, floor0)
    for part in nb.prange(n_parts):
        acc = np.zeros(d_sae, np.float64)
        touched = np.empty(d_sae, np.int64)
        n = 0
        # Rows in decreasing order of their bound, interleaved across parts: the floor rises fast,
        # and once a row's bound is below it no later row of this part can hold a top pair.
        for r in range(part, len(order), n_parts):
            i = order[r]
            floor = floors.max()
            if bound[i] < floor:  # a row bounded exactly at the floor may still hold a tie that wins on (i, j)
                break
            n_touched = 0
            for q in range(colptr[i], colptr[i + 1]):
                b, a = tokens[q], tvals[q]
                for p in range(tpos[q] + 1, indptr[b + 1]):  # rows are sorted: exactly the j > i
                    j = cols[p]
                    if acc[j] == 0.0:  # products of positive codes are > 0
                        touched[n_touched] = j
                        n_touched += 1
                    acc[j] += a * vals[p]
            for m in range(n_touched):
                j = touched[m]
                s = acc[j]
                acc[j] = 0.0
                if s >= floor:
                    out_i[part, n], out_j[part, n], out_s[part, n] = i, j, s
                    n += 1
            if n >= 2 * budget:
                n, kth = _keep_top(out_i[part], out_j[part], out_s[part], n, budget)
                floors[part] = max(floors[part], kth)
        counts[part] = n
    return out_i, out_j, out_s, counts


def top_coactive_pairs(
    indptr: np.ndarray, cols: np.ndarray, vals: np.ndarray, d_sae: int, budget: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The `budget` pairs i < j with the largest C_ij = sum_b f_bi f_bj > 0, sorted by (i, j).
    F is given as CSR (indptr, cols, vals) with nonnegative values; zeros are skipped."""
    indptr, cols, vals = _positive_sorted_rows(
        np.ascontiguousarray(indptr, np.int64),
        np.ascontiguousarray(cols, np.int64),
        np.ascontiguousarray(vals, np.float32),
    )
    colptr, tokens, tvals, tpos = _to_csc(indptr, cols, vals, d_sae)
    bound = _row_bounds(indptr, vals, colptr, tokens, tvals, tpos, d_sae)
    order = np.argsort(-bound, kind="stable")
    order = order[: int((bound > 0).sum())]
    n_parts = nb.get_num_threads()
    args = (indptr, cols, vals, colptr, tokens, tvals, tpos, d_sae, budget, n_parts)
    # Two phases: the rows with the highest bounds first, merged across threads into one K-th best
    # score, which then floors every thread in the second phase (a thread's own K-th best is lower).
    first = min(len(order), max(256, len(order) // 8))
    no_ids, no_scores = np.empty(0, np.int64), np.empty(0, np.float64)
    phase1 = _top_pairs_parts(*args, order[:first], bound, 0.0)
    i, j, s = _merge_parts(no_ids, no_ids, no_scores, *phase1, budget)
    floor = float(s.min()) if len(s) == budget else 0.0
    phase2 = _top_pairs_parts(*args, order[first:], bound, floor)
    return _by_pair(*_merge_parts(i, j, s, *phase2, budget), d_sae)


@nb.njit(parallel=True, cache=True)
def _by_pair(i, j, s, d_sae):
    """The pairs sorted by (i, j). The merge leaves them in an order set by the thread count (one part per
    thread), and the penalty's gradient adds each row's terms in the pairs' order: without this, 1 and 2
    threads kept the same pairs and trained other bits. A counting sort by i, then each i's few j sorted."""
    n = len(i)
    start = np.zeros(d_sae + 1, np.int64)
    for p in range(n):
        start[i[p] + 1] += 1
    for r in range(d_sae):
        start[r + 1] += start[r]
    fill = start[:-1].copy()
    out_i, out_j, out_s = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.float64)
    for p in range(n):
        q = fill[i[p]]
        out_j[q], out_s[q] = j[p], s[p]
        fill[i[p]] += 1
    for r in nb.prange(d_sae):
        a, b = start[r], start[r + 1]
        out_i[a:b] = r
        if b - a > 1:
            idx = np.argsort(out_j[a:b])  # the j of one i are distinct: any sort gives one order
            out_j[a:b] = out_j[a:b][idx]
            out_s[a:b] = out_s[a:b][idx]
    return out_i, out_j, out_s


@nb.njit(cache=True)
def _merge_parts(seed_i, seed_j, seed_s, out_i, out_j, out_s, counts, budget):
    """The parts' candidates, cut to the `budget` best, in an order set by the parts (`_by_pair` then orders
    them in linear time: a comparison sort of 10^5 pairs every step would cost a quarter of the selection)."""
    total = len(seed_s) + counts.sum()
    i, j, s = np.empty(total, np.int64), np.empty(total, np.int64), np.empty(total, np.float64)
    i[: len(seed_s)], j[: len(seed_s)], s[: len(seed_s)] = seed_i, seed_j, seed_s
    w = len(seed_s)
    for part in range(len(counts)):
        for p in range(counts[part]):
            i[w], j[w], s[w] = out_i[part, p], out_j[part, p], out_s[part, p]
            w += 1
    if total > budget:
        total, _ = _keep_top(i, j, s, total, budget)
    return i[:total], j[:total], s[:total]


LANES = 8  # pair_dots' fixed accumulator count: the summation order is the code's, not the vector unit's


@nb.njit(parallel=True, cache=True)
def pair_dots(w, i, j):
    """w_i . w_j for each pair, summed in one fixed order on every machine.

    No fastmath: with it LLVM reassociates the sum to the host's vector width (16 float32 lanes with
    AVX-512, 8 with AVX2), so the same pairs gave other cosines, hence other weights, on another CPU.
    Eight explicit partial sums keep the loop as fast as the vectorised one and the order fixed."""
    out = np.empty(len(i), np.float32)
    d = w.shape[1]
    body = d - d % LANES
    for p in nb.prange(len(i)):
        a, b = w[i[p]], w[j[p]]
        s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)  # a per-pair array costs an allocation
        for x in range(0, body, LANES):
            s0 += a[x] * b[x]
            s1 += a[x + 1] * b[x + 1]
            s2 += a[x + 2] * b[x + 2]
            s3 += a[x + 3] * b[x + 3]
            s4 += a[x + 4] * b[x + 4]
            s5 += a[x + 5] * b[x + 5]
            s6 += a[x + 6] * b[x + 6]
            s7 += a[x + 7] * b[x + 7]
        for x in range(body, d):
            s0 += a[x] * b[x]
        out[p] = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
    return out


@nb.njit(parallel=True, cache=True)
def add_pair_grad(grad, w, i, j, coef):
    """grad += S @ w with S the symmetric sparse matrix S_ij = S_ji = coef_p: row r gains the sum
    over r's pairs of coef * w_partner. Rows are independent, so they run in parallel; adding in
    place saves allocating and summing a second d_sae x d_in gradient. Each row's terms are added in
    the pairs' order whatever the thread count; no fastmath, so no fused multiply-add on one CPU and
    not on another."""
    d_sae, d = w.shape
    start = np.zeros(d_sae + 1, np.int64)
    for p in range(len(i)):
        start[i[p] + 1] += 1
        start[j[p] + 1] += 1
    for r in range(d_sae):
        start[r + 1] += start[r]
    fill = start[:-1].copy()
    partner = np.empty(2 * len(i), np.int64)
    weight = np.empty(2 * len(i), np.float32)
    for p in range(len(i)):
        a, b = i[p], j[p]
        partner[fill[a]], weight[fill[a]] = b, coef[p]
        fill[a] += 1
        partner[fill[b]], weight[fill[b]] = a, coef[p]
        fill[b] += 1
    for r in nb.prange(d_sae):
        for q in range(start[r], start[r + 1]):
            c, s = partner[q], weight[q]
            for x in range(d):
                grad[r, x] += s * w[c, x]


@nb.njit(parallel=True, cache=True)
def topk_rows(scores, k, out):
    """out[r] = the column indices of row r's k largest scores, ascending (TopK's active set).

    torch.topk costs ~10 ns per element on one core at 1024 x 200 (a fifth of a synthetic run's step);
    a running minimum over the row rejects most elements with one comparison. Rows are independent, so
    the result does not depend on the thread count; among tied scores the earliest column is kept."""
    n_rows, n_cols = scores.shape
    scratch = np.empty((n_rows, k), scores.dtype)  # one allocation: a per-row one costs as much as the row
    for r in nb.prange(n_rows):
        vals, idx = scratch[r], out[r]
        for j in range(k):
            vals[j], idx[j] = scores[r, j], j
        low = 0
        for j in range(1, k):
            if vals[j] < vals[low]:
                low = j
        for c in range(k, n_cols):
            v = scores[r, c]
            if v > vals[low]:
                vals[low], idx[low] = v, c
                low = 0
                for j in range(1, k):
                    if vals[j] < vals[low] or (vals[j] == vals[low] and idx[j] > idx[low]):
                        low = j
        for a in range(1, k):  # insertion sort of k indices
            t, b = idx[a], a - 1
            while b >= 0 and idx[b] > t:
                idx[b + 1] = idx[b]
                b -= 1
            idx[b + 1] = t
