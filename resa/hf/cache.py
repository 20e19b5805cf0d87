"""A transformers-compatible KV cache that keeps ReSA's per-block key summaries next to K/V."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import attention as attn
from ..cache import KVCache, Span
from ..config import ResaConfig


@dataclass
class ResaStats:
    """What one generation did to the cache.

    decode_steps: forward passes that fed one new token per row (sparse or dense).
    sparse_steps: those decode steps that attended sparsely.
    rectifications: dense passes that rewrote sparse-made K/V.
    rectified_at: for each rectification, (t, first position of the window in row 0, width): t is the
        index (from 0) of the newest generated token when it ran.
    """

    prompt_tokens: list[int] = field(default_factory=list)
    decode_steps: int = 0
    sparse_steps: int = 0
    rectifications: int = 0
    rectified_at: list[tuple[int, int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class ResaPass:
    """One forward pass over the cache: where it writes (`span`) and how it attends (`sparse` is
    None for dense causal attention, else the settings of a sparse single-token decode step)."""

    span: Span
    sparse: ResaConfig | None


class ResaCache:
    """Per-layer K/V and block key min/max for a transformers causal LM decoding with ReSA.

    Storage is `resa.cache.KVCache`, the paged cache of our own engine: blocks of BS tokens from a
    pool (K/V and the blocks' key min/max summaries, post-RoPE keys) listed in per-row block
    tables, plus per-row lengths. Rows are ragged: row b holds its `lengths[b]` tokens at positions
    0 .. lengths[b]-1, with no padding slots, so a left-padded transformers batch is stored (and
    its blocks aligned) exactly as our engine stores it.

    Contract with the model: every forward pass that writes here is bracketed by `begin(pass_)`
    and `end()` (the generation loop in `resa.hf.generate` does this). Inside the pass each
    attention layer calls `update(k, v, layer_idx)` with k, v [B, HKV, T, D] (T = span.width); the
    span's valid columns are written, the summaries of exactly the blocks the write touches are
    brought up to date (incremental min/max for a one-token append), and the layer's K/V pool
    [num_blocks, HKV, BS, D] is returned; the attention function reads each row's blocks below its
    end through the table. Writes end at a row's end: appends, or overwrites of the newest tokens
    (rectification).

    Dynamic by default: when a pass needs more slots than the capacity, the capacity doubles (the
    block table widens; held blocks stay where they are). With `static=True` the capacity is fixed
    and exceeding it raises.
    """

    is_compileable = False

    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        *,
        capacity: int = 256,
        static: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        backend: str = "auto",
    ) -> None:
        self.num_layers = num_layers
        self.static = static
        self.backend = backend
        self.kv = KVCache.create(num_layers, batch, num_kv_heads, capacity, head_dim, block_size,
                                 dtype=dtype, device=device)
        self.stats = ResaStats()
        self._pass: ResaPass | None = None

    @classmethod
    def for_model(cls, model, batch: int, block_size: int, capacity: int = 256, **kwargs) -> "ResaCache":
        """A cache shaped for a transformers Llama/Mistral/Qwen2/Qwen3 model (its dtype and device)."""
        cfg = model.config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        param = next(model.parameters())
        return cls(cfg.num_hidden_layers, batch, getattr(cfg, "num_key_value_heads", None) or heads,
                   head_dim, block_size, capacity=capacity, dtype=param.dtype, device=param.device,
                   **kwargs)

    # ---- shape and state ----

    @property
    def batch(self) -> int:
        return self.kv.batch

    @property
    def block_size(self) -> int:
        return self.kv.block_size

    @property
    def capacity(self) -> int:
        return self.kv.capacity

    @property
    def lengths(self) -> list[int]:
        """Tokens held by each row (read from the device)."""
        return self.kv.lengths.tolist()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Longest row (transformers' notion of the cache length for an unpadded batch)."""
        return max(self.lengths)

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Copies of one layer's (k, v, kmin, kmax) in logical order, for inspection:
        [B, HKV, N, D] twice and [B, HKV, N / BS, D] twice, N covering the longest row's blocks
        (positions past a row's length are meaningless)."""
        from ..ref.paging import gather_blocks, gather_summaries

        kv = self.kv
        nb = max(len(b) for b in kv.blocks)
        return (gather_blocks(kv.k[layer_idx], kv.pages, nb), gather_blocks(kv.v[layer_idx], kv.pages, nb),
                gather_summaries(kv.kmin[layer_idx], kv.pages, nb), gather_summaries(kv.kmax[layer_idx], kv.pages, nb))

    @property
    def current(self) -> ResaPass:
        """The pass in progress; raises outside begin()/end()."""
        if self._pass is None:
            raise RuntimeError(
                "ResaCache was written outside a ReSA pass; generate with "
                "model.generate(..., custom_generate=resa.hf.generate) rather than passing this cache "
                "to transformers' own generation loop"
            )
        return self._pass

    # ---- one forward pass ----

    def begin(self, pass_: ResaPass) -> None:
        """Start a forward pass: check the span fits (widening the capacity if dynamic) and make
        the rows hold the blocks it writes."""
        if self._pass is not None:
            raise RuntimeError("a ReSA pass is already in progress on this cache")
        need = max(pass_.span.end)
        if need > self.capacity:
            if self.static:
                raise ValueError(f"static ResaCache holds {self.capacity} tokens per row; this pass needs {need}")
            self.kv.widen(max(need, 2 * self.capacity))
        self.kv.reserve(pass_.span.start, pass_.span.end)
        self._pass = pass_

    def end(self) -> None:
        """Finish the pass: the rows now hold exactly span.end tokens."""
        self.kv.lengths.copy_(self.current.span.end_t)
        self._pass = None

    def abort(self) -> None:
        """Forget a pass that failed midway (lengths are left as before it)."""
        self._pass = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Called by each attention layer with its new post-RoPE keys and values [B, HKV, T, D].

        Extra positional/keyword arguments (cache kwargs of some transformers versions) are
        ignored: where to write comes from the current pass. Returns the layer's K and V pools
        [num_blocks, HKV, BS, D]."""
        span = self.current.span
        if key_states.shape[2] != span.width:
            raise ValueError(f"layer {layer_idx} wrote {key_states.shape[2]} tokens into a pass of {span.width}")
        attn.write_kv(self.kv, layer_idx, key_states, value_states, span,
                      attn.resolve_backend(self.backend, key_states.device))
        return self.kv.k[layer_idx], self.kv.v[layer_idx]
