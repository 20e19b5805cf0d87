"""Llama / Mistral / Qwen2 / Qwen3 decoder whose attention goes through `resa.attention`.

Parameter names equal Hugging Face's, so checkpoints load by name (see `weights_table`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import attention as attn
from .cache import KVCache, Span
from .config import ModelConfig, ResaConfig
from .decode_layer import post_attention, pre_attention, project_qkv, rms_norm
from .rope import rope_cos_sin, rope_frequencies


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def qkv_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The q, k, v projections stacked by output row (weight, bias or None): the fused tensors
        when `Transformer.fuse_projections` made the parameters views of them, else a fresh copy."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        return _stacked(self, "_qkv", [p.weight for p in projs],
                        [p.bias for p in projs] if self.cfg.attention_bias else None)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, hidden] -> post-RoPE q [B, H, T, D], k and v [B, HKV, T, D]."""
        cfg = self.cfg
        w, b = self.qkv_weights()
        return project_qkv(
            x, cfg.rms_norm_eps, w, b, self.q_norm.weight if cfg.qk_norm else None,
            self.k_norm.weight if cfg.qk_norm else None, cos, sin, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
        )

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache,
        layer: int,
        span: Span,
        sparse: ResaConfig | None,
        backend: str,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        cache.write(layer, k.to(cache.k.dtype), v.to(cache.v.dtype), span)
        if sparse is None:
            out = attn.dense_attention(q, cache.k[layer], cache.v[layer], span)
        else:
            if T != 1:
                raise ValueError(f"sparse attention decodes one token per row, got a chunk of {T}")
            q1 = q[:, :, 0]
            lengths = span.end_t
            plan = attn.plan_sparse(q1, cache.kmin[layer], cache.kmax[layer], lengths, sparse, backend)
            out = attn.sparse_decode_attention(
                q1, cache.k[layer], cache.v[layer], lengths, plan, sparse.block_size, backend
            )[:, :, None]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def gate_up_weight(self) -> torch.Tensor:
        """Gate and up projections stacked by output row (see `Attention.qkv_weights`)."""
        return _stacked(self, "_gate_up", [self.gate_proj.weight, self.up_proj.weight], None)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _is_fused(fused, weights: list[torch.Tensor]) -> bool:
    """Whether `weights` still are consecutive views of the stacked tensor (a later `.to()` or
    reassignment would have copied them away)."""
    if fused is None:
        return False
    stacked, offset = fused[0], 0
    for w in weights:
        if w.dtype != stacked.dtype or w.data_ptr() != stacked[offset].data_ptr():
            return False
        offset += w.shape[0]
    return offset == stacked.shape[0]


def _stacked(owner: nn.Module, attr: str, weights: list[torch.Tensor], biases: list[torch.Tensor] | None):
    """(weight, bias) of parameters stacked along dim 0: the tensors `_fuse` stored under `attr` if
    the parameters still are views of them, else a new concatenation (correct, just slower)."""
    fused = getattr(owner, attr, None)
    if _is_fused(fused, weights):
        return fused
    return torch.cat(weights), (torch.cat(biases) if biases is not None else None)


@torch.no_grad()
def _stack_into(params: list[nn.Parameter]) -> torch.Tensor:
    """Copy params into one tensor stacked along dim 0 and make each parameter a view of it."""
    stacked = torch.cat([p.data for p in params])
    offset = 0
    for p in params:
        p.data = stacked[offset:offset + p.shape[0]]
        offset += p.shape[0]
    return stacked


def _fuse(owner: nn.Module, attr: str, weights: list[nn.Parameter], biases: list[nn.Parameter] | None) -> None:
    if not _is_fused(getattr(owner, attr, None), weights):
        setattr(owner, attr, (_stack_into(weights), _stack_into(biases) if biases is not None else None))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    """Decoder-only LM. `forward` runs a span of tokens per row against a `KVCache`.

    Dense spans (prefill chunks, rectification windows, dense decode) write their K/V and attend
    causally to each row's whole cache; sparse spans (one token per row) attend to the blocks GBSA
    selects. Returns final hidden states; `logits` applies the LM head.
    """

    def __init__(self, cfg: ModelConfig, backend: str = "auto") -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # fp32 on purpose and not a buffer, so casting the model to bf16 cannot round the angles.
        self.inv_freq, self.rope_scaling = rope_frequencies(cfg.rope, cfg.head_dim)
        self.backend = backend
        self.decode_fns = (pre_attention, post_attention)

    def fuse_projections(self) -> None:
        """Store each layer's q/k/v and gate/up weights in one matrix each (parameters become views,
        so memory does not grow and loading into them still works): the decode step then runs two
        matrix products where it ran five. Call after moving or casting the model."""
        for layer in self.model.layers:
            sa, mlp = layer.self_attn, layer.mlp
            projs = (sa.q_proj, sa.k_proj, sa.v_proj)
            _fuse(sa, "_qkv", [p.weight for p in projs], [p.bias for p in projs] if self.cfg.attention_bias else None)
            _fuse(mlp, "_gate_up", [mlp.gate_proj.weight, mlp.up_proj.weight], None)

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy checkpoint tensors (HF names) into the parameters; strict by name and shape."""
        from .weights_table import check_tensors

        tensors = check_tensors(self.cfg, tensors)
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(tensors[name].to(p.dtype))

    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., hidden_size] -> fp32 logits [..., V]."""
        return F.linear(self.model.norm(hidden), self.head_weight()).float()

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        span: Span,
        sparse: ResaConfig | None = None,
    ) -> torch.Tensor:
        """tokens: [B, T] ids (column t of row b at position span.start[b] + t; columns >= n_valid[b]
        are padding). Writes K/V of the span into `cache` in every layer and commits the new
        lengths. sparse: None for dense attention, else the ReSA settings of a sparse decode step.
        Returns the un-normed hidden states [B, T, hidden_size] (feed to `logits`)."""
        cache.check_span(span)
        backend = attn.resolve_backend(self.backend, tokens.device)
        x = self.model.embed_tokens(tokens)
        positions = span.start_t[:, None] + torch.arange(tokens.shape[1], device=tokens.device)
        cos, sin = rope_cos_sin(positions, self._inv_freq_on(tokens.device), self.rope_scaling, x.dtype)
        for i, layer in enumerate(self.model.layers):
            h = layer.input_layernorm(x)
            x = x + layer.self_attn(h, cos, sin, cache, i, span, sparse, backend)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        cache.commit(span)
        return x

    def compile_decode(self) -> None:
        """Use torch.compile'd layer halves in `decode_static` and `window_static` (fewer, fused
        kernels per layer). Each batch size and window width compiles its own version; the
        recompile limit is raised so that many shapes in one process (a benchmark sweep, several
        batch buckets) do not silently fall back to eager kernels after the default eight."""
        import torch._dynamo.config as dynamo_config

        name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
        setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
        self.decode_fns = (torch.compile(pre_attention, dynamic=False), torch.compile(post_attention, dynamic=False))

    def _inv_freq_on(self, device: torch.device) -> torch.Tensor:
        """The fp32 RoPE frequencies on `device`, copied once (no host copy inside a CUDA graph)."""
        if self.inv_freq.device != device:
            self.inv_freq = self.inv_freq.to(device)
        return self.inv_freq

    def _layer_qkv(self, layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Input norm and q/k/v projection of one layer (the device-side paths; compiled if asked)."""
        cfg, sa = self.cfg, layer.self_attn
        wqkv, bqkv = sa.qkv_weights()
        return self.decode_fns[0](
            x, layer.input_layernorm.weight, cfg.rms_norm_eps, wqkv, bqkv,
            sa.q_norm.weight if cfg.qk_norm else None, sa.k_norm.weight if cfg.qk_norm else None,
            cos, sin, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
        )

    def _layer_rest(self, layer: DecoderLayer, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Output projection, residual and MLP block of one layer; attn_out [B, T, H * D]."""
        sa, mlp = layer.self_attn, layer.mlp
        return self.decode_fns[1](x, attn_out, sa.o_proj.weight, layer.post_attention_layernorm.weight,
                                  self.cfg.rms_norm_eps, mlp.gate_up_weight(), mlp.down_proj.weight)

    @torch.inference_mode()
    def decode_static(self, tokens: torch.Tensor, cache: KVCache, sparse: ResaConfig | None) -> torch.Tensor:
        """One decode step with device-side positions only, so a CUDA graph can capture it.

        tokens: [B] ids, fed at positions cache.lengths (device) of each row. Writes K/V and
        summaries, attends (sparse: GBSA plan; None: every written block, through the same
        block-sparse attention), then increments cache.lengths in place. cache.host_lengths is
        not touched: the caller tracks it. Returns fp32 logits [B, V].
        """
        backend = attn.resolve_backend(self.backend, tokens.device)
        kernels = backend == "triton"
        B = tokens.shape[0]
        pos = cache.lengths
        after = pos + 1
        x = self.model.embed_tokens(tokens[:, None])
        cos, sin = rope_cos_sin(pos[:, None], self._inv_freq_on(tokens.device), self.rope_scaling, x.dtype)
        dense_plan = None
        for i, layer in enumerate(self.model.layers):
            q, k, v = self._layer_qkv(layer, x, cos, sin)
            cache.write_at(i, k.to(cache.k.dtype), v.to(cache.v.dtype), pos, use_kernels=kernels)
            q1 = q[:, :, 0]
            if sparse is not None:
                plan = attn.plan_sparse(q1, cache.kmin[i], cache.kmax[i], after, sparse, backend)
            else:
                if dense_plan is None:
                    dense_plan = attn.full_plan(after, cache.k.shape[2], cache.num_blocks, cache.block_size)
                plan = dense_plan
            out = attn.sparse_decode_attention(q1, cache.k[i], cache.v[i], after, plan, cache.block_size, backend)
            x = self._layer_rest(layer, x, out.reshape(B, 1, -1))
        cache.lengths.add_(1)
        return self.logits(x[:, 0])

    @torch.inference_mode()
    def window_static(self, tokens: torch.Tensor, cache: KVCache, overwrite: int) -> torch.Tensor:
        """Dense pass over tokens [B, W] with device-side positions only (the rectification pass
        as a CUDA graph captures it): row b's tokens go to positions cache.lengths[b] - overwrite
        onwards, rewriting the K/V of its newest `overwrite` tokens and appending the rest; every
        query attends causally to the whole row. Sets cache.lengths to start + W (cache.host_lengths
        is the caller's). Returns the fp32 logits [B, V] of the last position."""
        backend = attn.resolve_backend(self.backend, tokens.device)
        B, W = tokens.shape
        cfg = self.cfg
        start = cache.lengths - overwrite
        n_valid = torch.full_like(start, W)
        x = self.model.embed_tokens(tokens)
        positions = start[:, None] + torch.arange(W, device=tokens.device)
        cos, sin = rope_cos_sin(positions, self._inv_freq_on(tokens.device), self.rope_scaling, x.dtype)
        # [B, W, H, D] storage seen as [B, H, W, D]: the output projection reads it without a copy.
        out = torch.empty(B, W, cfg.num_heads, cfg.head_dim, dtype=x.dtype, device=x.device).transpose(1, 2)
        for i, layer in enumerate(self.model.layers):
            q, k, v = self._layer_qkv(layer, x, cos, sin)
            cache.write_at(i, k.to(cache.k.dtype), v.to(cache.v.dtype), start, use_kernels=backend == "triton")
            attn.chunk_attention(q, cache.k[i], cache.v[i], start, n_valid, backend, out=out)
            x = self._layer_rest(layer, x, out.transpose(1, 2).reshape(B, W, -1))
        cache.lengths.copy_(start + W)
        return self.logits(x[:, -1])

    @torch.inference_mode()
    def forward_full(self, tokens: torch.Tensor, block_size: int = 16) -> torch.Tensor:
        """Dense causal logits [B, T, V] (fp32) of full sequences from an empty cache."""
        B, T = tokens.shape
        p = next(self.parameters())
        cache = KVCache(self.cfg.num_layers, B, self.cfg.num_kv_heads, T, self.cfg.head_dim,
                        block_size, dtype=p.dtype, device=p.device)
        span = Span.make([0] * B, [T] * B, T, tokens.device)
        return self.logits(self.forward(tokens, cache, span))
