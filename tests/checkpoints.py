"""Tiny checkpoints written by tests: HF folders (safetensors, tokenizer) and GGUF files."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import tokenizers
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, decoders, pre_tokenizers
from tokenizers.models import BPE

from resa.config import ModelConfig, RopeConfig
from resa.gguf_loader import permute_qk
from resa.weights_table import expected_parameters


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("l", "l"), ("ll", "o")]


CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_vocab() -> tuple[list[str], list[tuple[str, str]]]:
    """Special tokens, the 256 byte-level symbols, then a few merges: a real byte-level BPE."""
    tokens = SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()) + [a + b for a, b in MERGES]
    return tokens, list(MERGES)


def tiny_hf_tokenizer() -> tokenizers.Tokenizer:
    tokens, merges = tiny_vocab()
    tok = tokenizers.Tokenizer(BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tok


VOCAB = len(tiny_vocab()[0])


def hf_config_dict(arch: str, tied: bool = False, **overrides) -> dict:
    """A tiny config.json for each family, shaped like the real ones (GQA 4/2)."""
    cfg = {"model_type": arch, "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "tie_word_embeddings": tied, "bos_token_id": None, "eos_token_id": 2}
    if arch == "mistral":
        cfg["sliding_window"] = None
    if arch == "qwen2":
        cfg["use_sliding_window"] = False
    if arch == "qwen3":
        cfg.update(head_dim=16, attention_bias=False)
    cfg.update(overrides)
    return cfg


def random_tensors(cfg: ModelConfig, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g).to(dtype) for n, s in expected_parameters(cfg).items()}


def write_hf_folder(folder: Path, cfg: dict, tensors: dict[str, torch.Tensor], shards: int = 1,
                    tokenizer: bool = True, extra_files: dict | None = None) -> Path:
    """config.json + model.safetensors (or N shards with an index) + tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    names = list(tensors)
    if shards == 1:
        save_file(tensors, folder / "model.safetensors")
    else:
        weight_map = {}
        for k in range(shards):
            shard = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[k::shards]}
            save_file(part, folder / shard)
            weight_map.update({n: shard for n in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    if tokenizer:
        tiny_hf_tokenizer().save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE, "add_bos_token": False}))
    for name, content in (extra_files or {}).items():
        (folder / name).write_text(content)
    return folder


def make_checkpoint(tmp_path: Path, arch: str = "llama", tied: bool = False, shards: int = 1,
                    **overrides) -> tuple[Path, ModelConfig, dict[str, torch.Tensor]]:
    raw = hf_config_dict(arch, tied, **overrides)
    cfg = ModelConfig.from_hf(raw)
    tensors = random_tensors(cfg)
    return write_hf_folder(tmp_path / "ckpt", raw, tensors, shards), cfg, tensors


_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def tiny_config(arch: str = "llama", **overrides) -> ModelConfig:
    base = dict(arch=arch, vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256, rms_norm_eps=1e-5,
                rope=RopeConfig(theta=10000.0), attention_bias=arch == "qwen2", qk_norm=arch == "qwen3")
    base.update(overrides)
    return ModelConfig(**base)


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{_TO_GGUF[rest]}"


def write_gguf(path: Path, cfg: ModelConfig, tensors: dict[str, torch.Tensor], *,
               quant: dict[str, gguf.GGMLQuantizationType] | None = None, fp16: bool = False,
               metadata: dict | None = None, extra_tensors: dict[str, np.ndarray] | None = None,
               pre: str = "smollm") -> Path:
    """Write `tensors` (HF names) as llama.cpp does: GGUF names, q/k permuted for the llama arch,
    ggml dim order, tokenizer metadata from the tiny byte-level vocab."""
    w = gguf.GGUFWriter(str(path), cfg.arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope.theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    tokens, merges = tiny_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_merges([f"{a} {b}" for a, b in merges])
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHAT_TEMPLATE)
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    for name, t in tensors.items():
        if cfg.arch == "llama" and ".q_proj." in name:
            t = permute_qk(t, cfg.num_heads)
        elif cfg.arch == "llama" and ".k_proj." in name:
            t = permute_qk(t, cfg.num_kv_heads)
        arr = t.float().numpy()
        qtype = (quant or {}).get(name)
        if qtype is not None:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), arr.astype(np.float16) if fp16 and arr.ndim == 2 else arr)
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
