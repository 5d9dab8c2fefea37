"""Stage `extract`: run the model up to the hooked layer and store activations as shards.

Contexts are `context_len` tokens: BOS followed by `context_len - 1` tokens of the document
stream (documents concatenated, each followed by EOS). BOS activations are dropped, so every
stored activation is a real text position; `n_tokens` counts stored activations.

Resumable: shards are built in `data/activations.partial/` and each completed shard is
recorded in its rank's `progress.r<rank>.json`; a rerun with the same fingerprint (params + corpus hash)
continues after the last complete shard. Each shard is computed in its own batches, so a
resumed run writes bit-identical shards. The finished directory is renamed to
`data/activations/` in one step, so DVC never caches a half-written output.

With `train.source: stream` the shard files are not written: the model still runs over every context (the
manifest's norm statistics, per-shard sha256 and activation sum come from the computed shards), and the
directory keeps the manifest and the token index only; training recomputes the shards from the LM.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from sae_ortho.base import device, dist
from sae_ortho.base import params as params_mod
from sae_ortho.base.device import HOST, to_device
from sae_ortho.base.io import atomic_file, atomic_write_text, sha256_file
from sae_ortho.base.paths import CORPUS
from sae_ortho.data.shards import DTYPES, ShardInfo, write_manifest, write_shard

OUT_DIR = Path("data/activations")
PARTIAL_DIR = Path("data/activations.partial")
METRICS = Path("metrics/extract.json")
TOKENS, DOC_IDS = "tokens.npy", "doc_ids.npy"  # the run's token stream, in the partial directory


def document_tokens(
    corpus: Path, tokenizer, first_doc: int = 0, batch_rows: int = 256
) -> Iterator[tuple[int, list[int]]]:
    """(doc_id, token ids + EOS) for each document with doc_id >= first_doc, streamed from the
    Parquet corpus; earlier documents are skipped before tokenising."""
    eos = tokenizer.eos_token_id
    for batch in pq.ParquetFile(corpus).iter_batches(batch_size=batch_rows, columns=["doc_id", "text"]):
        columns = zip(batch.column("doc_id").to_pylist(), batch.column("text").to_pylist(), strict=True)
        rows = [(d, t) for d, t in columns if d >= first_doc]
        if not rows:
            continue
        encoded = tokenizer([t for _, t in rows], add_special_tokens=False)["input_ids"]
        for (doc_id, _), ids in zip(rows, encoded, strict=True):
            yield doc_id, [*ids, eos]


def fill_stream(docs: Iterator[tuple[int, list[int]]], token_ids: np.ndarray, doc_ids: np.ndarray) -> int:
    """Concatenate the documents' tokens into the flat arrays until they are full; return how many
    tokens were filled (less than their length when the documents run out)."""
    n, filled = len(token_ids), 0
    for doc_id, ids in docs:
        take = min(len(ids), n - filled)
        token_ids[filled : filled + take] = ids[:take]
        doc_ids[filled : filled + take] = doc_id
        filled += take
        if filled == n:
            break
    return filled


def tokenise(corpus: Path, tokenizer, body_len: int, n_contexts: int, directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """(token_ids, doc_ids), each [n_contexts, body_len]: the first contexts of the document stream.

    Tokenised once, before the model runs, into memory-mapped .npy files in `directory` (memory
    stays flat in n_tokens). Raises ValueError if the corpus is too short.
    """
    n = n_contexts * body_len
    token_ids = np.lib.format.open_memmap(directory / TOKENS, mode="w+", dtype=np.int32, shape=(n,))
    doc_ids = np.lib.format.open_memmap(directory / DOC_IDS, mode="w+", dtype=np.int64, shape=(n,))
    filled = fill_stream(document_tokens(corpus, tokenizer), token_ids, doc_ids)
    token_ids.flush(), doc_ids.flush()  # other ranks open the files once rank 0 returns
    if filled == n:
        return token_ids.reshape(n_contexts, body_len), doc_ids.reshape(n_contexts, body_len)
    raise ValueError(
        f"extract.n_tokens: corpus {corpus} gives only {filled // body_len * body_len} tokens "
        f"({filled // body_len} contexts of {body_len}); lower n_tokens to at most that"
    )


def fingerprint(p: params_mod.Params, corpus_sha: str) -> str:
    blob = json.dumps(
        {
            "model": p.model,
            "hook": p.hook_name,
            "extract": asdict(p.extract),
            "corpus": corpus_sha,
            "lm_dtype": p.lm_dtype,
            **({"index_only": True} if p.train.source == "stream" else {}),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def progress_file(rank: int) -> str:
    return f"progress.r{rank}.json"  # one per rank: ranks never write the same file


def load_progress(partial: Path, fp: str, store: bool = True) -> dict[int, ShardInfo]:
    """Shard index -> completed shard of an interrupted run with the same fingerprint, whichever rank (and
    however many ranks) wrote it; otherwise start clean. Call on rank 0 only, before the others read."""
    done: dict[int, ShardInfo] = {}
    for progress in sorted(partial.glob("progress.r*.json")) if partial.exists() else []:
        state = json.loads(progress.read_text())
        if state["fingerprint"] != fp:
            done = {}
            break
        for s in map(lambda d: ShardInfo(**d), state["shards"]):
            if _intact(partial, s, store):
                done[shard_number(s)] = s
            else:  # computed again; read_progress skips a recorded shard whose files are gone
                for name in (s.file, s.index_file, sum_file(shard_number(s))):
                    (partial / name).unlink(missing_ok=True)
    if not done and partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    return done


def _intact(partial: Path, s: ShardInfo, store: bool) -> bool:
    """A recorded shard is kept on resume only if its files are there and hash as recorded; one whose bytes
    changed since (a bad disk, a stray write) is computed again rather than carried into the output."""
    if not (partial / s.index_file).exists() or sha256_file(partial / s.index_file) != s.index_sha256:
        return False
    if store:
        return (partial / s.file).exists() and sha256_file(partial / s.file) == s.sha256
    return (partial / sum_file(shard_number(s))).exists()


def read_progress(partial: Path) -> dict[int, ShardInfo]:
    """What every rank has recorded (rank 0 checked the fingerprint before the others start)."""
    infos = [ShardInfo(**d) for f in partial.glob("progress.r*.json") for d in json.loads(f.read_text())["shards"]]
    return {shard_number(s): s for s in infos if (partial / s.index_file).exists()}


def shard_number(info: ShardInfo) -> int:
    return int(info.file.removeprefix("shard_").removesuffix(".safetensors"))


def sum_file(shard_idx: int) -> str:
    return f"sum_{shard_idx:05d}.npy"  # index-only extraction: the shard's float64 activation sum


def write_sum(partial: Path, shard_idx: int, activations: torch.Tensor) -> None:
    with atomic_file(partial / sum_file(shard_idx)) as tmp, open(tmp, "wb") as f:
        np.save(f, activations.double().sum(0).numpy())


def capture_fn(model, hook_name: str, stop_at_layer: int):
    """A function tokens -> activations at `hook_name`, running the model only up to the hook."""
    store: dict[str, torch.Tensor] = {}

    def save(act: torch.Tensor, hook) -> None:
        store["act"] = act

    def run(tokens: torch.Tensor) -> torch.Tensor:
        model.run_with_hooks(tokens, stop_at_layer=stop_at_layer, fwd_hooks=[(hook_name, save)])
        return store.pop("act")

    return run


def shard_activations(
    run, token_ids: np.ndarray, bos: int, batch_size: int, dtype: torch.dtype, lm_device, on_batch=None
) -> torch.Tensor:
    """[contexts * body_len, d_model] activations of one shard's contexts (BOS prepended, its position
    dropped), on the host in the stored dtype. Batches restart at every shard, so a shard is the same
    function of its contexts whether extraction writes it, resumes it or training streams it."""
    acts = []
    for b in range(0, len(token_ids), batch_size):
        body = torch.from_numpy(token_ids[b : b + batch_size]).long()
        batch = to_device(torch.cat([torch.full((body.shape[0], 1), bos), body], dim=1), lm_device)
        out = run(batch)[:, 1:]
        acts.append(out.to(dtype).reshape(-1, out.shape[-1]).to(HOST))
        if on_batch is not None:
            on_batch(body.numel())
    return torch.cat(acts)


def shard_layout(ex) -> tuple[int, int, int, int]:
    """(body_len, n_contexts, contexts per shard, n_shards) of an extraction with params `ex`."""
    body_len = ex.context_len - 1
    n_contexts = math.ceil(ex.n_tokens / body_len)
    per_shard = max(1, ex.shard_tokens // body_len)
    return body_len, n_contexts, per_shard, math.ceil(n_contexts / per_shard)


def extract(
    p: params_mod.Params,
    model,
    corpus: Path = CORPUS,
    out_dir: Path = OUT_DIR,
    partial: Path = PARTIAL_DIR,
    progress_bar: bool = True,
) -> dict:
    """Write the activation directory; return the extraction metrics."""
    ex = p.extract
    body_len, n_contexts, per_shard, n_shards = shard_layout(ex)
    tokenizer = model.tokenizer
    bos = tokenizer.bos_token_id
    if bos is None:
        raise ValueError(f"model {p.model} has no BOS token; extraction prepends BOS to every context")

    store = p.train.source == "shards"
    fp = fingerprint(p, sha256_file(corpus))
    rank, world = dist.rank(), dist.world_size()
    failure = None
    if dist.is_main():  # rank 0 checks the partial directory and tokenises; the others read its files
        done = load_progress(partial, fp, store)
        try:
            tokenise(corpus, tokenizer, body_len, n_contexts, partial)
        except ValueError as err:
            shutil.rmtree(partial)
            failure = str(err)
    failure = dist.broadcast_object(failure)
    if failure:
        raise ValueError(failure)
    dist.barrier()
    done = read_progress(partial)
    all_token_ids = np.load(partial / TOKENS, mmap_mode="r").reshape(n_contexts, body_len)
    all_doc_ids = np.load(partial / DOC_IDS, mmap_mode="r").reshape(n_contexts, body_len)
    start_context = sum(s.n_contexts for s in done.values())
    if done and dist.is_main():
        print(f"resuming after {len(done)} complete shards ({start_context} contexts)", file=sys.stderr)
    # Shards go to ranks round-robin; each is computed in its own batches, so the result is the same for
    # any number of ranks (and for a resume that changed it).
    mine = [i for i in range(n_shards) if i % world == rank and i not in done]

    run = capture_fn(model, p.hook_name, stop_at_layer=p.layer + 1)
    dtype = DTYPES[ex.dtype]
    t0 = time.perf_counter()
    tokens_this_run = 0
    writer = ThreadPoolExecutor(max_workers=1)  # overlap hashing/writing with the next forward pass
    pending: Future | None = None
    recorded: list[ShardInfo] = [s for i, s in sorted(done.items()) if i % world == rank]

    def record(info: ShardInfo) -> None:
        recorded.append(info)
        state = {"fingerprint": fp, "shards": [asdict(s) for s in recorded]}
        atomic_write_text(partial / progress_file(rank), json.dumps(state))

    def write(shard_idx: int, activations: torch.Tensor, index: dict, first: int, count: int) -> ShardInfo:
        if not store:  # before the shard is recorded: a recorded shard always has its sum
            write_sum(partial, shard_idx, activations)
        return write_shard(partial, shard_idx, activations, index, first, count, store)

    bar = tqdm(total=len(mine) * per_shard * body_len, unit="tok", disable=not (progress_bar and dist.is_main()))
    with torch.inference_mode():
        for shard_idx in mine:
            first = shard_idx * per_shard
            count = min(per_shard, n_contexts - first)
            token_ids = np.array(all_token_ids[first : first + count])
            activations = shard_activations(run, token_ids, bos, ex.batch_size, dtype, model.cfg.device, bar.update)
            index = {
                "context_id": np.repeat(np.arange(first, first + count, dtype=np.int64), body_len),
                "position": np.tile(np.arange(1, ex.context_len, dtype=np.int16), count),
                "doc_id": np.array(all_doc_ids[first : first + count]).reshape(-1),
                "token_id": token_ids.reshape(-1),
            }
            if pending is not None:
                record(pending.result())
            pending = writer.submit(write, shard_idx, activations, index, first, count)
            tokens_this_run += activations.shape[0]
        if pending is not None:
            record(pending.result())
    writer.shutdown()
    bar.close()
    elapsed = time.perf_counter() - t0
    tokens_this_run = int(dist.all_reduce_sum(torch.tensor([tokens_this_run], dtype=torch.long)).item())
    dist.barrier()  # every rank's shards are on disk and recorded
    if not dist.is_main():
        del all_token_ids, all_doc_ids
        dist.barrier()  # rank 0 publishes
        return {}
    done = read_progress(partial)
    assert sorted(done) == list(range(n_shards)), f"shards missing after extraction: {set(range(n_shards)) - set(done)}"

    meta = {
        "model": p.model,
        "hook_name": p.hook_name,
        "layer": p.layer,
        "d_in": model.cfg.d_model,
        "dtype": ex.dtype,
        "context_len": ex.context_len,
        "bos_policy": "excluded: BOS is prepended to every context and its activation is not stored",
        "fingerprint": fp,
        **device.record(p.torch_device, p.torch_lm_dtype),
    }
    if not store:  # summed in shard order, as ActivationShards.activation_sum sums stored shards
        total = torch.zeros(model.cfg.d_model, dtype=torch.float64)
        for i in range(n_shards):
            total += torch.from_numpy(np.load(partial / sum_file(i)))
        meta |= {"stored": False, "activation_sum": total.tolist()}
    manifest = write_manifest(partial, meta, [done[i] for i in range(n_shards)])
    del all_token_ids, all_doc_ids
    for f in [*partial.glob("progress.r*.json"), *partial.glob("sum_*.npy"), partial / TOKENS, partial / DOC_IDS]:
        f.unlink()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)
    dist.barrier()
    return {
        "tokens": manifest["n_tokens"],
        "contexts": manifest["n_contexts"],
        "shards": manifest["n_shards"],
        "bytes": manifest["bytes"],
        "tokens_this_run": tokens_this_run,
        "seconds": round(elapsed, 2),
        "tokens_per_s": round(tokens_this_run / elapsed, 1) if tokens_this_run else None,
        "resumed_from_context": start_context,
        "norm_mean": round(manifest["norm"]["mean"], 4),
    }
