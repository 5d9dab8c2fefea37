"""Tiny randomly initialised checkpoints of other architecture families, saved as a user's local model
directory would be (config.json, weights, tokenizer), so the any-model path is tested offline."""

from pathlib import Path

import torch


def save_tiny_neox(directory: Path, tokenizer, seed: int = 0):
    """GPT-NeoX (Pythia's family): parallel attention and MLP, so it has no hook_resid_mid; partial rotary."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        hidden_size=64, num_attention_heads=4, intermediate_size=256, num_hidden_layers=2, vocab_size=len(tokenizer),
        max_position_embeddings=256, use_parallel_residual=True, rotary_pct=0.25,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    hf = GPTNeoXForCausalLM(config).eval()
    hf.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return hf
