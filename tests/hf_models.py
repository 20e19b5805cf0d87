"""Tiny random transformers models shared by the transformers integration tests."""

from __future__ import annotations

import torch
import transformers

from tests.tiny import peaked_random_

VOCAB, PAD = 97, 96  # prompts never contain PAD, so transformers infers no padding from it


def _config(arch: str):
    common = dict(vocab_size=VOCAB, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=4096, pad_token_id=PAD)
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    if arch == "mistral":
        return transformers.MistralConfig(sliding_window=None, **common)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "qwen3":
        return transformers.Qwen3Config(**common)
    raise ValueError(arch)


def hf_model(arch: str = "llama", seed: int = 0):
    """Random weights, large enough that attention is peaked (so sparsity changes the output)."""
    torch.manual_seed(seed)
    return peaked_random_(transformers.AutoModelForCausalLM.from_config(_config(arch), attn_implementation="sdpa"))
