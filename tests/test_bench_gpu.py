"""The GPU benchmark's measuring code, run on the CPU with a wall-clock timer in place of CUDA events
(no GPU here): a bug in it would otherwise first show on a user's GPU."""

import time

import pytest
import torch

from bench import gpu
from sae_ortho.base.device import HOST
from tests.test_stream import PARAMS


def wall_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def test_gpu_bench_code_runs_and_gives_sane_ratios(monkeypatch, model, tmp_path):
    from sae_ortho.data.extract import extract
    from sae_ortho.data.shards import ActivationShards
    from tests.conftest import write_small_corpus

    monkeypatch.setattr(gpu, "cuda_seconds", wall_seconds)
    write_small_corpus(tmp_path / "corpus.parquet", n_docs=200)
    extract(PARAMS, model, tmp_path / "corpus.parquet", tmp_path / "acts", tmp_path / "p", progress_bar=False)
    row = gpu.step_ratios(HOST, ActivationShards(tmp_path / "acts"), d_sae=512, batch=256, repeats=2)
    assert row["step_s"] > 0 and row["encoder_matmuls_s"] > 0 and 0 < row["selection_over_step"] < 10
    assert row["step_over_encoder_matmuls"] > 0.5  # the step contains those matmuls
    ext = gpu.extraction_ratio(HOST, repeats=2, corpus=tmp_path / "corpus.parquet")
    assert ext["tokens"] == 16 * 128 and 0.3 < ext["ratio"] < 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this project's machines)")
def test_cuda_bench_writes_the_device_name(tmp_path):
    import json
    import subprocess
    import sys

    subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--sizes", "16384", "--out", str(tmp_path / "g.json")], check=True
    )
    assert json.loads((tmp_path / "g.json").read_text())["device"]
