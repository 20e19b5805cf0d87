"""Frozen, validated configuration: the model's architecture and the ReSA settings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
MODES = ("dense", "sparse", "resa")
RECTIFY_VARIANTS = ("paper", "fused")
GROUP_POOLS = ("mean", "max")


class ConfigError(ValueError):
    """A configuration value is missing, out of range or unsupported."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding: base frequency and optional context scaling.

    `rope_type` is one of "default", "linear", "llama3", "yarn"; `factor` and the
    remaining fields are only read by the scaled variants (names follow HF config.json).
    """

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(
                f"unsupported RoPE scaling type {self.rope_type!r}; supported: {', '.join(ROPE_TYPES)}"
            )
        if not self.theta > 0:
            raise ConfigError(f"rope theta must be > 0, got {self.theta}")
        if not self.factor > 0:
            raise ConfigError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.rope_type in ("llama3", "yarn") and self.original_max_position_embeddings is None:
            raise ConfigError(
                f"RoPE scaling {self.rope_type!r} needs original_max_position_embeddings in rope_scaling"
            )


@dataclass(frozen=True)
class ModelConfig:
    """Decoder architecture shared by the Llama, Mistral, Qwen2 and Qwen3 families.

    Parameter names in the model follow Hugging Face's (`model.layers.{i}.self_attn.q_proj.weight`,
    ...); loaders map every other format onto them.
    """

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHS:
            raise ConfigError(
                f"unsupported architecture {self.arch!r}; resa supports {', '.join(SUPPORTED_ARCHS)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def group_size(self) -> int:
        """G = H / HKV, query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "ModelConfig":
        """Build from a Hugging Face `config.json` dict; fails on architectures we cannot run."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_ARCHS:
            raise ConfigError(
                f"unsupported model_type {model_type!r} in config.json; resa supports "
                f"{', '.join(SUPPORTED_ARCHS)}"
            )
        if cfg.get("attn_logit_softcapping") or cfg.get("final_logit_softcapping"):
            raise ConfigError("soft-capped attention is not supported")
        use_sliding = cfg.get("use_sliding_window", model_type == "mistral")
        window = cfg.get("sliding_window")
        if use_sliding and window is not None and window < cfg.get("max_position_embeddings", 0):
            raise ConfigError(
                f"sliding-window attention (window {window}) is not supported; ReSA needs full attention"
            )
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return cls(
            arch=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope=rope_from_hf(cfg),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            qk_norm=model_type == "qwen3",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def rope_from_hf(cfg: Mapping[str, Any]) -> RopeConfig:
    """Read RoPE settings from an HF config (`rope_theta` + `rope_scaling`, or `rope_parameters`)."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    params.update(scaling)
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    known = {f.name for f in fields(RopeConfig)} - {"theta", "rope_type"}
    kwargs = {k: v for k, v in params.items() if k in known and v is not None}
    if rope_type in ("yarn", "llama3") and "original_max_position_embeddings" not in kwargs:
        # HF falls back to the model's own context length when the scaling block omits it.
        if cfg.get("max_position_embeddings") is not None:
            kwargs["original_max_position_embeddings"] = int(cfg["max_position_embeddings"])
    return RopeConfig(theta=float(theta), rope_type=rope_type, **kwargs)


@dataclass(frozen=True)
class ResaConfig:
    """ReSA decoding settings (defaults from the paper; see DESIGN.md 1.2-1.3).

    mode: "dense" (full attention every step), "sparse" (block-sparse decode, never rectified),
        "resa" (block-sparse decode + a dense rectification pass every `rectify_every` tokens).
    block_size: tokens per KV block (BS).
    active_ratio: fraction of blocks kept per step; >= 1 means dense.
    min_blocks: blocks always kept (so short contexts stay dense: min_blocks * block_size tokens).
    local_blocks: the newest blocks that are always selected.
    rectify_every: f, generated tokens between rectifications; 0 never rectifies.
    rectify_variant: "paper" (separate dense pass over the last f tokens) or "fused" (the dense
        pass over the f-1 sparse-made tokens also feeds the newest token and gives the next logits).
    prefill_chunk: tokens per dense prefill chunk.
    group_pool: how a KV group's G query heads score a block: "mean" (the paper's: the min/max
        bound of the group's mean query) or "max" (each head's own bound, the largest over the
        group: a block one head needs is not averaged away by its group mates; G times the
        scoring arithmetic, same bytes read).
    """

    mode: str = "resa"
    block_size: int = 16
    active_ratio: float = 0.1
    min_blocks: int = 16
    local_blocks: int = 1
    rectify_every: int = 32
    rectify_variant: str = "paper"
    prefill_chunk: int = 1024
    group_pool: str = "mean"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.rectify_variant not in RECTIFY_VARIANTS:
            raise ConfigError(
                f"rectify_variant must be one of {', '.join(RECTIFY_VARIANTS)}, got {self.rectify_variant!r}"
            )
        if self.group_pool not in GROUP_POOLS:
            raise ConfigError(f"group_pool must be one of {', '.join(GROUP_POOLS)}, got {self.group_pool!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ConfigError(f"block_size must be a positive integer, got {self.block_size!r}")
        if not (isinstance(self.active_ratio, (int, float)) and self.active_ratio > 0
                and math.isfinite(self.active_ratio)):
            raise ConfigError(f"active_ratio must be a number > 0, got {self.active_ratio!r}")
        if not isinstance(self.min_blocks, int) or self.min_blocks < 1:
            raise ConfigError(f"min_blocks must be an integer >= 1, got {self.min_blocks!r}")
        if not isinstance(self.local_blocks, int) or not 1 <= self.local_blocks <= self.min_blocks:
            raise ConfigError(
                f"local_blocks must be an integer in [1, min_blocks={self.min_blocks}], got {self.local_blocks!r}"
            )
        if not isinstance(self.rectify_every, int) or self.rectify_every < 0:
            raise ConfigError(f"rectify_every (f) must be an integer >= 0, got {self.rectify_every!r}")
        if not isinstance(self.prefill_chunk, int) or self.prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk must be a positive integer, got {self.prefill_chunk!r}")

    @property
    def is_dense(self) -> bool:
        """True when every decode step attends to the whole cache."""
        return self.mode == "dense" or self.active_ratio >= 1

    @property
    def rectifies(self) -> bool:
        """True when sparse-made KV is periodically recomputed densely."""
        return self.mode == "resa" and not self.is_dense and self.rectify_every > 0

    def with_(self, **changes: Any) -> "ResaConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)
