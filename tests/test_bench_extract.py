"""The benchmark compares like with like: SAELens's runner, configured as bench_extract does, stores our activations."""

import pandas as pd
import pytest
import torch

from bench.extract import stdlib_docstring_corpus, token_bodies, token_rows
from bench.saelens_runner import run_saelens, saelens_config
from sae_ortho.base.params import ExtractParams, Params
from sae_ortho.data.extract import extract
from sae_ortho.data.shards import ActivationShards


@pytest.mark.parametrize("n_contexts", [16, 144, 1600])
def test_saelens_config_caches_exactly_the_rows_in_one_buffer(n_contexts, tmp_path):
    cfg = saelens_config("blocks.6.hook_resid_post", 576, n_contexts, tmp_path / "cache")
    assert (cfg.n_buffers, cfg.n_seq_in_buffer, cfg.sliced_context_size) == (1, n_contexts, 127)


def test_stdlib_docstring_corpus(tmp_path):
    stdlib_docstring_corpus(tmp_path / "corpus.parquet", min_chars=50_000)
    df = pd.read_parquet(tmp_path / "corpus.parquet")
    assert list(df.columns) == ["doc_id", "source", "text"] and df.text.str.len().sum() >= 50_000


def test_saelens_runner_stores_what_extract_stores(model, small_corpus, tmp_path):
    rows = token_rows(token_bodies(small_corpus, model.tokenizer, 16, tmp_path), model.tokenizer.bos_token_id)
    assert (rows[:, 0] == model.tokenizer.bos_token_id).all() and rows.shape == (16, 128)
    p = Params(extract=ExtractParams(n_tokens=16 * 127))
    extract(p, model, small_corpus, tmp_path / "ours", tmp_path / "ours.partial", progress_bar=False)
    ours = ActivationShards(tmp_path / "ours")
    ours_acts = torch.cat(list(ours)).reshape(16, 127, 576)

    cached = run_saelens(model, rows, p.hook_name, tmp_path / "saelens")
    assert cached.features[p.hook_name].dtype == "float16" and cached.features[p.hook_name].shape == (127, 576)
    cached = cached.with_format("torch")  # (as float32)
    assert torch.equal(cached["token_ids"].long(), rows[:, 1:])
    assert torch.equal(cached[p.hook_name], ours_acts.float())  # same batch, same model: bit-identical
