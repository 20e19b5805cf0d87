"""Block summary maintenance (docs/method.md 2.1 and 3.2) on the paged cache: element-wise min/max
of each block's keys, stored per physical block.

Layout: one layer of the K pool is [num_blocks, HKV, BS, D] and its summaries kmin, kmax are
[num_blocks, HKV, D]; row b's logical block j (tokens j*BS .. j*BS+BS-1) lives in physical block
pages[b, j]. Both kernels reach a row's blocks through its page ids only, and only through the
ids of the blocks they touch, so physical blocks no row references are never read or written.

- `update_summaries`: after appending one token per row, fold its key into its block's summary
  (or start the block from it). One tiny launch, grid (B * HKV); replaces ~6 torch ops per layer.
- `refresh_summaries`: after a rectification overwrote positions [start_b, end_b), recompute exactly
  the blocks those positions touch, from the keys < end_b. Grid (B * HKV, layers): one layer, or
  every layer of the pool in one launch (a rollback); each program loops over its row's touched
  blocks (bounds read on the device, so no host sync and no window bound is needed).
Min/max are exact in any dtype, so results equal `resa.ref.block_summaries_ref` bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_device,
    check_dtype,
    check_last_contiguous,
    check_pages,
    check_pool,
    check_shape,
)


@triton.jit
def update_summaries_kernel(
    k_ptr, kmin_ptr, kmax_ptr, pages_ptr, pos_ptr,
    stride_kb, stride_kh,
    stride_sp, stride_sh,
    stride_pb, stride_pj,
    num_kv_heads, max_blocks,
    D: tl.constexpr, BS: tl.constexpr,
):
    """k_new: [B, HKV, D]; kmin, kmax: [NBLK, HKV, D] per physical block; pages: [B, max_blocks];
    pos: [B] position of the new token (< 0: row not appended). Logical block j = pos // BS, at
    physical block pages[b, j], becomes min/max(old, k_new), or k_new if pos % BS == 0 (the old
    summary of a fresh block is not read). j >= max_blocks: nothing is read or written."""
    pid = tl.program_id(0)
    b = pid // num_kv_heads
    hk = pid % num_kv_heads
    pos = tl.load(pos_ptr + b).to(tl.int64)
    blk = pos // BS
    if (pos >= 0) & (blk < max_blocks):
        page = tl.load(pages_ptr + b.to(tl.int64) * stride_pb + blk * stride_pj).to(tl.int64)
        offs_d = tl.arange(0, D)
        knew = tl.load(k_ptr + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh + offs_d)
        sp = page * stride_sp + hk.to(tl.int64) * stride_sh + offs_d
        extend = (offs_d < D) & ((pos % BS) != 0)
        old_min = tl.load(kmin_ptr + sp, mask=extend, other=float("inf"))
        old_max = tl.load(kmax_ptr + sp, mask=extend, other=float("-inf"))
        kf = knew.to(tl.float32)
        tl.store(kmin_ptr + sp, tl.minimum(old_min.to(tl.float32), kf).to(kmin_ptr.dtype.element_ty))
        tl.store(kmax_ptr + sp, tl.maximum(old_max.to(tl.float32), kf).to(kmax_ptr.dtype.element_ty))


@triton.jit
def refresh_summaries_kernel(
    k_ptr, kmin_ptr, kmax_ptr, pages_ptr, start_ptr, end_ptr,
    stride_kl, stride_kp, stride_kh, stride_kn,
    stride_sl, stride_sp, stride_sh,
    stride_pb, stride_pj,
    num_kv_heads, max_blocks,
    D: tl.constexpr, BS: tl.constexpr, BS_P: tl.constexpr,
):
    """Program (b * HKV + hk, layer). k: pool layers [L, NBLK, HKV, BS, D]; kmin, kmax: [L, NBLK,
    HKV, D]; pages: [B, max_blocks]. Logical blocks j = start_b // BS .. ceil(end_b / BS) - 1 of
    row b (and < max_blocks) get the min/max of the keys at positions [j * BS, min(j * BS + BS,
    end_b)), read from and stored at physical block pages[b, j]; nothing else is read or written."""
    pid = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    b = pid // num_kv_heads
    hk = pid % num_kv_heads
    start = tl.load(start_ptr + b).to(tl.int64)
    end = tl.load(end_ptr + b).to(tl.int64)
    pages_row = pages_ptr + b.to(tl.int64) * stride_pb
    head_k = layer * stride_kl + hk.to(tl.int64) * stride_kh
    head_s = layer * stride_sl + hk.to(tl.int64) * stride_sh
    offs_t = tl.arange(0, BS_P)
    offs_d = tl.arange(0, D)
    first = start // BS
    last = tl.minimum((end + BS - 1) // BS, max_blocks)
    if end <= start:
        last = first
    # A while loop: run-time range bounds do not work in Triton's interpreter (numpy >= 2.4).
    blk = first
    while blk < last:
        page = tl.load(pages_row + blk * stride_pj).to(tl.int64)
        tok = blk * BS + offs_t
        ok = (offs_t < BS) & (tok < end)
        k_blk = k_ptr + page * stride_kp + head_k
        kt = tl.load(k_blk + offs_t[:, None] * stride_kn + offs_d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        mn = tl.min(tl.where(ok[:, None], kt, float("inf")), 0)
        mx = tl.max(tl.where(ok[:, None], kt, float("-inf")), 0)
        sp = page * stride_sp + head_s + offs_d
        tl.store(kmin_ptr + sp, mn.to(kmin_ptr.dtype.element_ty))
        tl.store(kmax_ptr + sp, mx.to(kmax_ptr.dtype.element_ty))
        blk += 1


def _check_summaries(name: str, kmin: torch.Tensor, kmax: torch.Tensor, HKV: int, D: int,
                     num_blocks: int | None = None) -> None:
    """kmin, kmax: [num_blocks, HKV, D] per physical block, one dtype and one set of strides."""
    if kmin.dim() != 3:
        raise ValueError(f"{name}: kmin must be [num_blocks, HKV, D], got {list(kmin.shape)}")
    check_shape(name, "kmin", kmin, (kmin.shape[0] if num_blocks is None else num_blocks, HKV, D))
    check_shape(name, "kmax", kmax, tuple(kmin.shape))
    check_dtype(name, "kmin", kmin, FLOAT_DTYPES)
    if kmax.dtype != kmin.dtype or kmin.stride() != kmax.stride():
        raise ValueError(f"{name}: kmin and kmax must share dtype and strides")
    check_last_contiguous(name, "kmin", kmin)
    if D < 1 or D & (D - 1):
        raise ValueError(f"{name}: head dim {D} must be a power of two")


def update_summaries(
    k_new: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    pages: torch.Tensor,
    positions: torch.Tensor,
    block_size: int,
) -> None:
    """Fold one appended key per row into the block summaries, in place.

    k_new: [B, HKV, D] the new (post-RoPE) keys; kmin, kmax: [NBLK, HKV, D] summaries per physical
    block (any strides, last dim contiguous); pages: [B, max_blocks] int32/int64 block table;
    positions: [B] int32/int64 position of each row's new token, < 0 for rows that did not append.
    Writes physical block pages[b, positions[b] // block_size] of each appending row only (the
    caller makes that page valid; a position at or past max_blocks * block_size is skipped).
    """
    name = "update_summaries"
    check_device(name, k_new, kmin, kmax, pages, positions)
    if k_new.dim() != 3:
        raise ValueError(f"{name}: k_new must be [B, HKV, D], got {list(k_new.shape)}")
    B, HKV, D = k_new.shape
    _check_summaries(name, kmin, kmax, HKV, D)
    check_dtype(name, "k_new", k_new, FLOAT_DTYPES)
    check_last_contiguous(name, "k_new", k_new)
    max_blocks = check_pages(name, pages, B)
    check_shape(name, "positions", positions, (B,))
    check_dtype(name, "positions", positions, INDEX_DTYPES)
    if block_size < 1:
        raise ValueError(f"{name}: block_size must be >= 1")
    if B * HKV == 0 or max_blocks == 0:
        return
    update_summaries_kernel[(B * HKV,)](
        k_new, kmin, kmax, pages, positions,
        k_new.stride(0), k_new.stride(1),
        kmin.stride(0), kmin.stride(1),
        pages.stride(0), pages.stride(1),
        HKV, max_blocks, D=D, BS=block_size, num_warps=1,
    )


def refresh_summaries(
    k: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    pages: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
) -> None:
    """Recompute, in place, the summaries of exactly the blocks that positions [start[b], end[b])
    touch, from the keys at positions < end[b] (later slots are treated as unwritten).

    k: one layer of the K pool [NBLK, HKV, BS, D] (block size BS = k.shape[2]; any strides, last
    dim contiguous), or every layer [L, NBLK, HKV, BS, D] (one launch for all); kmin, kmax:
    [NBLK, HKV, D] (or [L, NBLK, HKV, D]); pages: [B, max_blocks] int32/int64 block table
    (logical blocks < ceil(end[b] / BS) must be valid pages); start, end: [B] int32/int64 on k's
    device (end[b] <= start[b]: row untouched). Logical blocks start[b] // BS .. ceil(end[b] / BS) - 1
    are recomputed, each at its physical block; blocks at or past max_blocks are skipped.
    """
    name = "refresh_summaries"
    check_device(name, k, kmin, kmax, pages, start, end)
    if k.dim() == 5:
        L = k.shape[0]
        if kmin.dim() != 4 or kmin.shape[0] != L or kmax.shape[:1] != kmin.shape[:1]:
            raise ValueError(f"{name}: for keys of {L} layers kmin and kmax must be [{L}, num_blocks, HKV, D], "
                             f"got {list(kmin.shape)}, {list(kmax.shape)}")
        if kmin.stride(0) != kmax.stride(0):
            raise ValueError(f"{name}: kmin and kmax must share dtype and strides")
        strides_l = (k.stride(0), kmin.stride(0))
        k, kmin, kmax = k[0], kmin[0], kmax[0]
    else:
        L, strides_l = 1, (0, 0)
    NBLK, HKV, BS, D = check_pool(name, "k", k)
    _check_summaries(name, kmin, kmax, HKV, D, NBLK)
    check_dtype(name, "k", k, FLOAT_DTYPES)
    if pages.dim() != 2:
        raise ValueError(f"{name}: pages must be [B, max_blocks], got {list(pages.shape)}")
    B = pages.shape[0]
    max_blocks = check_pages(name, pages, B)
    for what, t in (("start", start), ("end", end)):
        check_shape(name, what, t, (B,))
        check_dtype(name, what, t, INDEX_DTYPES)
    if BS < 1:
        raise ValueError(f"{name}: block size (k.shape[2]) must be >= 1")
    if B * HKV * L == 0 or max_blocks == 0:
        return
    refresh_summaries_kernel[(B * HKV, L)](
        k, kmin, kmax, pages, start, end,
        strides_l[0], k.stride(0), k.stride(1), k.stride(2),
        strides_l[1], kmin.stride(0), kmin.stride(1),
        pages.stride(0), pages.stride(1),
        HKV, max_blocks, D=D, BS=BS, BS_P=triton.next_power_of_2(BS), num_warps=2,
    )
