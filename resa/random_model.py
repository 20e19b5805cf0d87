"""Real model shapes with random weights: speed does not depend on the weights' values, and real
weights of 7-8B models cannot reach every benchmark machine."""

from __future__ import annotations

import torch

from .config import ModelConfig, RopeConfig
from .model import Transformer

SHAPES: dict[str, ModelConfig] = {
    "qwen2.5-7b": ModelConfig(
        arch="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
        num_heads=28, num_kv_heads=4, head_dim=128, max_position_embeddings=1 << 19,
        rms_norm_eps=1e-6, rope=RopeConfig(theta=1e6), attention_bias=True,
    ),
    "llama-3.1-8b": ModelConfig(
        arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=1 << 19,
        rms_norm_eps=1e-5, rope=RopeConfig(theta=5e5, rope_type="llama3", factor=8.0,
                                           original_max_position_embeddings=8192),
    ),
    "qwen2.5-0.5b": ModelConfig(
        arch="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
        num_heads=14, num_kv_heads=2, head_dim=64, max_position_embeddings=1 << 17,
        rope=RopeConfig(theta=1e6), attention_bias=True, tie_word_embeddings=True,
    ),
}


def random_model(shape: str, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16,
                 seed: int = 0, backend: str = "auto") -> Transformer:
    """A `Transformer` of a named shape with N(0, 0.02) weights and unit norms, built directly on
    `device` (no host copy of the weights)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    with torch.device("meta"):
        model = Transformer(SHAPES[shape], backend=backend)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def weight_bytes_per_step(model: Transformer, batch: int) -> int:
    """Bytes of weights one decode step reads: every matrix once, only B rows of the embedding."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.model.embed_tokens.weight
    if not model.cfg.tie_word_embeddings:
        total -= emb.numel() * emb.element_size()
        total += batch * emb.shape[1] * emb.element_size()
    return total
