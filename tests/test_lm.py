"""The embedded SmolLM2 in transformer_lens must compute what the HF model computes."""

import pytest
import torch

from sae_ortho.data.lm import ModelUnavailableError, load_model, load_smollm2_hf


def test_tl_logits_match_hf(model):
    hf_model, _ = load_smollm2_hf()
    tokens = model.to_tokens("Sparse autoencoders split a model's activations into interpretable features.")
    with torch.inference_mode():
        tl_logits = model(tokens)
        hf_logits = hf_model(tokens).logits
    assert tl_logits.shape == hf_logits.shape
    assert (tl_logits - hf_logits).abs().max().item() < 1e-3


def test_greedy_completion_knows_paris(model):
    out = model.generate("The capital of France is", max_new_tokens=4, do_sample=False, verbose=False)
    assert "Paris" in out


def test_stop_at_layer_gives_same_residual_as_full_run(model):
    tokens = model.to_tokens("The quick brown fox jumps over the lazy dog.")
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, names_filter="blocks.6.hook_resid_post")
        partial = model(tokens, stop_at_layer=7)
    torch.testing.assert_close(partial, cache["blocks.6.hook_resid_post"])


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ModelUnavailableError, match="unknown model"):
        load_model("not-a-real-model-xyz")


def test_hub_model_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # empty cache
    with pytest.raises(ModelUnavailableError, match="not in the local Hugging Face cache"):
        load_model("gpt2")


def test_model_cache_round_trip_is_exact(monkeypatch, tmp_path, model):
    """The per-machine cache of the converted model gives the same weights, logits and tokenizer.
    (The session's `model` came through load_model, so the conversion itself is covered by
    test_tl_logits_match_hf; here the cache is written from it and read back.)"""
    from sae_ortho.data.lm import _load_model_cache, _save_model_cache, model_cache_dir

    monkeypatch.setenv("SAE_ORTHO_CACHE", str(tmp_path))
    directory = model_cache_dir()
    assert not directory.exists() and directory.parent == tmp_path
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=model.cfg.d_model,
        num_attention_heads=model.cfg.n_heads,
        num_key_value_heads=model.cfg.n_key_value_heads or model.cfg.n_heads,
        intermediate_size=model.cfg.d_mlp,
        num_hidden_layers=model.cfg.n_layers,
        max_position_embeddings=model.cfg.n_ctx,
        rms_norm_eps=model.cfg.eps,
        vocab_size=model.cfg.d_vocab,
        hidden_act=model.cfg.act_fn,
        rope_theta=model.cfg.rotary_base,
    )
    _save_model_cache(model, config.to_dict(), directory)
    assert directory.is_dir() and not list(tmp_path.glob(".*.tmp"))
    cached = _load_model_cache(directory)
    for (name, a), (_, b) in zip(model.named_parameters(), cached.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    text = "Absorption: the child latent fires and the parent's latent stays silent."
    assert torch.equal(model.to_tokens(text), cached.to_tokens(text))
    with torch.inference_mode():
        torch.testing.assert_close(model(model.to_tokens(text)), cached(cached.to_tokens(text)), rtol=0, atol=0)
