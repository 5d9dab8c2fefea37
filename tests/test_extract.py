"""Extraction: shard contents, manifest, index, and exact resume after a hard kill."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from sae_ortho.base.io import sha256_file
from sae_ortho.base.params import ExtractParams, Params
from sae_ortho.data.extract import extract
from sae_ortho.data.shards import ActivationShards
from tests.conftest import stage_env, write_small_corpus


def small_params(**extract_kw) -> Params:
    return Params(extract=ExtractParams(**extract_kw))


def test_shards_manifest_and_index(model, small_corpus, tmp_path):
    p = small_params(context_len=32, n_tokens=1000, shard_tokens=124, batch_size=3)
    metrics = extract(p, model, small_corpus, tmp_path / "acts", tmp_path / "acts.partial", progress_bar=False)
    assert not (tmp_path / "acts.partial").exists()
    shards = ActivationShards(tmp_path / "acts")
    m = shards.manifest
    assert m["n_tokens"] == metrics["tokens"] == 31 * 33 >= 1000  # ceil(1000 / 31) contexts of 31 stored tokens
    assert m["n_shards"] == len(shards) == 9  # 4 contexts per shard, 33 contexts
    assert m["d_in"] == 576 and m["dtype"] == "float16"

    index = pd.concat([shards.index(i).to_pandas() for i in range(len(shards))], ignore_index=True)
    acts = torch.cat([shards.load(i) for i in range(len(shards))])
    assert acts.dtype == torch.float16 and acts.shape == (m["n_tokens"], 576)
    assert torch.isfinite(acts).all()
    assert len(index) == m["n_tokens"]
    assert index.groupby("context_id").size().eq(31).all()
    assert sorted(index.context_id.unique()) == list(range(33))
    assert set(index.position) == set(range(1, 32))  # position 0 is BOS, never stored
    assert (index.token_id != model.tokenizer.bos_token_id).all()

    # Norm statistics in the manifest are those of the stored activations.
    norms = acts.float().norm(dim=-1)
    assert m["norm"]["mean"] == pytest.approx(norms.mean().item(), rel=1e-4)
    assert m["norm"]["max"] == pytest.approx(norms.max().item(), rel=1e-4)

    # A stored row is the model's activation at that (context, position), recomputed independently.
    ctx = index[index.context_id == 5].sort_values("position")
    tokens = torch.tensor([[model.tokenizer.bos_token_id, *ctx.token_id.tolist()]])
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, names_filter=p.hook_name, stop_at_layer=p.layer + 1)
    expected = cache[p.hook_name][0, 1:]
    got = acts[ctx.index.to_numpy()].float()
    torch.testing.assert_close(got, expected, atol=2e-3 * expected.abs().max().item(), rtol=2e-3)  # fp16 storage

    # The token stream is the corpus in document order.
    first_doc = pd.read_parquet(small_corpus).text.iloc[0]
    first_ids = model.tokenizer(first_doc, add_special_tokens=False)["input_ids"][:31]
    assert index[index.context_id == 0].sort_values("position").token_id.tolist() == first_ids


def test_corpus_too_small_is_a_clear_error(model, small_corpus, tmp_path):
    p = small_params(context_len=32, n_tokens=10_000_000)
    with pytest.raises(ValueError, match="extract.n_tokens: corpus .* gives only"):
        extract(p, model, small_corpus, tmp_path / "acts", tmp_path / "acts.partial", progress_bar=False)
    assert not (tmp_path / "acts").exists()


def test_killed_extraction_resumes_without_loss_or_duplication(model, tmp_path):
    """SIGKILL mid-run, rerun: the result equals an uninterrupted run, shard for shard."""
    work = tmp_path / "work"
    write_small_corpus(work / "data" / "corpus.parquet", n_docs=400)
    extract_kw = {"context_len": 32, "n_tokens": 31 * 4 * 60, "shard_tokens": 124, "batch_size": 4}
    (work / "params.yaml").write_text(yaml.safe_dump({"extract": extract_kw}))
    partial = work / "data" / "activations.partial"

    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.extract"],
        cwd=work,
        env=stage_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 300
    killed_after = 0
    while time.time() < deadline and proc.poll() is None:
        progress = partial / "progress.r0.json"
        if progress.exists():
            killed_after = len(json.loads(progress.read_text())["shards"])
            if killed_after >= 3:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"extraction ended before it could be killed: {proc.stderr.read()}"
    assert not (work / "data" / "activations").exists()  # nothing complete-looking for DVC to cache
    assert 3 <= killed_after < 60
    # A recorded shard whose bytes changed since it was written is computed again, not carried over.
    first = partial / "shard_00000.safetensors"
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.write_bytes(bytes(data))

    resumed = subprocess.run(
        [sys.executable, "-m", "stages.extract"], cwd=work, env=stage_env(), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after" in resumed.stderr
    metrics = json.loads((work / "metrics" / "extract.json").read_text())
    assert metrics["resumed_from_context"] >= 2 * 4  # all recorded shards but the corrupted one
    assert metrics["tokens_this_run"] == metrics["tokens"] - metrics["resumed_from_context"] * 31

    got = ActivationShards(work / "data" / "activations")
    index = pd.concat([got.index(i).to_pandas() for i in range(len(got))])
    assert np.array_equal(np.sort(index.context_id.unique()), np.arange(240))
    assert index.groupby("context_id").size().eq(31).all()

    reference = extract(
        Params(extract=ExtractParams(**extract_kw)),
        model,
        work / "data" / "corpus.parquet",
        tmp_path / "ref",
        tmp_path / "ref.partial",
        progress_bar=False,
    )
    ref = ActivationShards(tmp_path / "ref")
    assert reference["tokens"] == got.n_tokens == 240 * 31
    assert [s.sha256 for s in got.shards] == [s.sha256 for s in ref.shards]
    assert all(sha256_file(got.directory / s.file) == s.sha256 for s in got.shards)
