"""Sampling filters and config validation."""

import pytest
import torch

from resa.config import ConfigError, ModelConfig, ResaConfig
from resa.sampling import SamplingConfig, make_generator, sample


def test_top_k_1_and_tiny_top_p_are_greedy():
    torch.manual_seed(0)
    logits = torch.randn(8, 50)
    greedy = sample(logits, SamplingConfig())
    for cfg in (SamplingConfig(temperature=1.0, top_k=1, seed=1), SamplingConfig(temperature=1.0, top_p=1e-6, seed=1)):
        assert torch.equal(sample(logits, cfg, make_generator(cfg, "cpu")), greedy)


def test_top_k_never_samples_outside_the_k_best():
    logits = torch.randn(4, 30)
    cfg = SamplingConfig(temperature=2.0, top_k=3, seed=0)
    gen = make_generator(cfg, "cpu")
    top = torch.topk(logits, 3).indices
    for _ in range(50):
        tok = sample(logits, cfg, gen)
        assert (top == tok[:, None]).any(dim=1).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="fast"), "mode"),
    (dict(active_ratio=0), "active_ratio"),
    (dict(active_ratio=float("nan")), "active_ratio"),
    (dict(block_size=0), "block_size"),
    (dict(rectify_every=-1), "rectify_every"),
    (dict(local_blocks=0), "local_blocks"),
    (dict(rectify_variant="x"), "rectify_variant"),
])
def test_resa_config_rejects_bad_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ResaConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
                                          (dict(top_k=-2), "top_k")])
def test_sampling_config_rejects_bad_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SamplingConfig(**kwargs)


def test_model_config_rejects_unsupported():
    base = dict(vocab_size=10, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                num_kv_heads=2, head_dim=4, max_position_embeddings=16)
    with pytest.raises(ConfigError, match="unsupported architecture"):
        ModelConfig(arch="gpt2", **base)
    with pytest.raises(ConfigError, match="multiple"):
        ModelConfig(arch="llama", **{**base, "num_kv_heads": 3})
    with pytest.raises(ConfigError, match="sliding-window"):
        ModelConfig.from_hf({"model_type": "mistral", "sliding_window": 4, "max_position_embeddings": 64,
                             "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
                             "num_hidden_layers": 1, "num_attention_heads": 2})


@pytest.mark.parametrize("seed", [0, 1, 2**63, 2**64 - 1])
def test_seed_range_accepted_and_usable(seed):
    cfg = SamplingConfig(temperature=1.0, seed=seed)
    gen = make_generator(cfg, "cpu")
    assert gen is not None and gen.initial_seed() == seed


@pytest.mark.parametrize("kwargs,match", [
    (dict(seed=-1), "seed"), (dict(seed=2**64), "seed"), (dict(seed=1.0), "seed"), (dict(seed=False), "seed"),
    (dict(temperature=float("inf")), "temperature"), (dict(temperature=None), "temperature"),
    (dict(top_k=1.5), "top_k"), (dict(top_k=True), "top_k"), (dict(top_p="0.9"), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
])
def test_sampling_config_rejects_wrong_types(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SamplingConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_size=True), "block_size"), (dict(block_size=16.0), "block_size"),
    (dict(active_ratio="0.1"), "active_ratio"), (dict(active_ratio=True), "active_ratio"),
    (dict(active_ratio=float("inf")), "active_ratio"), (dict(rectify_every=2.0), "rectify_every"),
    (dict(prefill_chunk=None), "prefill_chunk"), (dict(group_pool=None), "group_pool"),
    (dict(mode=None), "mode"),
])
def test_resa_config_rejects_wrong_types(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ResaConfig(**kwargs)


def test_model_config_rejects_bools_and_bad_ids():
    base = dict(arch="llama", vocab_size=10, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                num_kv_heads=2, head_dim=4, max_position_embeddings=16)
    with pytest.raises(ConfigError, match="num_layers"):
        ModelConfig(**{**base, "num_layers": True})
    with pytest.raises(ConfigError, match="rms_norm_eps"):
        ModelConfig(**base, rms_norm_eps=0.0)
    with pytest.raises(ConfigError, match="eos_token_ids"):
        ModelConfig(**base, eos_token_ids=(1, "2"))
    with pytest.raises(ConfigError, match="not a multiple"):
        ModelConfig.from_hf({"model_type": "llama", "vocab_size": 10, "hidden_size": 9, "intermediate_size": 8,
                             "num_hidden_layers": 1, "num_attention_heads": 2})
