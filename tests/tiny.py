"""Tiny random models built in memory, for tests that need no checkpoint files."""

from __future__ import annotations

import torch

from resa.config import ModelConfig, RopeConfig
from resa.engine import Engine
from resa.model import Transformer


def tiny_config(**overrides) -> ModelConfig:
    base = dict(arch="llama", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2,
                num_heads=6, num_kv_heads=2, head_dim=16, max_position_embeddings=4096,
                rope=RopeConfig(theta=10000.0))
    base.update(overrides)
    return ModelConfig(**base)


def peaked_random_(model: torch.nn.Module) -> torch.nn.Module:
    """Fill a model's parameters in place with random weights large enough that attention is
    peaked (so sparsity changes the output); norms get 1. Works for ours and transformers'."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.3)
    return model.eval()


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    """A tiny Transformer with peaked random weights (`peaked_random_`)."""
    torch.manual_seed(seed)
    return peaked_random_(Transformer(tiny_config(**overrides), backend="torch"))


def tiny_engine(seed: int = 0, **overrides) -> Engine:
    """Engine over a tiny model (tests/conftest.py NaN-poisons its fresh buffers)."""
    return Engine(tiny_model(seed, **overrides))


def random_prompts(lengths, vocab: int = 97, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
