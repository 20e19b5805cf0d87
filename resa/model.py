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
from .decode_layer import post_attention, pre_attention, rms_norm
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
    """Decoder-only LM with one forward pass for every caller.

    `forward(tokens, cache, span, sparse)` serves prefill chunks, decode steps (T = 1) and
    rectification windows (T = f) alike: it writes the span's K/V (and block summaries) into
    `cache` in every layer, attends densely and causally (sparse None) or block-sparsely (a ReSA
    config, one token per row), and sets the cache's device lengths to the span's end. With a
    device-only span it has no host synchronisation, so a CUDA graph can capture it.
    """

    def __init__(self, cfg: ModelConfig, backend: str = "auto") -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # fp32 on purpose and not a buffer, so casting the model to bf16 cannot round the angles.
        self.inv_freq, self.rope_scaling = rope_frequencies(cfg.rope, cfg.head_dim)
        if backend not in attn.BACKENDS:
            raise ValueError(f"attention backend must be one of {', '.join(attn.BACKENDS)}, got {backend!r}")
        self.backend = backend
        self.layer_fns = (pre_attention, post_attention)
        self.compiled_fns: tuple | None = None

    def fuse_projections(self) -> None:
        """Store each layer's q/k/v and gate/up weights in one matrix each (parameters become views,
        so memory does not grow and loading into them still works): a decode step then runs two
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
    def forward(self, tokens: torch.Tensor, cache: KVCache, span: Span, sparse: ResaConfig | None = None,
                observe: attn.QueryObserver | None = None) -> torch.Tensor:
        """tokens: [B, T] ids (column t of row b at position span.start_t[b] + t; columns >= n_valid[b]
        are padding). Writes the span's K/V into `cache` in every layer and sets cache.lengths to the
        span's end. sparse: None for dense causal attention, else the ReSA settings of a sparse
        decode step (T = 1). observe(layer, q): optional hook given each layer's queries.
        Returns the un-normed hidden states [B, T, hidden_size] (feed to `logits`)."""
        backend = attn.resolve_backend(self.backend, tokens.device)
        B, T = tokens.shape
        x = self.model.embed_tokens(tokens)
        positions = span.start_t[:, None] + torch.arange(T, device=tokens.device)
        cos, sin = rope_cos_sin(positions, self._inv_freq_on(tokens.device), self.rope_scaling, x.dtype)
        # Compiled layer halves specialise on shapes: only the short device-only passes (the decode
        # steps and windows CUDA graphs replay, a few shapes per batch) use them; prefill chunks of
        # every width (a prompt's tail among them) run the plain functions, so a new prompt length
        # never triggers a compilation.
        compiled = self.compiled_fns is not None and T <= COMPILED_MAX_T and not span.on_host
        pre, post = self.compiled_fns if compiled else self.layer_fns
        cfg = self.cfg
        for i, layer in enumerate(self.model.layers):
            sa, mlp = layer.self_attn, layer.mlp
            wqkv, bqkv = sa.qkv_weights()
            q, k, v = pre(x, layer.input_layernorm.weight, cfg.rms_norm_eps, wqkv, bqkv,
                          sa.q_norm.weight if cfg.qk_norm else None, sa.k_norm.weight if cfg.qk_norm else None,
                          cos, sin, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
            attn.write_kv(cache, i, k, v, span, backend)
            if observe is not None:
                observe(i, q)
            out = attn.attend(q, cache, i, span, sparse, backend)
            x = post(x, out.transpose(1, 2).reshape(B, T, -1), sa.o_proj.weight,
                     layer.post_attention_layernorm.weight, cfg.rms_norm_eps, mlp.gate_up_weight(),
                     mlp.down_proj.weight)
        cache.lengths.copy_(span.end_t)
        return x

    # The runner may capture `run` in a CUDA graph (it depends on device state only).
    graph_safe = True

    def run(self, tokens: torch.Tensor, cache: KVCache, span: Span, sparse: ResaConfig | None,
            cols: int | torch.Tensor | None = -1, observe: attn.QueryObserver | None = None) -> torch.Tensor:
        """`forward`, then the fp32 logits [B, V] of one column per row: `cols` (an int for every
        row, or a [B] tensor of columns); cols None: the logits [B, T, V] of every column."""
        hidden = self.forward(tokens, cache, span, sparse, observe)
        if cols is None:
            return self.logits(hidden)
        if isinstance(cols, int):
            return self.logits(hidden[:, cols])
        return self.logits(hidden[torch.arange(hidden.shape[0], device=hidden.device), cols])

    def compile_decode(self) -> None:
        """torch.compile the layer halves used by decode steps and rectification windows (fewer,
        fused kernels per layer). Each batch size and window width compiles its own version; the
        compiled functions raise dynamo's recompile limit for their own calls only, so many shapes
        in one process (a benchmark sweep, several batch buckets) do not fall back to eager kernels
        after the default eight. Graphs a runner captured before keep the kernels they recorded
        (`Runner.graphs.clear()` to capture again)."""
        self.compiled_fns = tuple(_scoped_compile(fn) for fn in (pre_attention, post_attention))

    def _inv_freq_on(self, device: torch.device) -> torch.Tensor:
        """The fp32 RoPE frequencies on `device`, copied once (no host copy inside a CUDA graph)."""
        if self.inv_freq.device != device:
            self.inv_freq = self.inv_freq.to(device)
        return self.inv_freq

    @torch.inference_mode()
    def forward_full(self, tokens: torch.Tensor, block_size: int = 16) -> torch.Tensor:
        """Dense causal logits [B, T, V] (fp32) of full sequences from an empty cache."""
        B, T = tokens.shape
        p = next(self.parameters())
        cache = KVCache.create(self.cfg.num_layers, B, self.cfg.num_kv_heads, T, self.cfg.head_dim,
                               block_size, dtype=p.dtype, device=p.device)
        cache.reserve([0] * B, [T] * B)
        span = Span.make([0] * B, [T] * B, T, tokens.device)
        return self.logits(self.forward(tokens, cache, span))


# Passes of at most this many tokens per row use the compiled layer halves (see `forward`).
COMPILED_MAX_T = 128


def _scoped_compile(fn):
    """torch.compile(fn) whose calls run with a raised recompile limit (a scoped setting: dynamo's
    global configuration is left as it was)."""
    import torch._dynamo.config as dynamo_config

    compiled = torch.compile(fn, dynamic=False)
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    limit = {name: max(getattr(dynamo_config, name), 64)}

    def call(*args):
        with dynamo_config.patch(limit):
            return compiled(*args)

    return call
