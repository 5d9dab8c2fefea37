"""SAELens's CacheActivationsRunner on the in-memory model, for bench/extract.py's side-by-side
comparison: SAELens 6.x has no model override, so its `load_model` is patched to return ours and the
token rows come as an override dataset (background.md section 5)."""

from __future__ import annotations

import shutil
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

import torch

from sae_ortho.base.device import HOST

# The extraction settings both runners share (bench/extract.py imports them from here).
CONTEXT_LEN = 128
BATCH_SIZE = 16


def saelens_config(hook_name: str, d_in: int, n_contexts: int, out_dir: Path):
    """A CacheActivationsRunnerConfig that caches exactly `n_contexts` rows in one buffer, fp16, without BOS."""
    from sae_lens import CacheActivationsRunnerConfig

    stored_tokens = n_contexts * (CONTEXT_LEN - 1)
    bytes_per_token = d_in * 2  # float16
    cfg = CacheActivationsRunnerConfig(
        dataset_path="in-memory-rows",  # only used for logging: the rows come from override_dataset
        model_name="smollm2-135m",  # only passed to load_model, which is patched
        model_batch_size=BATCH_SIZE,
        hook_name=hook_name,
        d_in=d_in,
        training_tokens=stored_tokens,
        context_size=CONTEXT_LEN,  # must be explicit, else it calls load_dataset(dataset_path)
        new_cached_activations_path=str(out_dir),
        shuffle=False,
        dtype="float16",
        device=str(HOST),  # the benchmark compares CPU throughput
        # One buffer holding exactly our tokens (the default 2 GB buffer would run ~1.7M tokens);
        # the half-token margin keeps float rounding from losing a batch.
        buffer_size_gb=(stored_tokens + 0.5) * bytes_per_token / 1e9,
        prepend_bos=False,  # the rows already start with BOS (pretokenized rows are used as they are)
        seqpos_slice=(1, None),  # drop the BOS position, as the extract stage does
    )
    assert (cfg.n_buffers, cfg.n_batches_in_buffer) == (1, n_contexts // BATCH_SIZE), "buffer sizing is off"
    return cfg


def run_saelens(model, rows: torch.Tensor, hook_name: str, out_dir: Path):
    """Cache `rows`' activations with SAELens's runner on the in-memory model; returns its datasets.Dataset."""
    import datasets

    datasets.config.TORCHVISION_AVAILABLE = False  # datasets 3.6 vs the installed torchvision
    datasets.disable_progress_bars()
    from sae_lens import CacheActivationsRunner
    from sae_lens import cache_activations_runner as car

    dataset = datasets.Dataset.from_dict({"input_ids": rows.tolist()})
    cfg = saelens_config(hook_name, model.cfg.d_model, len(rows), out_dir)
    with (
        mock.patch.object(car, "load_model", lambda **_: model),
        mock.patch.object(car, "tqdm", lambda it, **_: it),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")  # "fewer samples than training tokens": it compares rows to tokens
        return CacheActivationsRunner(cfg, override_dataset=dataset).run()


def bench_saelens(model, rows: torch.Tensor, hook_name: str, tmp: Path) -> tuple[float, float]:
    """SAELens's runner, construction + run() (and its input Dataset, a few ms), on the same model and rows."""
    work = Path(tempfile.mkdtemp(dir=tmp))
    try:
        t0 = time.perf_counter()
        cached = run_saelens(model, rows, hook_name, work / "cache")
        seconds = time.perf_counter() - t0
        assert len(cached) == len(rows), f"SAELens cached {len(cached)} rows, expected {len(rows)}"
    finally:
        shutil.rmtree(work)
    return seconds, seconds


# ---------------------------------------------------------------- running them side by side
