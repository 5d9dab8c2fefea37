"""Training over torchrun ranks: the global batch split by rows, gradients averaged by an explicit all-reduce,
the top-k co-activation pairs selected once on the global batch. Every function is the identity with one
process, so the single-process step is unchanged bit for bit.

Why not DDP: the trainer never calls the SAE's forward (the step is sparse_ops.py's path, and the penalty's
gradient is added to `W_dec.grad` in place after backward), so a DDP wrapper would never see the step. The
SAE has four parameters, so four all-reduces after backward do DDP's work; the penalty's gradient is then
added once, on every rank alike (it depends only on W_dec and the broadcast pairs, which all ranks share).

Every rank draws the same global batch (same source, same seed) and keeps its contiguous rows, so the ranks'
rows in rank order are the single process's batch. What is global: the losses' means (averaged gradients),
AuxK's normaliser, the dead-latent counters, BatchTopK's threshold, the kept pairs, the logged statistics.
What stays per rank: BatchTopK's k * B selection runs over the rank's rows (as in sparsify's and
dictionary_learning's DDP), so BatchTopK / Matryoshka runs differ from one process beyond float rounding.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist

from sae_ortho.base import dist
from sae_ortho.training.ortho import PairSelection
from sae_ortho.training.sparse_ops import ActiveCodes


def local_rows(x: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of the global batch."""
    world, rank = dist.world_size(), dist.rank()
    if world == 1:
        return x
    if len(x) % world:
        raise ValueError(f"train.batch_size ({len(x)}) must be a multiple of the process count ({world})")
    share = len(x) // world
    return x[rank * share : (rank + 1) * share]


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """A per-rank mean (over equal shares) as the global batch's mean; detached."""
    if not dist.active():
        return t
    return dist.all_reduce_sum(t.detach().clone()) / dist.world_size()


def min_over_ranks(value: float, device: torch.device) -> float:
    if not dist.active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
    return float(t.item())


def average_gradients(params) -> None:
    """Each gradient as the global batch's: the sum over ranks of per-rank means, over the rank count."""
    if not dist.active():
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce_sum(p.grad).div_(dist.world_size())


def fired_counts(fired: torch.Tensor) -> torch.Tensor:
    """How often each latent fired in the global batch (a float count vector, summed over ranks)."""
    return dist.all_reduce_sum(fired)


def global_fvu(err: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """sum ||err||^2 / sum ||x - mean||^2 over the global batch."""
    with torch.no_grad():
        if not dist.active():
            centered = xs - xs.mean(0)
            return (err**2).sum() / (centered**2).sum()
        n = torch.tensor([float(len(xs))], device=xs.device)
        total = dist.all_reduce_sum(torch.cat([xs.sum(0), n]))
        centred = xs - total[:-1] / total[-1]
        sums = dist.all_reduce_sum(torch.stack([(err**2).sum(), (centred**2).sum()]))
        return sums[0] / sums[1]


def gather_codes(codes: ActiveCodes) -> ActiveCodes | None:
    """The global batch's codes on rank 0 (rows in rank order, i.e. the global order), None elsewhere.
    TopK codes have the same size on every rank; ReLU codes do not, so sizes go first and the gathered
    tensors are padded to the largest."""
    world, device = dist.world_size(), codes.cols.device
    sizes = torch.zeros(world, dtype=torch.long, device=device)
    sizes[dist.rank()] = len(codes.cols)
    sizes = dist.all_reduce_sum(sizes)
    width = int(sizes.max())
    counts = codes.offsets.diff()
    packed = torch.zeros(2, width, dtype=torch.float64, device=device)
    packed[0, : len(codes.cols)] = codes.cols.double()  # latent ids < 2^53: exact in float64
    packed[1, : len(codes.cols)] = codes.values.detach().double()
    main = dist.is_main()
    rows_out = [torch.empty_like(counts) for _ in range(world)] if main else None
    packed_out = [torch.empty_like(packed) for _ in range(world)] if main else None
    tdist.gather(counts, rows_out, dst=0)
    tdist.gather(packed, packed_out, dst=0)
    if not main:
        return None
    cols = torch.cat([p[0, :n].long() for p, n in zip(packed_out, sizes.tolist(), strict=True)])
    values = torch.cat([p[1, :n].float() for p, n in zip(packed_out, sizes.tolist(), strict=True)])
    per_row = torch.cat(rows_out)
    offsets = torch.zeros(len(per_row) + 1, dtype=torch.long, device=device)
    offsets[1:] = per_row.cumsum(0)
    rows = torch.arange(len(per_row), device=device).repeat_interleave(per_row)
    return ActiveCodes(rows, cols, offsets, values)


def broadcast_pairs(pairs: PairSelection | None, device: torch.device) -> PairSelection:
    """Rank 0's selection on every rank."""
    size = torch.tensor([len(pairs) if pairs is not None else 0], dtype=torch.long, device=device)
    tdist.broadcast(size, src=0)
    k = int(size.item())
    if pairs is None:
        pairs = PairSelection(
            torch.empty(k, dtype=torch.long, device=device),
            torch.empty(k, dtype=torch.long, device=device),
            torch.empty(k, dtype=torch.float32, device=device),
        )
    for t in (pairs.i, pairs.j, pairs.score):
        tdist.broadcast(t, src=0)
    return pairs


MEANS = ("loss", "mse", "matryoshka", "l1", "auxk")  # per-row means: averaged over ranks' equal shares


def global_stats(raw: dict) -> dict:
    """A step's logged statistics over the global batch: means averaged, the active count summed (the rest,
    tau, the penalty's figures, the dead fraction, are the same on every rank)."""
    if not dist.active():
        return raw
    out = dict(raw)
    for key in MEANS:
        if key in out:
            out[key] = mean_over_ranks(out[key])
    out["l0"] = dist.all_reduce_sum(out["l0"].detach().clone())
    return out


def penalty_terms(penalty, w_dec: torch.Tensor, codes: ActiveCodes, d_sae: int):
    """The penalty's step terms. A selection that reads the codes (the top-k co-activation term) runs once,
    on rank 0 over the gathered global batch, and its pairs are broadcast; penalties that draw from their
    own seeded RNG draw the same on every rank."""
    if not (penalty.needs_codes and dist.active()):
        return penalty.terms(w_dec, codes, d_sae)
    everyone = gather_codes(codes)
    pairs = penalty.select(everyone, d_sae) if everyone is not None else None
    return penalty.terms_for(w_dec, broadcast_pairs(pairs, w_dec.device))


def broadcast_(t: torch.Tensor) -> torch.Tensor:
    """In place: rank 0's tensor on every rank."""
    if dist.active():
        tdist.broadcast(t, src=0)
    return t


def check_in_sync(module: torch.nn.Module) -> None:
    """Every rank holds rank 0's weights, bit for bit (the all-reduced gradients and the shared pairs keep them
    so); a rank that drifted would mean a collective the ranks did not all make. Raises on divergence."""
    if not dist.active():
        return
    import hashlib

    digest = hashlib.sha256(b"".join(t.detach().cpu().numpy().tobytes() for t in module.state_dict().values()))
    digests = dist.all_gather_objects(digest.hexdigest())
    if len(set(digests)) > 1:
        raise RuntimeError(f"ranks hold different weights after training: {digests}")
