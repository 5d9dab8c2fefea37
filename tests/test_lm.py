"""The embedded SmolLM2 in transformer_lens must compute what the HF model computes."""

import pytest
import torch

from sae_ortho.lm import ModelUnavailableError, load_model, load_smollm2_hf


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
    """The per-machine cache of the converted model gives the same weights, buffers' outputs and tokenizer."""
    from sae_ortho.lm import load_smollm2_tl, model_cache_dir

    monkeypatch.setenv("SAE_ORTHO_CACHE", str(tmp_path))
    assert not model_cache_dir().exists()
    load_smollm2_tl()  # converts from the GGUF and writes the cache
    assert model_cache_dir().is_dir() and not list(tmp_path.glob(".*.tmp"))
    cached = load_smollm2_tl()
    for (name, a), (_, b) in zip(model.named_parameters(), cached.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    text = "Absorption: the child latent fires and the parent's latent stays silent."
    assert torch.equal(model.to_tokens(text), cached.to_tokens(text))
    with torch.inference_mode():
        torch.testing.assert_close(model(model.to_tokens(text)), cached(cached.to_tokens(text)), rtol=0, atol=0)
