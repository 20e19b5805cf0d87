"""Block summary maintenance (docs/method.md 2.1 and 3.2): element-wise min/max of each block's keys.

- `update_summaries`: after appending one token per row, fold its key into its block's summary
  (or start the block from it). One tiny launch, grid (B, HKV); replaces ~6 torch ops per layer.
- `refresh_summaries`: after a rectification overwrote positions [start_b, end_b), recompute exactly
  the blocks those positions touch, from the keys < end_b. Grid (B, HKV); each program loops over its
  row's touched blocks (bounds read on the device, so no host sync and no window bound is needed).
Min/max are exact in any dtype, so results equal `resa.ref.block_summaries_ref` bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, INDEX_DTYPES, check_device, check_dtype, check_last_contiguous, check_shape


@triton.jit
def update_summaries_kernel(
    k_ptr, kmin_ptr, kmax_ptr, pos_ptr,
    stride_kb, stride_kh,
    stride_sb, stride_sh, stride_sn,
    num_kv_heads,
    D: tl.constexpr, BS: tl.constexpr,
):
    """k_new: [B, HKV, D]; kmin, kmax: [B, HKV, NBmax, D]; pos: [B] position of the new token
    (< 0: row not appended). Block pos // BS becomes min/max(old, k_new), or k_new if pos % BS == 0
    (the old summary of a fresh block is not read)."""
    pid = tl.program_id(0)
    b = pid // num_kv_heads
    hk = pid % num_kv_heads
    pos = tl.load(pos_ptr + b).to(tl.int64)
    if pos >= 0:
        offs_d = tl.arange(0, D)
        knew = tl.load(k_ptr + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh + offs_d)
        sp = b.to(tl.int64) * stride_sb + hk.to(tl.int64) * stride_sh + (pos // BS) * stride_sn + offs_d
        extend = (offs_d < D) & ((pos % BS) != 0)
        old_min = tl.load(kmin_ptr + sp, mask=extend, other=float("inf"))
        old_max = tl.load(kmax_ptr + sp, mask=extend, other=float("-inf"))
        kf = knew.to(tl.float32)
        tl.store(kmin_ptr + sp, tl.minimum(old_min.to(tl.float32), kf).to(kmin_ptr.dtype.element_ty))
        tl.store(kmax_ptr + sp, tl.maximum(old_max.to(tl.float32), kf).to(kmax_ptr.dtype.element_ty))


@triton.jit
def refresh_summaries_kernel(
    k_ptr, kmin_ptr, kmax_ptr, start_ptr, end_ptr,
    stride_kb, stride_kh, stride_kn,
    stride_sb, stride_sh, stride_sn,
    num_kv_heads,
    D: tl.constexpr, BS: tl.constexpr, BS_P: tl.constexpr,
):
    """k: [B, HKV, Nmax, D]; blocks start_b // BS .. (end_b - 1) // BS of row b get the min/max of
    the keys at positions [blk * BS, min(blk * BS + BS, end_b)); nothing else is read or written."""
    pid = tl.program_id(0)
    b = pid // num_kv_heads
    hk = pid % num_kv_heads
    start = tl.load(start_ptr + b).to(tl.int64)
    end = tl.load(end_ptr + b).to(tl.int64)
    k_row = k_ptr + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    s_row = b.to(tl.int64) * stride_sb + hk.to(tl.int64) * stride_sh
    offs_t = tl.arange(0, BS_P)
    offs_d = tl.arange(0, D)
    first = start // BS
    last = (end + BS - 1) // BS
    if end <= start:
        last = first
    # A while loop: run-time range bounds do not work in Triton's interpreter (numpy >= 2.4).
    blk = first
    while blk < last:
        tok = blk * BS + offs_t
        ok = (offs_t < BS) & (tok < end)
        kt = tl.load(k_row + tok[:, None] * stride_kn + offs_d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        mn = tl.min(tl.where(ok[:, None], kt, float("inf")), 0)
        mx = tl.max(tl.where(ok[:, None], kt, float("-inf")), 0)
        sp = s_row + blk * stride_sn + offs_d
        tl.store(kmin_ptr + sp, mn.to(kmin_ptr.dtype.element_ty))
        tl.store(kmax_ptr + sp, mx.to(kmax_ptr.dtype.element_ty))
        blk += 1


def _check_summaries(name: str, kmin: torch.Tensor, kmax: torch.Tensor, B: int, HKV: int, D: int) -> None:
    check_shape(name, "kmin", kmin, (B, HKV, kmin.shape[2], D))
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
    positions: torch.Tensor,
    block_size: int,
) -> None:
    """Fold one appended key per row into the block summaries, in place.

    k_new: [B, HKV, D] the new (post-RoPE) keys; kmin, kmax: [B, HKV, NBmax, D] (any strides, last
    dim contiguous); positions: [B] int32/int64 position of each row's new token, < 0 for rows
    that did not append. Writes block positions[b] // block_size of each appending row only; the
    caller guarantees positions[b] < NBmax * block_size.
    """
    name = "update_summaries"
    check_device(name, k_new, kmin, kmax, positions)
    if k_new.dim() != 3 or kmin.dim() != 4:
        raise ValueError(f"{name}: k_new must be [B, HKV, D] and kmin [B, HKV, NBmax, D]")
    B, HKV, D = k_new.shape
    _check_summaries(name, kmin, kmax, B, HKV, D)
    check_dtype(name, "k_new", k_new, FLOAT_DTYPES)
    check_last_contiguous(name, "k_new", k_new)
    check_shape(name, "positions", positions, (B,))
    check_dtype(name, "positions", positions, INDEX_DTYPES)
    if block_size < 1:
        raise ValueError(f"{name}: block_size must be >= 1")
    if B * HKV == 0:
        return
    update_summaries_kernel[(B * HKV,)](
        k_new, kmin, kmax, positions,
        k_new.stride(0), k_new.stride(1),
        kmin.stride(0), kmin.stride(1), kmin.stride(2),
        HKV, D=D, BS=block_size, num_warps=1,
    )


def refresh_summaries(
    k: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    block_size: int,
) -> None:
    """Recompute, in place, the summaries of exactly the blocks that positions [start[b], end[b])
    touch, from the keys at positions < end[b] (later slots are treated as unwritten).

    k: [B, HKV, Nmax, D] key cache (any strides, last dim contiguous); kmin, kmax: [B, HKV, NBmax, D];
    start, end: [B] int32/int64 on k's device (end[b] <= start[b]: row untouched).
    """
    name = "refresh_summaries"
    check_device(name, k, kmin, kmax, start, end)
    if k.dim() != 4 or kmin.dim() != 4:
        raise ValueError(f"{name}: k must be [B, HKV, Nmax, D] and kmin [B, HKV, NBmax, D]")
    B, HKV, _, D = k.shape
    _check_summaries(name, kmin, kmax, B, HKV, D)
    check_dtype(name, "k", k, FLOAT_DTYPES)
    check_last_contiguous(name, "k", k)
    for what, t in (("start", start), ("end", end)):
        check_shape(name, what, t, (B,))
        check_dtype(name, what, t, INDEX_DTYPES)
    if block_size < 1:
        raise ValueError(f"{name}: block_size must be >= 1")
    if B * HKV == 0:
        return
    refresh_summaries_kernel[(B * HKV,)](
        k, kmin, kmax, start, end,
        k.stride(0), k.stride(1), k.stride(2),
        kmin.stride(0), kmin.stride(1), kmin.stride(2),
        HKV, D=D, BS=block_size, BS_P=triton.next_power_of_2(block_size), num_warps=2,
    )
