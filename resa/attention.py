"""Attention entry points of the model: the one place a backend (torch or Triton) is chosen.

- `dense_attention`: a chunk of queries per row over that row's cache (prefill, rectification,
  dense decode).
- `chunk_attention`: the same for a short chunk with device-side positions only (the rectification
  pass as a CUDA graph captures it).
- `plan_sparse` + `sparse_decode_attention`: one decode query per row over the blocks GBSA selects.

The torch backend is exact fp32 math (CPU, and the fallback everywhere); the Triton backend is used
on CUDA devices when `resa.kernels` is importable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cache import Span
from .config import ResaConfig
from .ref.attention import dense_attention_ref, sparse_decode_ref
from .ref.selection import block_budget, select_blocks_ref

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto" -> "triton" on CUDA when the kernels import, else "torch"."""
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
    if backend == "triton" and device.type != "cuda":
        raise ValueError("the triton attention backend needs a CUDA device; use backend='torch' on CPU")
    return backend


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, span: Span) -> torch.Tensor:
    """Causal attention of the span's queries over each row's cache.

    q: [B, H, T, D] (query t of row b at position span.start[b] + t); k, v: [B, HKV, Nmax, D] with
    the span already written. Query t of row b sees keys j <= start[b] + t, j < span.end[b].
    Returns [B, H, T, D] in q's dtype (zeros at ignored columns t >= n_valid[b]). Only slots
    < span.end[b] are read.
    """
    T = q.shape[2]
    if len(set(span.start)) == 1 and all(n == T for n in span.n_valid):
        # Rows aligned (prefill of equal prompts, rectification of a batch): one call.
        return _causal_sdpa(q, k[:, :, :span.end[0]], v[:, :, :span.end[0]])
    # Ragged rows: one call per row over exactly its valid queries and keys, so slots past a row's
    # end are never read (no masked copy of the cache). Ignored query columns get zeros.
    out = torch.zeros_like(q)
    for b, (n, end) in enumerate(zip(span.n_valid, span.end)):
        if n:
            out[b:b + 1, :, :n] = _causal_sdpa(q[b:b + 1, :, :n], k[b:b + 1, :, :end], v[b:b + 1, :, :end])
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


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor,
                    n_valid: torch.Tensor, backend: str = "torch", out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of T queries per row at positions start[b] + t (device tensors; the
    chunk's K/V already written) over each row's cache; no host synchronisation on the Triton
    backend. q: [B, H, T, D]; k, v: [B, HKV, Nmax, D]. Returns [B, H, T, D] in q's dtype (into
    `out` when given)."""
    if backend == "triton":
        from .kernels import chunk_attention as kernel

        return kernel(q, k, v, start, n_valid, out=out)
    res = dense_attention_ref(q, k, v, start, n_valid).to(q.dtype)
    return res if out is None else out.copy_(res)


@dataclass
class SparsePlan:
    """The blocks each (row, KV head) attends to in one decode step, shared by all layers' shapes.

    block_table: [B, HKV, S] int32, ascending block ids then -1; num_selected: [B] int32.
    """

    block_table: torch.Tensor
    num_selected: torch.Tensor


def num_slots(capacity_blocks: int, resa: ResaConfig) -> int:
    """Fixed block-table width: the budget of a row filling the whole cache (budgets only grow
    with length)."""
    return block_budget(capacity_blocks, resa.active_ratio, resa.min_blocks)


def plan_sparse(
    q: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    lengths: torch.Tensor,
    resa: ResaConfig,
    backend: str = "torch",
) -> SparsePlan:
    """Select blocks for one decode step of one layer (DESIGN.md 1.2 steps 2-6).

    q: [B, H, D] post-RoPE queries; kmin, kmax: [B, HKV, NBmax, D]; lengths: [B] (current token
    included). The table has num_slots(NBmax) columns.
    """
    slots = num_slots(kmin.shape[2], resa)
    kwargs = dict(block_size=resa.block_size, active_ratio=resa.active_ratio, min_blocks=resa.min_blocks,
                  local_blocks=resa.local_blocks, num_slots=slots, group_pool=resa.group_pool)
    if backend == "triton":
        from .kernels import select_blocks

        table, n = select_blocks(q, kmin, kmax, lengths, **kwargs)
    else:
        table, n = select_blocks_ref(q, kmin, kmax, lengths, **kwargs)
    return SparsePlan(table, n)


def sparse_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    plan: SparsePlan,
    block_size: int,
    backend: str = "torch",
) -> torch.Tensor:
    """Attention of one query per row over the planned blocks.

    q: [B, H, D]; k, v: [B, HKV, Nmax, D]; lengths: [B] (current token included).
    Returns [B, H, D] in q's dtype.
    """
    if backend == "triton":
        from .kernels import sparse_decode

        return sparse_decode(q, k, v, lengths, plan.block_table, block_size, num_selected=plan.num_selected)
    return sparse_decode_ref(q, k, v, lengths, plan.block_table, block_size).to(q.dtype)


def full_plan(lengths: torch.Tensor, num_kv_heads: int, capacity_blocks: int, block_size: int) -> SparsePlan:
    """A plan that selects every written block of every row (dense decode through the sparse
    kernel, without a host sync): slots >= ceil(lengths[b] / BS) hold -1. Table [B, HKV, NBmax]."""
    nb = (lengths + block_size - 1) // block_size
    ids = torch.arange(capacity_blocks, device=lengths.device, dtype=torch.int32)
    table = torch.where(ids[None, :] < nb[:, None], ids[None, :], -1)
    table = table[:, None, :].expand(-1, num_kv_heads, -1)
    return SparsePlan(table, nb.to(torch.int32))

