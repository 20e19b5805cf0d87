"""The attention function transformers calls for models enabled with `resa.hf.enable`.

Registered under ATTENTION_NAME in transformers' `AttentionInterface` (and transformers' SDPA mask
builder under the same name in `AttentionMaskInterface`, so masks keep working on passes that do
not go through a `ResaCache`). The math is `resa.attention`'s, the same our engine runs.
"""

from __future__ import annotations

import torch

from .. import attention as attn
from .cache import ResaCache

ATTENTION_NAME = "resa"


def resa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    resa_cache: ResaCache | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of one layer, called by transformers as `fn(module, q, k, v, mask, **kwargs)`.

    query: [B, H, T, D] post-RoPE; key, value: what the layer's cache returned.

    - With `resa_cache` (passed as a keyword argument of the model's forward by the ReSA generation
      loop): key and value are the layer's whole storage [B, HKV, capacity, D] and the pass
      described by `resa_cache.current` decides the attention. Dense passes (prefill chunks,
      rectification windows, dense decode) attend causally to each row's cache
      (`resa.attention.dense_attention`); sparse passes (one token per row) select blocks from the
      layer's key summaries and attend to those blocks only (`plan_sparse` +
      `sparse_decode_attention`). `attention_mask` is ignored: rows are ragged in that cache and
      the pass's span says what each query sees.
    - Without it (likelihood scoring, plain forward calls, transformers' own `generate`): ordinary
      dense attention with transformers' mask (its SDPA function).

    Returns (output [B, T, H, D] in query's dtype, None): attention weights are never materialised.
    """
    if resa_cache is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, dropout=dropout, **kwargs)
    D = query.shape[-1]
    if scaling is not None and abs(scaling * D ** 0.5 - 1.0) > 1e-6:
        raise ValueError(f"ReSA attention uses the softmax scale D^-0.5; this layer asks for {scaling}")
    step = resa_cache.current
    backend = attn.resolve_backend(resa_cache.backend, query.device)
    out = attn.attend(query, resa_cache.kv, module.layer_idx, step.span, step.sparse, backend)
    return out.transpose(1, 2).contiguous(), None
