"""Switch a loaded transformers causal LM to ReSA decoding: one call, `resa.hf.enable`."""

from __future__ import annotations

from ..config import ResaConfig
from .attention import ATTENTION_NAME, resa_attention

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class UnsupportedModelError(ValueError):
    """The model's architecture or attention variant cannot run ReSA."""


def check_model(model) -> None:
    """Raise `UnsupportedModelError` unless `model` is a Llama/Mistral/Qwen2/Qwen3 causal LM with
    full (not sliding-window), un-soft-capped attention scaled by head_dim^-1/2."""
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"resa.hf supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; got {model_type!r}"
        )
    if getattr(cfg, "is_encoder_decoder", False):
        raise UnsupportedModelError("resa.hf supports decoder-only causal LMs")
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(cfg, name, None):
            raise UnsupportedModelError(f"soft-capped attention ({name}={getattr(cfg, name)}) is not supported")
    layer_types = getattr(cfg, "layer_types", None) or ()
    kinds = sorted(set(layer_types) - {"full_attention"})
    if kinds:
        raise UnsupportedModelError(
            f"layers of type {', '.join(kinds)} are not supported; ReSA needs full attention in every layer"
        )
    window = getattr(cfg, "sliding_window", None)
    uses_window = getattr(cfg, "use_sliding_window", model_type == "mistral")
    if uses_window and window is not None and window < getattr(cfg, "max_position_embeddings", 0):
        raise UnsupportedModelError(
            f"sliding-window attention (window {window}) is not supported; ReSA needs full attention "
            "(for Mistral, load with sliding_window=None if the checkpoint was trained without it)"
        )
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    if heads % kv_heads:
        raise UnsupportedModelError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    for i, layer in enumerate(model.model.layers):
        scaling = getattr(layer.self_attn, "scaling", head_dim ** -0.5)
        if abs(scaling * head_dim ** 0.5 - 1.0) > 1e-6:
            raise UnsupportedModelError(
                f"layer {i} scales attention by {scaling}, not head_dim^-1/2; ReSA's kernels assume the latter"
            )


def enable(model, resa: ResaConfig | None = None, *, backend: str = "auto"):
    """Make `model` (a loaded transformers Llama/Mistral/Qwen2/Qwen3 causal LM) decode with ReSA.

    Registers the "resa" attention function with transformers (and its mask builder), switches the
    model's attention implementation to it and records the settings on the model as
    `model.resa_config` and `model.resa_backend` ("auto", "torch" or "triton"). Afterwards:
    - `model.generate(..., custom_generate=resa.hf.generate)` decodes with ReSA (dense prefill,
      sparse decode steps, rectification every `resa.rectify_every` tokens);
    - every other forward (likelihood scoring, transformers' own `generate`) stays dense attention.
    Returns the model. Raises `UnsupportedModelError` for other architectures, sliding-window or
    soft-capped attention.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from .. import attention as attn

    check_model(model)
    resa = ResaConfig() if resa is None else resa
    if not isinstance(resa, ResaConfig):
        raise TypeError(f"resa must be a resa.ResaConfig, got {type(resa).__name__}")
    if backend not in attn.BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(attn.BACKENDS)}, got {backend!r}")
    # transformers looks attention functions up by name in a class-wide registry; registering the
    # same function again is harmless.
    AttentionInterface.register(ATTENTION_NAME, resa_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    model.set_attn_implementation(ATTENTION_NAME)
    if model.config._attn_implementation != ATTENTION_NAME:
        raise UnsupportedModelError(
            f"{type(model).__name__} does not route attention through transformers' AttentionInterface"
        )
    model.resa_config = resa
    model.resa_backend = backend
    return model


def disable(model, attn_implementation: str = "sdpa"):
    """Undo `enable`: back to a standard attention implementation. Returns the model."""
    model.set_attn_implementation(attn_implementation)
    for name in ("resa_config", "resa_backend"):
        if hasattr(model, name):
            delattr(model, name)
    return model


def enabled_config(model) -> tuple[ResaConfig, str]:
    """(ResaConfig, backend) recorded by `enable`; raises if the model was not enabled."""
    resa = getattr(model, "resa_config", None)
    if resa is None or model.config._attn_implementation != ATTENTION_NAME:
        raise ValueError("this model is not set up for ReSA; call resa.hf.enable(model, ResaConfig(...)) first")
    return resa, getattr(model, "resa_backend", "auto")
