"""End to end: a checkpoint written by transformers (or a GGUF file), loaded by resa.loader into
resa.model.Transformer, gives the same logits as transformers' own model (fp32, dense causal)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from resa import model as model_mod  # noqa: E402  (a failure here must fail, not skip)

from resa.loader import load_checkpoint  # noqa: E402
from tests.checkpoints import random_tensors, tiny_config, write_gguf  # noqa: E402

TOL = 1e-4
VOCAB = 101

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
LINEAR = {"rope_type": "linear", "factor": 2.0}

CASES = {
    "llama": ("llama", False, None, {}),
    "llama-tied-llama3": ("llama", True, LLAMA3, {}),
    "llama-linear": ("llama", False, LINEAR, {}),
    "mistral": ("mistral", False, None, {"sliding_window": None}),
    "mistral-tied-yarn": ("mistral", True, YARN, {"sliding_window": None}),
    "qwen2-bias": ("qwen2", False, None, {}),
    "qwen2-bias-tied-yarn": ("qwen2", True, YARN, {}),
    "qwen3-qknorm": ("qwen3", False, None, {"head_dim": 24}),
    "qwen3-qknorm-tied-yarn": ("qwen3", True, YARN, {}),
}


def _hf_config(arch: str, tied: bool, rope: dict | None, extra: dict):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-5, tie_word_embeddings=tied)
    common.update(extra)
    # transformers 5 reads RoPE settings from `rope_parameters` (theta included).
    common["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, **(rope or {})}
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[arch]
    return cls(**common)


def _randomize(model, seed: int) -> None:
    """Weights big enough that attention is not uniform; norm weights away from 1 so they matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.1 * noise)


def _ours(ck) -> torch.nn.Module:
    model = model_mod.Transformer(ck.config, backend="torch")
    model.load_weights(ck.tensors)
    return model.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    arch, tied, rope, extra = CASES[case]
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(_hf_config(arch, tied, rope, extra),
                                                       attn_implementation="eager", dtype=torch.float32)
    _randomize(hf, seed=1)
    hf.eval()
    hf.save_pretrained(tmp_path)

    ck = load_checkpoint(tmp_path)
    assert ck.config.arch == arch and ck.config.tie_word_embeddings == tied
    assert ck.config.rope.rope_type == (rope or {}).get("rope_type", "default")
    assert ck.config.attention_bias == (arch == "qwen2") and ck.config.qk_norm == (arch == "qwen3")

    tokens = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expect = hf(tokens).logits.float()
    got = _ours(ck).forward_full(tokens)
    assert got.shape == expect.shape
    assert (got - expect).abs().max().item() < TOL


def test_gguf_logits_match_transformers(tmp_path, monkeypatch):
    """Our GGUF path always runs (a failure there fails the test); only transformers' optional
    GGUF support may be missing, and only that skips."""
    monkeypatch.setenv("RESA_NO_CACHE", "1")  # keep the user's cache folder untouched
    cfg = tiny_config("llama", hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16)
    path = write_gguf(tmp_path / "tiny.gguf", cfg, {k: 0.1 * v for k, v in random_tensors(cfg, seed=4).items()})
    tokens = torch.randint(0, cfg.vocab_size, (1, 19), generator=torch.Generator().manual_seed(5))
    got = _ours(load_checkpoint(path)).forward_full(tokens)
    assert torch.isfinite(got).all()
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                               dtype=torch.float32)
    except (ImportError, ValueError, OSError) as exc:  # transformers' GGUF support needs optional deps
        pytest.skip(f"transformers cannot load the GGUF file: {exc}")
    hf.eval()
    with torch.no_grad():
        expect = hf(tokens).logits.float()
    assert (got - expect).abs().max().item() < TOL
