"""The attention side of a forward pass: the one place a backend (torch reference or Triton) is
chosen, for the K/V writes and summary maintenance as well as for attention itself.

- `write_kv`: store a span's keys/values of one layer and bring its block summaries up to date.
- `attend`: attention of the span's queries: dense causal (prefill chunks, rectification windows,
  dense decode) or GBSA block-sparse (one decode token per row: `plan_sparse` then
  `sparse_decode_attention`).

Both read and write the paged pool through the cache's block tables (`KVCache.pages`): the
torch backend gathers a row's blocks and runs fp32 reference math (`resa.ref.paging`, `resa.ref`);
the Triton backend runs `resa.kernels`, which take the tables themselves (on CUDA, or on CPU under
Triton's interpreter, TRITON_INTERPRET=1). Spans without host mirrors (the passes CUDA graphs
capture) never synchronise with the host on the Triton backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .cache import KVCache, Span
from .config import ResaConfig
from .ref.attention import dense_attention_ref
from .ref.paging import (gather_blocks, gather_summaries, refresh_summaries_paged_ref, sparse_decode_paged_ref,
                         token_slots, update_summaries_paged_ref, write_slots)
from .ref.selection import block_budget, select_blocks_ref

BACKENDS = ("auto", "torch", "triton")

# Chunks up to this many queries per row use the Triton chunk kernel (rectification windows);
# longer ones (prefill chunks) use SDPA, which is faster there.
CHUNK_KERNEL_MAX = 128

# Called as observe(layer, q) with each layer's post-RoPE queries [B, H, T, D] (diagnostics).
QueryObserver = Callable[[int, torch.Tensor], None]


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto" -> "triton" on CUDA when the kernels import, else "torch". "triton" on CPU needs
    Triton's interpreter (TRITON_INTERPRET=1, for tests)."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        try:
            from . import kernels  # noqa: F401
        except ImportError:
            return "torch"
        return "triton"
    if backend == "triton" and device.type != "cuda" and not _interpreting():
        raise ValueError("the triton attention backend needs a CUDA device (or TRITON_INTERPRET=1); "
                         "use backend='torch' on CPU")
    return backend


# ---- writes ----

def write_kv(cache: KVCache, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, span: Span, backend: str) -> None:
    """Store the span's keys/values of one layer in the rows' blocks and update those blocks'
    summaries.

    k_new, v_new: [B, HKV, T, D] (T = span.width; columns >= n_valid[b] are not written). The rows
    must hold the blocks the span writes (the runner allocates them). One appended token per row
    folds into its block summary incrementally; longer writes recompute exactly the blocks they
    touch. A ragged span without host mirrors writes its padding columns into the cache's sink
    block (`KVCache.ensure_sink`).
    """
    k_l, v_l, pages = cache.k[layer], cache.v[layer], cache.pages
    B, _, T, _ = k_new.shape
    dev, bs = k_new.device, cache.block_size
    # Where each written token goes is the same in every layer: computed once per pass.
    if span.full:
        slots = span.once("write_slots", lambda: token_slots(
            pages, torch.arange(B, device=dev)[:, None].expand(B, T),
            span.start_t[:, None] + torch.arange(T, device=dev)[None, :], bs))
        write_slots(k_l, slots, k_new.transpose(1, 2))
        write_slots(v_l, slots, v_new.transpose(1, 2))
    elif not span.on_host:
        # Ragged and device-only (a CUDA graph of a continuous batch): every column is written,
        # the ones past a row's n_valid into the cache's sink block.
        if cache.sink is None:
            raise ValueError("a device-only ragged span writes its padding into the cache's sink block; call "
                             "KVCache.ensure_sink() before the pass")

        def ragged_slots():
            cols = torch.arange(T, device=dev)[None, :]
            valid = cols < span.n_valid_t[:, None]
            phys, off = token_slots(pages, torch.arange(B, device=dev)[:, None].expand(B, T),
                                    torch.where(valid, span.start_t[:, None] + cols, 0), bs)
            return torch.where(valid, phys, cache.sink), torch.where(valid, off, 0)

        slots = span.once("write_slots", ragged_slots)
        write_slots(k_l, slots, k_new.transpose(1, 2))
        write_slots(v_l, slots, v_new.transpose(1, 2))
    else:
        r, t = span.once("write_cols", lambda: (torch.arange(T, device=dev)[None, :] < span.n_valid_t[:, None])
                         .nonzero(as_tuple=True))
        slots = span.once("write_slots", lambda: token_slots(pages, r, span.start_t[r] + t, bs))
        write_slots(k_l, slots, k_new[r, :, t])
        write_slots(v_l, slots, v_new[r, :, t])
    if T == 1:
        kmin, kmax = cache.kmin[layer], cache.kmax[layer]
        positions = span.start_t if span.full else torch.where(span.n_valid_t > 0, span.start_t, -1)
        if backend == "triton":
            from .kernels import update_summaries

            update_summaries(k_new[:, :, 0].contiguous(), kmin, kmax, pages, positions, bs)
        else:
            update_summaries_paged_ref(k_new[:, :, 0], kmin, kmax, pages, positions, bs)
    else:
        refresh_layer_summaries(cache, layer, span.start_t, span.end_t, backend)


def refresh_layer_summaries(cache: KVCache, layer: int, start: torch.Tensor, end: torch.Tensor, backend: str) -> None:
    """Recompute the summaries of exactly the blocks positions [start[b], end[b]) touch in one
    layer, from the keys below end[b] (start, end: [B] device tensors)."""
    k, kmin, kmax = cache.k[layer], cache.kmin[layer], cache.kmax[layer]
    if backend == "triton":
        from .kernels import refresh_summaries

        refresh_summaries(k, kmin, kmax, cache.pages, start, end)
    else:
        refresh_summaries_paged_ref(k, kmin, kmax, cache.pages, start, end)


def refresh_all_summaries(cache: KVCache, start: torch.Tensor, end: torch.Tensor, backend: str) -> None:
    """`refresh_layer_summaries` in every layer (one launch on the Triton backend): after a
    rollback or a truncation shortened rows to `end`."""
    if backend == "triton":
        from .kernels import refresh_summaries

        refresh_summaries(cache.k, cache.kmin, cache.kmax, cache.pages, start, end)
    else:
        for layer in range(cache.num_layers):
            refresh_layer_summaries(cache, layer, start, end, backend)


# ---- attention ----

def attend(q: torch.Tensor, cache: KVCache, layer: int, span: Span, sparse: ResaConfig | None,
           backend: str) -> torch.Tensor:
    """Attention of the span's queries q [B, H, T, D] (post-RoPE; the span's K/V already written)
    over each row's blocks in `layer`. sparse: None for dense causal attention, else the ReSA
    settings of a block-sparse decode step (T = 1). Returns [B, H, T, D] in q's dtype (any
    strides); ignored columns t >= n_valid[b] hold finite values of no meaning."""
    k, v, pages = cache.k[layer], cache.v[layer], cache.pages
    B, H, T, D = q.shape
    if sparse is not None:
        if T != 1:
            raise ValueError(f"sparse attention decodes one token per row, got a chunk of {T}")
        lengths = span.end_t
        plan = plan_sparse(q[:, :, 0], cache.kmin[layer], cache.kmax[layer], pages, lengths, sparse, backend,
                           cache.plan_buffers(num_slots(cache.max_blocks, sparse), backend == "triton"))
        return sparse_decode_attention(q[:, :, 0], k, v, pages, lengths, plan, backend)[:, :, None]
    if backend == "triton":
        if T == 1:
            # Dense decode through the split-K decode kernel with every written block selected.
            lengths = span.end_t
            plan = span.once("full_plan", lambda: full_plan(lengths, cache.num_kv_heads, cache.max_blocks,
                                                            cache.block_size))
            return sparse_decode_attention(q[:, :, 0], k, v, pages, lengths, plan, backend)[:, :, None]
        if T <= CHUNK_KERNEL_MAX or not span.on_host:
            from .kernels import chunk_attention as kernel

            # [B, T, H, D] storage seen as [B, H, T, D]: the output projection reads it without a
            # copy. One buffer per pass: each layer's output is consumed before the next is written.
            out = span.once("chunk_out", lambda: torch.empty(B, T, H, D, dtype=q.dtype, device=q.device)
                            .transpose(1, 2))
            return kernel(q, k, v, pages, span.start_t, span.n_valid_t, out=out)
    if span.on_host:
        return dense_attention(q, k, v, pages, span)
    return dense_attention_ref(q, gather_blocks(k, pages, cache.max_blocks), gather_blocks(v, pages, cache.max_blocks),
                               span.start_t, span.n_valid_t).to(q.dtype)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pages: torch.Tensor, span: Span) -> torch.Tensor:
    """Causal attention of an eager span's queries over each row's blocks, by SDPA.

    q: [B, H, T, D] (query t of row b at position span.start[b] + t); k, v: pool layers
    [NBLK, HKV, BS, D] with the span already written; pages: [B, max_blocks]. Query t of row b
    sees keys j <= start[b] + t, j < span.end[b]. Returns [B, H, T, D] in q's dtype (zeros at
    ignored columns t >= n_valid[b]). Only the rows' blocks below span.end[b] are read.
    """
    bs = k.shape[2]
    if len(set(span.start)) == 1 and span.full:
        # Rows aligned (prefill of equal prompts, rectification of a batch): one call.
        end = span.end[0]
        nb = -(-end // bs)
        return _causal_sdpa(q, gather_blocks(k, pages, nb)[:, :, :end], gather_blocks(v, pages, nb)[:, :, :end])
    # Ragged rows: one call per row over exactly its valid queries and keys, so slots past a row's
    # end are never read (no masked copy of the cache). Ignored query columns get zeros.
    out = torch.zeros_like(q)
    for b, (n, end) in enumerate(zip(span.n_valid, span.end)):
        if n:
            nb = -(-end // bs)
            kb = gather_blocks(k, pages[b:b + 1], nb)[:, :, :end]
            vb = gather_blocks(v, pages[b:b + 1], nb)[:, :, :end]
            out[b:b + 1, :, :n] = _causal_sdpa(q[b:b + 1, :, :n], kb, vb)
    return out


def _causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA of T queries that are the last T positions of the N keys (bottom-right causal).
    q: [B, H, T, D]; k, v: [B, HKV, N, D]."""
    # Imported here: torch.nn.attention.bias imports triton, which must not happen before a
    # caller has chosen Triton's interpreter (TRITON_INTERPRET is read at kernel definition).
    from torch.nn.attention.bias import causal_lower_right

    # A bottom-right causal bias keeps SDPA on its fused kernels; an explicit mask would force a
    # much slower path.
    T, N = q.shape[2], k.shape[2]
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=causal_lower_right(T, N),
                                          enable_gqa=q.shape[1] != k.shape[1])


@dataclass
class SparsePlan:
    """The blocks each (row, KV head) attends to in one decode step of one layer.

    block_table: [B, HKV, S] int32, ascending block ids then -1; num_selected: [B] int32.
    """

    block_table: torch.Tensor
    num_selected: torch.Tensor


def num_slots(max_blocks: int, resa: ResaConfig) -> int:
    """Fixed block-table width: the budget of a row filling all its `max_blocks` blocks (budgets
    only grow with length)."""
    return block_budget(max_blocks, resa.active_ratio, resa.min_blocks)


def plan_sparse(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, pages: torch.Tensor, lengths: torch.Tensor,
                resa: ResaConfig, backend: str = "torch", buffers=None) -> SparsePlan:
    """Select blocks for one decode step of one layer (docs/method.md 2.2-2.6).

    q: [B, H, D] post-RoPE queries; kmin, kmax: the layer's summary pool [NBLK, HKV, D]; pages:
    [B, max_blocks]; lengths: [B] (current token included). The table holds logical block ids and
    has num_slots(max_blocks) columns. buffers: a `resa.cache.PlanBuffers` the plan is written
    into (preallocated, so a CUDA graph captures fixed addresses); None allocates.
    """
    slots = num_slots(pages.shape[1], resa)
    kwargs = dict(block_size=resa.block_size, active_ratio=resa.active_ratio, min_blocks=resa.min_blocks,
                  local_blocks=resa.local_blocks, num_slots=slots, group_pool=resa.group_pool)
    if backend == "triton":
        from .kernels import select_blocks

        if buffers is not None:
            kwargs.update(workspace=buffers.workspace, out=(buffers.block_table, buffers.num_selected))
        table, n = select_blocks(q, kmin, kmax, pages, lengths, **kwargs)
    else:
        table, n = select_blocks_ref(q, gather_summaries(kmin, pages, pages.shape[1]),
                                     gather_summaries(kmax, pages, pages.shape[1]), lengths, **kwargs)
        if buffers is not None:
            table, n = buffers.block_table.copy_(table), buffers.num_selected.copy_(n)
    return SparsePlan(table, n)


def sparse_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pages: torch.Tensor,
                            lengths: torch.Tensor, plan: SparsePlan, backend: str = "torch") -> torch.Tensor:
    """Attention of one query per row over the planned (logical) blocks.

    q: [B, H, D]; k, v: pool layers [NBLK, HKV, BS, D]; pages: [B, max_blocks]; lengths: [B]
    (current token included). Returns [B, H, D] in q's dtype.
    """
    if backend == "triton":
        from .kernels import sparse_decode

        return sparse_decode(q, k, v, pages, lengths, plan.block_table, num_selected=plan.num_selected)
    return sparse_decode_paged_ref(q, k, v, pages, lengths, plan.block_table).to(q.dtype)


def full_plan(lengths: torch.Tensor, num_kv_heads: int, max_blocks: int, block_size: int) -> SparsePlan:
    """A plan that selects every written block of every row (dense decode through the sparse
    kernel, without a host sync): slots >= ceil(lengths[b] / BS) hold -1. Table [B, HKV, max_blocks]."""
    nb = (lengths + block_size - 1) // block_size
    ids = torch.arange(max_blocks, device=lengths.device, dtype=torch.int32)
    table = torch.where(ids[None, :] < nb[:, None], ids[None, :], -1)
    table = table[:, None, :].expand(-1, num_kv_heads, -1)
    return SparsePlan(table, nb.to(torch.int32))
