"""Frozen, validated configuration: the model's architecture and the ReSA settings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

from .errors import ConfigError, UnsupportedModelError

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
MODES = ("dense", "sparse", "resa", "verify")
RECTIFY_VARIANTS = ("paper", "fused")
GROUP_POOLS = ("mean", "max")
# Longest draft of mode "verify": its dense pass covers draft + 1 tokens, within the window width
# the chunk kernel and the compiled layer halves take (128).
DRAFT_LIMIT = 127
# rectify_every="auto" starts at the paper's f.
AUTO_START = 32


__all__ = ["ConfigError", "UnsupportedModelError", "GROUP_POOLS", "MODES", "ModelConfig", "RECTIFY_VARIANTS", "ROPE_TYPES",
           "ResaConfig", "RopeConfig", "SUPPORTED_ARCHS", "is_int", "is_number"]


def is_int(value: Any) -> bool:
    """A real Python integer, never a bool (True is an int to Python, not to a config)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite real number (int or float), never a bool or a string."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


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
        if not isinstance(self.rope_type, str) or self.rope_type not in ROPE_TYPES:
            raise UnsupportedModelError(
                f"unsupported RoPE scaling type {self.rope_type!r}; supported: {', '.join(ROPE_TYPES)}"
            )
        if not (is_number(self.theta) and self.theta > 0):
            raise ConfigError(f"rope theta must be a number > 0, got {self.theta!r}")
        if not (is_number(self.factor) and self.factor > 0):
            raise ConfigError(f"rope scaling factor must be a number > 0, got {self.factor!r}")
        for name in ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow"):
            if not is_number(getattr(self, name)):
                raise ConfigError(f"rope {name} must be a number, got {getattr(self, name)!r}")
        for name in ("attention_factor", "mscale", "mscale_all_dim"):
            value = getattr(self, name)
            if value is not None and not is_number(value):
                raise ConfigError(f"rope {name} must be a number or null, got {value!r}")
        orig = self.original_max_position_embeddings
        if orig is not None and not (is_int(orig) and orig > 0):
            raise ConfigError(f"rope original_max_position_embeddings must be a positive integer, got {orig!r}")
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
        if not isinstance(self.arch, str) or self.arch not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(
                f"unsupported architecture {self.arch!r}; resa supports {', '.join(SUPPORTED_ARCHS)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not (is_number(self.rms_norm_eps) and self.rms_norm_eps > 0):
            raise ConfigError(f"rms_norm_eps must be a number > 0, got {self.rms_norm_eps!r}")
        for name in ("bos_token_id",):
            value = getattr(self, name)
            if value is not None and not (is_int(value) and value >= 0):
                raise ConfigError(f"{name} must be a token id (an integer >= 0) or None, got {value!r}")
        if not all(is_int(i) and i >= 0 for i in self.eos_token_ids):
            raise ConfigError(f"eos_token_ids must be token ids (integers >= 0), got {self.eos_token_ids!r}")
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
        """Build from a Hugging Face `config.json` dict; fails on architectures we cannot run.

        Every field read is type-checked first, so a malformed file gives a ConfigError naming
        the field (the loader adds the file name), never a TypeError from deep inside."""
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"config.json must hold a JSON object ({{...}}), got a {type(cfg).__name__}")
        model_type = cfg.get("model_type")
        if not isinstance(model_type, str) or model_type not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(
                f"unsupported model_type {model_type!r} in config.json; resa supports "
                f"{', '.join(SUPPORTED_ARCHS)}"
            )
        if cfg.get("attn_logit_softcapping") or cfg.get("final_logit_softcapping"):
            raise UnsupportedModelError("soft-capped attention is not supported")
        context = _hf_int(cfg, "max_position_embeddings", 4096)
        use_sliding = cfg.get("use_sliding_window", model_type == "mistral")
        window = cfg.get("sliding_window")
        if window is not None and not is_int(window):
            raise ConfigError(f"field 'sliding_window' must be an integer or null, got {window!r}")
        if use_sliding and window is not None and window < context:
            raise UnsupportedModelError(
                f"sliding-window attention (window {window}) is not supported; ReSA needs full attention"
            )
        heads = _hf_int(cfg, "num_attention_heads")
        hidden = _hf_int(cfg, "hidden_size")
        head_dim = _hf_int(cfg, "head_dim", 0)
        if not head_dim:
            if hidden % heads:
                raise ConfigError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads} "
                                  "and there is no head_dim field; the config is inconsistent")
            head_dim = hidden // heads
        eps = cfg.get("rms_norm_eps", 1e-6)
        if not (is_number(eps) and eps > 0):
            raise ConfigError(f"field 'rms_norm_eps' must be a number > 0, got {eps!r}")
        return cls(
            arch=model_type,
            vocab_size=_hf_int(cfg, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_hf_int(cfg, "intermediate_size"),
            num_layers=_hf_int(cfg, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=_hf_int(cfg, "num_key_value_heads", heads),
            head_dim=head_dim,
            max_position_embeddings=context,
            rms_norm_eps=float(eps),
            rope=rope_from_hf(cfg),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            qk_norm=model_type == "qwen3",
            bos_token_id=_hf_token_id(cfg, "bos_token_id"),
            eos_token_ids=_hf_token_ids(cfg, "eos_token_id"),
        )


_REQUIRED = object()


def _hf_int(cfg: Mapping[str, Any], key: str, default: Any = _REQUIRED) -> int:
    """A positive integer field of an HF config; `default` when absent or null."""
    value = cfg.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(f"required field {key!r} is missing")
        return default
    if not is_int(value) or value <= 0:
        raise ConfigError(f"field {key!r} must be a positive integer, got {value!r}")
    return value


def _hf_token_id(cfg: Mapping[str, Any], key: str) -> int | None:
    value = cfg.get(key)
    if isinstance(value, list):  # some configs list several; the first is the primary one
        value = value[0] if value else None
    if value is not None and not (is_int(value) and value >= 0):
        raise ConfigError(f"field {key!r} must be a token id (integer >= 0) or null, got {value!r}")
    return value


def _hf_token_ids(cfg: Mapping[str, Any], key: str) -> tuple[int, ...]:
    value = cfg.get(key)
    ids = value if isinstance(value, list) else ([] if value is None else [value])
    if not all(is_int(i) and i >= 0 for i in ids):
        raise ConfigError(f"field {key!r} must be a token id or a list of token ids, got {value!r}")
    return tuple(ids)


def rope_from_hf(cfg: Mapping[str, Any]) -> RopeConfig:
    """Read RoPE settings from an HF config (`rope_theta` + `rope_scaling`, or `rope_parameters`)."""
    for key in ("rope_parameters", "rope_scaling"):
        if cfg.get(key) is not None and not isinstance(cfg.get(key), Mapping):
            raise ConfigError(f"field {key!r} must be a JSON object or null, got {cfg.get(key)!r}")
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    params.update(scaling)
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    if not (is_number(theta) and theta > 0):
        raise ConfigError(f"field 'rope_theta' must be a number > 0, got {theta!r}")
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    known = {f.name for f in fields(RopeConfig)} - {"theta", "rope_type"}
    kwargs = {k: v for k, v in params.items() if k in known and v is not None}
    if rope_type in ("yarn", "llama3") and "original_max_position_embeddings" not in kwargs:
        # HF falls back to the model's own context length when the scaling block omits it.
        if cfg.get("max_position_embeddings") is not None:
            kwargs["original_max_position_embeddings"] = _hf_int(cfg, "max_position_embeddings")
    return RopeConfig(theta=float(theta), rope_type=rope_type, **kwargs)


@dataclass(frozen=True)
class ResaConfig:
    """ReSA decoding settings (defaults from the paper; see docs/method.md sections 2-3).

    mode: "dense" (full attention every step), "sparse" (block-sparse decode, never rectified),
        "resa" (block-sparse decode + a dense rectification pass every `rectify_every` tokens),
        "verify" (sparse steps draft tokens that one dense pass checks: output identical to dense
        decoding, docs/method.md section 7).
    block_size: tokens per KV block (BS).
    active_ratio: fraction of blocks kept per step; >= 1 means dense.
    min_blocks: blocks always kept (so short contexts stay dense: min_blocks * block_size tokens).
    local_blocks: the newest blocks that are always selected.
    rectify_every: f, generated tokens between rectifications; 0 never rectifies; "auto" (the same
        as rectify_auto=True with f starting at 32) moves f with the measured drift.
    rectify_auto: mode "resa": after every rectification pass, f doubles when the tokens the
        sparse steps produced agreed with the dense argmax nearly everywhere and halves when they
        did not, within [rectify_min, rectify_max] (docs/method.md section 8).
    rectify_variant: "paper" (separate dense pass over the last f tokens) or "fused" (the dense
        pass over the f-1 sparse-made tokens also feeds the newest token and gives the next logits).
    prefill_chunk: tokens per dense prefill chunk.
    group_pool: how a KV group's G query heads score a block: "mean" (the paper's: the min/max
        bound of the group's mean query) or "max" (each head's own bound, the largest over the
        group: a block one head needs is not averaged away by its group mates; G times the
        scoring arithmetic, same bytes read).
    draft_min, draft_max: mode "verify": bounds of the draft length w (sparse steps per dense
        verification pass), chosen per row from its acceptance rate (equal bounds: a fixed w).
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
    draft_min: int = 2
    draft_max: int = 64
    rectify_auto: bool = False
    rectify_min: int = 8
    rectify_max: int = 128

    def __post_init__(self) -> None:
        if self.rectify_every == "auto":
            object.__setattr__(self, "rectify_every", AUTO_START)
            object.__setattr__(self, "rectify_auto", True)
        _choice("mode", self.mode, MODES)
        _choice("rectify_variant", self.rectify_variant, RECTIFY_VARIANTS)
        _choice("group_pool", self.group_pool, GROUP_POOLS)
        if not is_int(self.block_size) or self.block_size < 1:
            raise ConfigError(f"block_size must be a positive integer, got {self.block_size!r}")
        if not (is_number(self.active_ratio) and self.active_ratio > 0):
            raise ConfigError(f"active_ratio must be a number > 0, got {self.active_ratio!r}")
        if not is_int(self.min_blocks) or self.min_blocks < 1:
            raise ConfigError(f"min_blocks must be an integer >= 1, got {self.min_blocks!r}")
        if not is_int(self.local_blocks) or not 1 <= self.local_blocks <= self.min_blocks:
            raise ConfigError(
                f"local_blocks must be an integer in [1, min_blocks={self.min_blocks}], got {self.local_blocks!r}"
            )
        if not is_int(self.rectify_every) or self.rectify_every < 0:
            raise ConfigError(f"rectify_every (f) must be an integer >= 0 or \"auto\", got {self.rectify_every!r}")
        if not isinstance(self.rectify_auto, bool):
            raise ConfigError(f"rectify_auto must be True or False, got {self.rectify_auto!r}")
        if not is_int(self.rectify_min) or not 2 <= self.rectify_min <= DRAFT_LIMIT:
            raise ConfigError(f"rectify_min must be an integer in [2, {DRAFT_LIMIT}], got {self.rectify_min!r}")
        if not is_int(self.rectify_max) or not self.rectify_min <= self.rectify_max <= DRAFT_LIMIT + 1:
            raise ConfigError(f"rectify_max must be an integer in [rectify_min={self.rectify_min}, {DRAFT_LIMIT + 1}], "
                              f"got {self.rectify_max!r}")
        if not is_int(self.prefill_chunk) or self.prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk must be a positive integer, got {self.prefill_chunk!r}")
        if not is_int(self.draft_min) or not 1 <= self.draft_min <= DRAFT_LIMIT:
            raise ConfigError(f"draft_min must be an integer in [1, {DRAFT_LIMIT}], got {self.draft_min!r}")
        if not is_int(self.draft_max) or not self.draft_min <= self.draft_max <= DRAFT_LIMIT:
            raise ConfigError(f"draft_max must be an integer in [draft_min={self.draft_min}, {DRAFT_LIMIT}], "
                              f"got {self.draft_max!r}")

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
