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


@pytest.fixture(scope="module")
def local_llama_checkpoint(tmp_path_factory, model):
    """A small random Llama-family checkpoint saved as a user's fine-tune would be (config.json + weights),
    with the embedded model's tokenizer: the local-directory path needs no hub."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, num_hidden_layers=2,
        max_position_embeddings=256, vocab_size=model.cfg.d_vocab, rms_norm_eps=1e-5,
    )  # fmt: skip
    directory = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(directory)
    model.tokenizer.save_pretrained(directory)
    return directory, hf


def test_local_checkpoint_directory_computes_what_hf_computes(local_llama_checkpoint):
    from sae_ortho.base.model_names import is_known_model, model_n_layers

    directory, hf = local_llama_checkpoint
    assert is_known_model(str(directory)) and model_n_layers(str(directory)) == 2
    tl = load_model(str(directory))
    tokens = tl.to_tokens("A fine-tuned checkpoint from a local directory, no hub needed.")
    with torch.inference_mode():
        torch.testing.assert_close(tl(tokens), hf(tokens).logits, rtol=1e-4, atol=1e-4)


def test_local_checkpoint_of_another_family_loads_from_its_config(tmp_path, model):
    """GPT-NeoX (parallel attention): its config.json tells transformer_lens the architecture."""
    from sae_ortho.base.model_names import model_n_layers, model_width
    from tests.tiny_models import save_tiny_neox

    hf = save_tiny_neox(tmp_path / "tiny-neox", model.tokenizer)
    assert model_n_layers(str(tmp_path / "tiny-neox")) == 2 and model_width(str(tmp_path / "tiny-neox")) == 64
    tl = load_model(str(tmp_path / "tiny-neox"), hook_name="blocks.1.hook_resid_post")
    assert tl.cfg.parallel_attn_mlp and tl.cfg.model_name == "tiny-neox"
    tokens = tl.to_tokens("A second architecture family from a local directory.")
    with torch.inference_mode():
        torch.testing.assert_close(tl(tokens), hf(tokens).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ModelUnavailableError, match="parallel: use resid_pre or resid_post"):
        load_model(str(tmp_path / "tiny-neox"), hook_name="blocks.1.hook_resid_mid")


def test_local_checkpoint_transformer_lens_cannot_convert_is_a_clear_error(tmp_path, model):
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    cfg = GPTBigCodeConfig(n_embd=32, n_head=2, n_layer=1, vocab_size=50, n_positions=64)
    GPTBigCodeForCausalLM(cfg).save_pretrained(tmp_path)
    model.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelUnavailableError, match="transformer_lens cannot convert .*GPTBigCodeForCausalLM"):
        load_model(str(tmp_path))
    with pytest.raises(ModelUnavailableError, match="holds no config.json"):
        load_model(f"gpt2@{tmp_path / 'missing'}")


def test_lm_dtype_and_device_are_honoured(local_llama_checkpoint):
    directory, _ = local_llama_checkpoint
    tl = load_model(str(directory), device=torch.device("cpu"), dtype=torch.bfloat16)
    assert tl.cfg.dtype is torch.bfloat16
    assert {p.dtype for p in tl.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in tl.parameters()} == {"cpu"}
    with torch.inference_mode():
        assert tl(tl.to_tokens("bf16 forward")).dtype is torch.bfloat16


def test_a_missing_hook_is_a_one_line_error(local_llama_checkpoint):
    directory, _ = local_llama_checkpoint
    assert load_model(str(directory), hook_name="blocks.1.hook_resid_mid") is not None  # sequential: it exists
    with pytest.raises(ModelUnavailableError, match=r"has no hook blocks\.7\.hook_resid_post$"):
        load_model(str(directory), hook_name="blocks.7.hook_resid_post")
