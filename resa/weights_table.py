"""The strict table of parameter names and shapes a model config implies.

Names are Hugging Face's (`model.layers.{i}.self_attn.q_proj.weight`, ...). Every loader maps its
format onto these names and then calls `check_tensors`, so a checkpoint that does not fit the config
fails here, loudly, before any model code sees it.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, TypeVar

from resa.config import ModelConfig
from resa.errors import LoaderError

T = TypeVar("T")

# Non-parameter buffers that some older checkpoints carry; they are recomputed from the config,
# so they are dropped instead of rejected.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def expected_parameters(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter a model with config `cfg` has, name -> shape, in a stable order.

    Shapes use V vocab, hidden, H, HKV, D, I intermediate. q/k/v biases appear when
    `cfg.attention_bias`; q_norm/k_norm ([D], per head) when `cfg.qk_norm`; `lm_head.weight`
    unless `cfg.tie_word_embeddings`.
    """
    hidden, d = cfg.hidden_size, cfg.head_dim
    q_out, kv_out = cfg.num_heads * d, cfg.num_kv_heads * d
    inter = cfg.intermediate_size
    table: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, hidden)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        table[p + "input_layernorm.weight"] = (hidden,)
        for proj, out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            table[f"{p}self_attn.{proj}.weight"] = (out, hidden)
            if cfg.attention_bias:
                table[f"{p}self_attn.{proj}.bias"] = (out,)
        table[p + "self_attn.o_proj.weight"] = (hidden, q_out)
        if cfg.qk_norm:
            table[p + "self_attn.q_norm.weight"] = (d,)
            table[p + "self_attn.k_norm.weight"] = (d,)
        table[p + "post_attention_layernorm.weight"] = (hidden,)
        table[p + "mlp.gate_proj.weight"] = (inter, hidden)
        table[p + "mlp.up_proj.weight"] = (inter, hidden)
        table[p + "mlp.down_proj.weight"] = (hidden, inter)
    table["model.norm.weight"] = (hidden,)
    if not cfg.tie_word_embeddings:
        table["lm_head.weight"] = (cfg.vocab_size, hidden)
    return table


def check_tensors(cfg: ModelConfig, tensors: Mapping[str, T], source: str = "checkpoint") -> dict[str, T]:
    """Validate `tensors` (name -> anything with `.shape`) against `expected_parameters(cfg)`.

    Returns a new dict with exactly the expected names, in table order. A tied checkpoint's
    redundant `lm_head.weight` and rotary `inv_freq` buffers are dropped. Raises LoaderError
    naming the first problems: missing tensors, unexpected tensors, or shape mismatches
    (expected vs got). `source` names the checkpoint in messages.
    """
    table = expected_parameters(cfg)
    extra = [n for n in tensors if n not in table and not _droppable(cfg, n)]
    missing = [n for n in table if n not in tensors]
    if missing:
        raise LoaderError(
            f"{source}: {len(missing)} tensor(s) missing, e.g. {_few(missing)}; the checkpoint does "
            f"not match its config ({_describe(cfg)}). Check that config.json belongs to these weights."
        )
    if extra:
        hint = ""
        if any(n.endswith(("qweight", "qzeros", "scales", "weight_scale", "g_idx")) for n in extra):
            hint = " Quantized (GPTQ/AWQ/fp8) checkpoints are not supported; use the unquantized weights or a GGUF file."
        raise LoaderError(
            f"{source}: {len(extra)} unexpected tensor(s), e.g. {_few(extra)}; resa does not know what "
            f"to do with them for config ({_describe(cfg)}).{hint}"
        )
    for name, shape in table.items():
        got = tuple(tensors[name].shape)
        if got != shape:
            raise LoaderError(
                f"{source}: tensor {name} has shape {list(got)}, expected {list(shape)} for config "
                f"({_describe(cfg)})."
            )
    return {name: tensors[name] for name in table}


def check_finite(tensors: Mapping[str, Any], source: str | Mapping[str, str] = "checkpoint",
                 labels: Mapping[str, str] | None = None) -> None:
    """Raise LoaderError if any float tensor holds a NaN or an infinity.

    Cheap: one sum per tensor in its own dtype's accumulator (a NaN or inf anywhere makes the sum
    non-finite); only a non-finite sum triggers the exact element check, which also rules out an
    overflowing sum of finite values. source: the file (one for all, or name -> file); labels:
    the tensor's name in its file where that differs (GGUF names).
    """
    import torch

    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
            continue
        acc = torch.float64 if t.dtype == torch.float64 else torch.float32
        if bool(torch.isfinite(t.sum(dtype=acc))):
            continue
        bad = ~torch.isfinite(t)
        count = int(bad.sum())
        if not count:
            continue
        flat = t.reshape(-1)
        first = int(bad.reshape(-1).nonzero()[0, 0])
        where = source.get(name, "checkpoint") if isinstance(source, Mapping) else source
        label = name if not labels or labels.get(name, name) == name else f"{labels[name]} ({name})"
        raise LoaderError(
            f"{where}: tensor {label} holds {count} non-finite value(s) of {t.numel()} (first: "
            f"{float(flat[first])} at flat index {first}); the weights are corrupt: download or "
            "convert the checkpoint again"
        )


def _droppable(cfg: ModelConfig, name: str) -> bool:
    return (cfg.tie_word_embeddings and name == "lm_head.weight") or bool(_IGNORED.fullmatch(name))


def _few(names: list[str], k: int = 3) -> str:
    shown = ", ".join(names[:k])
    return shown + (f" (+{len(names) - k} more)" if len(names) > k else "")


def _describe(cfg: ModelConfig) -> str:
    return (
        f"{cfg.arch}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, heads {cfg.num_heads}/"
        f"{cfg.num_kv_heads}, head_dim {cfg.head_dim}, intermediate {cfg.intermediate_size}, "
        f"vocab {cfg.vocab_size}, tied={cfg.tie_word_embeddings}"
    )
