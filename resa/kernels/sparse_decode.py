"""Block-sparse decode attention: split-K flash-decoding over the selected blocks of a paged cache.

K/V live in a paged pool: one layer is [num_blocks, HKV, BS, D] physical blocks, and `pages[b, j]`
names the physical block that holds logical block j (tokens j*BS .. j*BS + BS-1) of row b. The
block table of the selection holds logical block ids; the kernel maps each one through `pages`
(every token loads its slot's id and page entry: redundant loads that hit L1).

`sparse_decode_kernel`, grid (B * HKV, splits): one program streams a contiguous range of the row's
block-table slots (BPI blocks = BPI * BS tokens per iteration) for all G query heads of the KV group at once (the G queries are padded to a 16-row
tile so both products run on tensor cores; KV is read once per group). Online softmax in fp32,
base 2. Each program writes its normalised partial output and log-sum-exp; `merge_splits_kernel`,
grid (B * H,), combines them. With one split the first kernel writes the final output and the merge
is skipped.
Splits are chosen on the host from the static shape (B * HKV and the table width S) so that the
grid fills the GPU at batch 1; on the device each row spreads its own num_selected[b] slots evenly
over the splits, so ragged rows cost what they select.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import (INDEX_DTYPES, check_device, check_dtype, check_last_contiguous, check_pages, check_pool,
                      check_qkv, check_shape, interpreting)


@triton.jit
def _attend_tile(q, k_head, v_head, t_row, pg_row, s0, s_hi, length, tok_slot, tok_in, offs_d,
                 stride_kp, stride_kn, stride_vp, stride_vn, stride_ts, stride_gj, qk_scale, m_i, l_i, acc,
                 BS: tl.constexpr, UPCAST: tl.constexpr):
    """One online-softmax step over the tokens of slots [s0, s0 + BPI) (slots >= s_hi masked)."""
    # Every token loads its slot's block id and page entry: BS-fold redundant loads that hit L1,
    # and addresses elementwise in the tile's layout (measured faster on an H200 than one id per
    # block spread over its tokens by a reshape). Page entries of blocks past the row are not read.
    slot = s0 + tok_slot
    blk = tl.load(t_row + slot.to(tl.int64) * stride_ts, mask=slot < s_hi, other=-1)
    valid = (blk >= 0) & (blk * BS + tok_in < length)
    phys = tl.load(pg_row + blk.to(tl.int64) * stride_gj, mask=valid, other=0).to(tl.int64)
    k_off = phys * stride_kp + tok_in * stride_kn
    v_off = phys * stride_vp + tok_in * stride_vn
    kt = tl.load(k_head + k_off[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
    vt = tl.load(v_head + v_off[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
    # Written out rather than through `_online_softmax` (which the chunk kernel uses): with the
    # shared helpers this kernel measured 52 us instead of 47 us at 128K, batch 4 on an H100.
    if UPCAST:
        kt = kt.to(tl.float32)
        vt = vt.to(tl.float32)
        s = tl.dot(q, tl.trans(kt), input_precision="ieee") * qk_scale
    else:
        s = tl.dot(q, tl.trans(kt)) * qk_scale
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A tile with nothing valid yet keeps m at -inf; shift by 0 then so exp2 gives 0, not NaN.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if UPCAST:
        acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
    return m_new, l_i, acc


@triton.jit
def sparse_decode_kernel(
    q_ptr, k_ptr, v_ptr, pages_ptr, lens_ptr, table_ptr, nsel_ptr, o_ptr, lse_ptr,
    stride_qb, stride_qh,
    stride_kp, stride_kh, stride_kn,
    stride_vp, stride_vh, stride_vn,
    stride_gb, stride_gj,
    stride_tb, stride_th, stride_ts,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    num_kv_heads, num_slots, num_splits, qk_scale,
    G: tl.constexpr, G_P: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BPI: tl.constexpr,
    HAS_NSEL: tl.constexpr, SINGLE: tl.constexpr, UPCAST: tl.constexpr, WHILE_LOOP: tl.constexpr,
):
    """Attention of the G queries of (row b, KV head hk) over one split of its block-table slots.

    q: [B, H, D]; k, v: pool layers [num_blocks, HKV, BS, D]; pages: [B, max_blocks] physical block
    of each logical block; table: [B, HKV, S] logical block ids (-1 = unused, skipped anywhere);
    nsel: [B] slots in use per row when HAS_NSEL (else all S). Token t of logical block blk is row t
    of physical block pages[b, blk]; reads only tokens < lengths[b] of selected blocks, and only
    the page entries of selected blocks that hold such a token. SINGLE: o is the final [B, H, D]
    output. Otherwise o: [B, H, splits, D] fp32 partials normalised by their own sum, lse:
    [B, H, splits] fp32 log2-sum-exp2 (-inf if empty).
    qk_scale is softmax scale * log2(e).
    """
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = row // num_kv_heads
    hk = row % num_kv_heads
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    length = tl.load(lens_ptr + b).to(tl.int32)
    if HAS_NSEL:
        nsel = tl.minimum(tl.load(nsel_ptr + b), num_slots)
    else:
        nsel = num_slots
    per = (nsel + num_splits - 1) // num_splits
    s_lo = split * per
    s_hi = tl.minimum(s_lo + per, nsel)

    offs_g = tl.arange(0, G_P)
    offs_d = tl.arange(0, D)
    tok_slot = tl.arange(0, BPI * BS) // BS  # slot of each token of an iteration, and its row
    tok_in = tl.arange(0, BPI * BS) % BS
    heads = hk * G + offs_g
    gmask = offs_g < G
    q = tl.load(q_ptr + b64 * stride_qb + heads.to(tl.int64)[:, None] * stride_qh + offs_d[None, :],
                mask=gmask[:, None], other=0.0)
    k_head = k_ptr + hk64 * stride_kh
    v_head = v_ptr + hk64 * stride_vh
    pg_row = pages_ptr + b64 * stride_gb
    t_row = table_ptr + b64 * stride_tb + hk64 * stride_th
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([G_P], float("-inf"), tl.float32)
    l_i = tl.zeros([G_P], tl.float32)
    acc = tl.zeros([G_P, D], tl.float32)
    if WHILE_LOOP:
        # Triton's interpreter cannot take a run-time range bound (numpy >= 2.4 refuses int() of
        # its 1-element arrays); the compiled path keeps the for-loop, which gets software-pipelined.
        s0 = s_lo
        while s0 < s_hi:
            m_i, l_i, acc = _attend_tile(q, k_head, v_head, t_row, pg_row, s0, s_hi, length,
                                         tok_slot, tok_in, offs_d, stride_kp, stride_kn, stride_vp, stride_vn,
                                         stride_ts, stride_gj, qk_scale, m_i, l_i, acc, BS, UPCAST)
            s0 += BPI
    else:
        for s0 in range(s_lo, s_hi, BPI):
            m_i, l_i, acc = _attend_tile(q, k_head, v_head, t_row, pg_row, s0, s_hi, length,
                                         tok_slot, tok_in, offs_d, stride_kp, stride_kn, stride_vp, stride_vn,
                                         stride_ts, stride_gj, qk_scale, m_i, l_i, acc, BS, UPCAST)

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    if SINGLE:
        o_ptrs = o_ptr + b64 * stride_ob + heads.to(tl.int64)[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=gmask[:, None])
    else:
        base = b64 * stride_ob + heads.to(tl.int64)[:, None] * stride_oh + split.to(tl.int64) * stride_os
        tl.store(o_ptr + base + offs_d[None, :], out, mask=gmask[:, None])
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        l_ptrs = lse_ptr + b64 * stride_lb + heads.to(tl.int64) * stride_lh + split
        tl.store(l_ptrs, lse, mask=gmask)


@triton.jit
def merge_splits_kernel(
    o_part_ptr, lse_ptr, out_ptr,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    num_heads, num_splits,
    D: tl.constexpr, SPLITS_P: tl.constexpr,
):
    """out[b, h] = sum_s 2^(lse_s - lse) * o_part[b, h, s]; a head with no valid token gets 0."""
    pid = tl.program_id(0)
    b = (pid // num_heads).to(tl.int64)
    h = (pid % num_heads).to(tl.int64)
    offs_s = tl.arange(0, SPLITS_P)
    offs_d = tl.arange(0, D)
    ms = offs_s < num_splits
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + offs_s, mask=ms, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    total = tl.sum(w, 0)
    o = tl.load(o_part_ptr + b * stride_pb + h * stride_ph + offs_s[:, None].to(tl.int64) * stride_ps + offs_d[None, :],
                mask=ms[:, None], other=0.0)
    res = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, res.to(out_ptr.dtype.element_ty))


@dataclass(frozen=True)
class DecodeConfig:
    """Launch shape of `sparse_decode_kernel`: blocks per iteration, warps, pipeline stages."""

    blocks_per_iter: int = 8
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        if self.blocks_per_iter < 1 or self.blocks_per_iter & (self.blocks_per_iter - 1):
            raise ValueError(f"blocks_per_iter must be a power of two, got {self.blocks_per_iter}")


# The short list the benchmark sweeps; the default above is its winner on an H100 (docs/kernels.md).
DECODE_CONFIGS = (
    DecodeConfig(8, 4, 2), DecodeConfig(8, 4, 3), DecodeConfig(4, 4, 3), DecodeConfig(8, 8, 2),
)


def choose_splits(batch: int, num_kv_heads: int, num_slots: int, blocks_per_iter: int, num_sms: int) -> int:
    """Splits per (row, KV head): programs for two whole waves of the GPU (rounded down: a
    partial third wave measured slower: 38.5 vs 36.7 us at 128K, batch 4 on an H200), but at least
    one iteration of work per split (at 128K, batch 1, 66 splits of ~1.5 iterations took 11.9 us,
    51 of two 14.4 us; `scripts/splits_sweep.py`), at most 128 splits (the merge holds them in
    one tile)."""
    rows = max(batch * num_kv_heads, 1)
    want = max(1, 2 * num_sms // rows)
    most = max(1, num_slots // blocks_per_iter)
    return max(1, min(want, most, 128))


def sparse_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pages: torch.Tensor,
    lengths: torch.Tensor,
    block_table: torch.Tensor,
    scale: float | None = None,
    *,
    num_selected: torch.Tensor | None = None,
    num_splits: int | None = None,
    config: DecodeConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode query per row attending only to the tokens of its selected blocks of a paged
    cache; same contract as `resa.ref.sparse_decode_ref` on the cache that `pages` describes.

    q: [B, H, D] fp16/bf16 (fp32 accepted); k, v: one layer of the K/V pool, [num_blocks, HKV, BS, D]
    in q's dtype, any strides with a contiguous last dimension (e.g. `pool_k[layer]` of a
    [L, num_blocks, HKV, BS, D] pool); the block size BS = k.shape[2] is a power of two in 1..128.
    pages: [B, max_blocks] int32/int64, logical block j of row b (tokens j*BS .. j*BS + BS-1) is
    physical block pages[b, j]; only entries j < ceil(lengths[b] / BS) are read. lengths: [B]
    int32/int64 (the current token included); block_table: [B, HKV, S] int32/int64 logical block
    ids, -1 = unused; num_selected: optional [B] slots in use per row (a prefix of the table), used
    to balance splits. G = H / HKV in 1..16 (any value), D in 64, 128, 256. Tokens >= lengths[b]
    inside selected blocks are masked; no other block of the pool is read. Returns [B, H, D] in q's
    dtype (written into `out` if given); a row with no valid token gets zeros.
    """
    name = "sparse_decode"
    device = check_device(name, q, k, v, pages, lengths, block_table)
    if q.dim() != 3 or block_table.dim() != 3:
        raise ValueError(f"{name}: q must be [B, H, D] and block_table [B, HKV, S]; "
                         f"got {list(q.shape)}, {list(block_table.shape)}")
    B, H, D = q.shape
    num_blocks, HKV, block_size, _ = check_pool(name, "k", k)
    check_pool(name, "v", v, HKV)
    S = block_table.shape[2]
    check_shape(name, "k", k, (num_blocks, HKV, block_size, D))
    check_shape(name, "v", v, (num_blocks, HKV, block_size, D))
    check_pages(name, pages, B)
    check_shape(name, "lengths", lengths, (B,))
    check_shape(name, "block_table", block_table, (B, HKV, S))
    check_qkv(name, q, k, v)
    check_dtype(name, "lengths", lengths, INDEX_DTYPES)
    check_dtype(name, "block_table", block_table, INDEX_DTYPES)
    if num_selected is not None:
        check_device(name, q, num_selected)
        check_shape(name, "num_selected", num_selected, (B,))
        check_dtype(name, "num_selected", num_selected, INDEX_DTYPES)
    G = H // HKV
    if G > 16:
        raise ValueError(f"{name}: group size {G} > 16 unsupported")
    if block_size < 1 or block_size > 128 or block_size & (block_size - 1):
        raise ValueError(f"{name}: block size (k.shape[2]) must be a power of two in 1..128, got {block_size}")
    if out is None:
        out = torch.empty(B, H, D, dtype=q.dtype, device=device)
    else:
        check_shape(name, "out", out, (B, H, D))
        check_last_contiguous(name, "out", out)
        if out.device != device:
            raise ValueError(f"{name}: out must be on {device}")
    if B == 0:
        return out
    if S == 0:
        return out.zero_()
    cfg = config or DecodeConfig()
    # At most 128 tokens per iteration (register tile), at least 16 (the smallest dot operand).
    bpi = max(min(cfg.blocks_per_iter, max(1, 128 // block_size)), triton.cdiv(16, block_size))
    if num_splits is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        num_splits = choose_splits(B, HKV, S, bpi, sms)
    num_splits = max(1, min(int(num_splits), 128, S))
    scale = D ** -0.5 if scale is None else float(scale)
    single = num_splits == 1
    if single:
        o_part, lse = out, out
        so = (out.stride(0), out.stride(1), 0)
        sl = (0, 0)
    else:
        o_part = torch.empty(B, H, num_splits, D, dtype=torch.float32, device=device)
        lse = torch.empty(B, H, num_splits, dtype=torch.float32, device=device)
        so = (o_part.stride(0), o_part.stride(1), o_part.stride(2))
        sl = (lse.stride(0), lse.stride(1))
    nsel = num_selected if num_selected is not None else lengths
    sparse_decode_kernel[(B * HKV, num_splits)](
        q, k, v, pages, lengths, block_table, nsel, o_part, lse,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        pages.stride(0), pages.stride(1),
        block_table.stride(0), block_table.stride(1), block_table.stride(2),
        *so, *sl,
        HKV, S, num_splits, scale * 1.4426950408889634,
        G=G, G_P=max(16, triton.next_power_of_2(G)), D=D, BS=block_size, BPI=bpi,
        HAS_NSEL=num_selected is not None, SINGLE=single, UPCAST=interpreting() or q.dtype == torch.float32,
        WHILE_LOOP=interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if not single:
        merge_splits_kernel[(B * H,)](
            o_part, lse, out,
            o_part.stride(0), o_part.stride(1), o_part.stride(2),
            lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1),
            H, num_splits,
            D=D, SPLITS_P=max(2, triton.next_power_of_2(num_splits)), num_warps=4,
        )
    return out
