"""Dense causal attention of a short chunk of queries per row over the whole (paged) KV cache.

The rectification pass (docs/method.md 3.2) re-encodes the newest f tokens of every row densely: f
queries per row against up to the full context. That shape is memory-bound like a decode step
(the whole cache is read once per pass) but has too few queries for a prefill kernel to fill the
GPU, so it gets its own split-K kernel.

K/V live in a paged pool: one layer is [num_blocks, HKV, BS, D] physical blocks, and token position
n of row b is row n % BS of physical block `pages[b, n // BS]`; each key of a tile loads its
block's page entry (redundant loads that hit L1), one tile ahead, so a tile may span any number
of blocks and its K/V addresses are known when the tile starts.

`chunk_attention_kernel`, grid (M tiles, B * HKV, splits): the G * T query rows of one KV group
(G heads x T positions, row r = g * T + t) are cut into tiles of BLOCK_M rows; each program streams
one contiguous range of key tiles of its row (all tiles of a group's queries run next to each
other, so K/V is fetched from HBM about once and re-read from L2), with the bottom-right aligned
causal mask (query t of row b at position start[b] + t sees keys j <= start[b] + t, j < end[b]).
Online softmax in fp32, base 2; partial outputs and log-sum-exps are merged by `merge_chunk_kernel`.
Tiles wholly below the chunk's first position skip the masks. Splits are chosen on the host from
static shapes only, so the launch can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import (INDEX_DTYPES, check_device, check_dtype, check_last_contiguous, check_pages, check_pool,
                      check_qkv, check_shape, interpreting)
from ._online_softmax import online_softmax_step, tile_scores


@triton.jit
def _tile_pages(pg_row, n0, end, offs_n, stride_gj, BS: tl.constexpr):
    """Physical block of each key n0 .. n0 + BLOCK_N - 1 (entries of blocks at or past `end` are
    not read): every key loads its block's page entry, BS-fold redundant loads that hit L1."""
    tok = n0 + offs_n
    return tl.load(pg_row + (tok // BS).to(tl.int64) * stride_gj, mask=tok < end, other=0).to(tl.int64)


@triton.jit
def _chunk_tile(q, k_head, v_head, phys, n0, end, qpos, offs_n, offs_d,
                stride_kp, stride_kn, stride_vp, stride_vn, qk_scale, m_i, l_i, acc,
                BS: tl.constexpr, UPCAST: tl.constexpr, MASK: tl.constexpr):
    """One online-softmax step over keys n0 .. n0 + BLOCK_N - 1, whose physical blocks `phys`
    were loaded one tile ahead (`_tile_pages`). MASK=False for tiles every query sees whole (all
    keys below the chunk's first position): no bounds or causal mask."""
    tok = n0 + offs_n
    k_off = phys * stride_kp + (tok % BS) * stride_kn
    v_off = phys * stride_vp + (tok % BS) * stride_vn
    if MASK:
        in_row = tok < end
        kt = tl.load(k_head + k_off[:, None] + offs_d[None, :], mask=in_row[:, None], other=0.0)
        vt = tl.load(v_head + v_off[:, None] + offs_d[None, :], mask=in_row[:, None], other=0.0)
    else:
        kt = tl.load(k_head + k_off[:, None] + offs_d[None, :])
        vt = tl.load(v_head + v_off[:, None] + offs_d[None, :])
    s = tile_scores(q, kt, qk_scale, UPCAST)
    if MASK:
        s = tl.where(in_row[None, :] & (tok[None, :] <= qpos[:, None]), s, float("-inf"))
    return online_softmax_step(s, vt, m_i, l_i, acc, UPCAST)


@triton.jit
def chunk_attention_kernel(
    q_ptr, k_ptr, v_ptr, pages_ptr, start_ptr, nvalid_ptr, o_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qt,
    stride_kp, stride_kh, stride_kn,
    stride_vp, stride_vh, stride_vn,
    stride_gb, stride_gj,
    stride_pb, stride_ph, stride_pr, stride_ps,
    stride_lb, stride_lh, stride_lr,
    num_kv_heads, T, num_splits, qk_scale,
    G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr,
    UPCAST: tl.constexpr, WHILE_LOOP: tl.constexpr,
):
    """Partial attention of query rows [mt * BLOCK_M, +BLOCK_M) of group (b, hk) over one split of
    its key tiles. q: [B, H, T, D]; k, v: pool layers [num_blocks, HKV, BS, D]; pages: [B, max_blocks]
    (key n of row b is row n % BS of physical block pages[b, n // BS]; only entries of blocks
    holding a key < end are read); o: [B, HKV, G*T, splits, D] fp32 normalised partials;
    lse: [B, HKV, G*T, splits] fp32 log2-sum-exp2 (-inf where empty)."""
    mt = tl.program_id(0)
    grp = tl.program_id(1)
    split = tl.program_id(2)
    b = grp // num_kv_heads
    hk = grp % num_kv_heads
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    start = tl.load(start_ptr + b).to(tl.int32)
    end = start + tl.load(nvalid_ptr + b).to(tl.int32)

    rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < G * T
    g = rows // T
    t = rows % T
    qpos = start + t
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    heads64 = (hk * G + g).to(tl.int64)
    q = tl.load(q_ptr + b64 * stride_qb + heads64[:, None] * stride_qh + t.to(tl.int64)[:, None] * stride_qt
                + offs_d[None, :], mask=rmask[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    # Key tiles of this split: the row's tiles spread evenly, so ragged rows cost what they hold.
    n_tiles = (end + BLOCK_N - 1) // BLOCK_N
    per = (n_tiles + num_splits - 1) // num_splits
    lo = split * per * BLOCK_N
    hi = tl.minimum(lo + per * BLOCK_N, end)

    k_head = k_ptr + hk64 * stride_kh
    v_head = v_ptr + hk64 * stride_vh
    pg_row = pages_ptr + b64 * stride_gb
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    # Tiles wholly below the chunk's first position are seen by every query: no mask there.
    mid = tl.minimum(hi, tl.maximum(lo, lo + (start - lo) // BLOCK_N * BLOCK_N))
    # Each iteration loads the next tile's page entries before it attends to the current tile, so
    # the K/V addresses never wait on a load issued in the same iteration (measured 0.94 vs 1.11 ms
    # at 128K, batch 4 on an H200).
    phys = _tile_pages(pg_row, lo, end, offs_n, stride_gj, BS)
    if WHILE_LOOP:
        n0 = lo
        while n0 < mid:
            nxt = _tile_pages(pg_row, n0 + BLOCK_N, end, offs_n, stride_gj, BS)
            m_i, l_i, acc = _chunk_tile(q, k_head, v_head, phys, n0, end, qpos, offs_n, offs_d,
                                        stride_kp, stride_kn, stride_vp, stride_vn,
                                        qk_scale, m_i, l_i, acc, BS, UPCAST, False)
            phys = nxt
            n0 += BLOCK_N
        while n0 < hi:
            nxt = _tile_pages(pg_row, n0 + BLOCK_N, end, offs_n, stride_gj, BS)
            m_i, l_i, acc = _chunk_tile(q, k_head, v_head, phys, n0, end, qpos, offs_n, offs_d,
                                        stride_kp, stride_kn, stride_vp, stride_vn,
                                        qk_scale, m_i, l_i, acc, BS, UPCAST, True)
            phys = nxt
            n0 += BLOCK_N
    else:
        for n0 in range(lo, mid, BLOCK_N):
            nxt = _tile_pages(pg_row, n0 + BLOCK_N, end, offs_n, stride_gj, BS)
            m_i, l_i, acc = _chunk_tile(q, k_head, v_head, phys, n0, end, qpos, offs_n, offs_d,
                                        stride_kp, stride_kn, stride_vp, stride_vn,
                                        qk_scale, m_i, l_i, acc, BS, UPCAST, False)
            phys = nxt
        for n0 in range(mid, hi, BLOCK_N):
            nxt = _tile_pages(pg_row, n0 + BLOCK_N, end, offs_n, stride_gj, BS)
            m_i, l_i, acc = _chunk_tile(q, k_head, v_head, phys, n0, end, qpos, offs_n, offs_d,
                                        stride_kp, stride_kn, stride_vp, stride_vn,
                                        qk_scale, m_i, l_i, acc, BS, UPCAST, True)
            phys = nxt

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    base = b64 * stride_pb + hk64 * stride_ph + rows.to(tl.int64)[:, None] * stride_pr + split.to(tl.int64) * stride_ps
    tl.store(o_ptr + base + offs_d[None, :], out, mask=rmask[:, None])
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(lse_ptr + b64 * stride_lb + hk64 * stride_lh + rows.to(tl.int64) * stride_lr + split, lse, mask=rmask)


@triton.jit
def merge_chunk_kernel(
    o_part_ptr, lse_ptr, out_ptr,
    stride_pb, stride_ph, stride_pr, stride_ps,
    stride_lb, stride_lh, stride_lr,
    stride_ob, stride_oh, stride_ot,
    num_kv_heads, T, num_splits,
    G: tl.constexpr, D: tl.constexpr, SPLITS_P: tl.constexpr,
):
    """out[b, hk*G + g, t] = the splits of query row g*T + t merged by their log-sum-exps."""
    pid = tl.program_id(0)
    r = pid % (G * T)
    grp = pid // (G * T)
    b = (grp // num_kv_heads).to(tl.int64)
    hk = (grp % num_kv_heads).to(tl.int64)
    offs_s = tl.arange(0, SPLITS_P)
    offs_d = tl.arange(0, D)
    ms = offs_s < num_splits
    r64 = r.to(tl.int64)
    lse = tl.load(lse_ptr + b * stride_lb + hk * stride_lh + r64 * stride_lr + offs_s, mask=ms, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    total = tl.sum(w, 0)
    o = tl.load(o_part_ptr + b * stride_pb + hk * stride_ph + r64 * stride_pr
                + offs_s[:, None].to(tl.int64) * stride_ps + offs_d[None, :], mask=ms[:, None], other=0.0)
    res = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    h = hk * G + r // T
    t = (r % T).to(tl.int64)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + t * stride_ot + offs_d, res.to(out_ptr.dtype.element_ty))


@dataclass(frozen=True)
class ChunkConfig:
    """Launch shape of `chunk_attention_kernel`: query rows and keys per tile, warps, stages."""

    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self) -> None:
        for what, val in (("block_m", self.block_m), ("block_n", self.block_n)):
            if val < 16 or val & (val - 1):
                raise ValueError(f"chunk_attention: {what} must be a power of two >= 16, got {val}")


# The short list the kernel benchmark sweeps; the default above is the paged kernel's best on an
# H200 at 128K, batch 4 (with 256-64-8-2, within 1%; docs/kernels.md has the measurement).
CHUNK_CONFIGS = (
    ChunkConfig(128, 64, 8, 2), ChunkConfig(128, 64, 8, 3), ChunkConfig(128, 64, 8, 4),
    ChunkConfig(128, 128, 8, 2), ChunkConfig(128, 128, 8, 3), ChunkConfig(128, 32, 4, 3),
    ChunkConfig(256, 64, 8, 2), ChunkConfig(256, 32, 8, 3),
)


# Groups of at most 64 query rows (verify windows of up to 9 positions at G = 7) run fastest as one
# 64-row tile with 4 warps: 1.17-1.25x the default's speed at 5 and 9 positions, 79-90% of copy
# bandwidth from 128K, batch 4 on an H200 (scripts/chunk_configs_sweep.py). Larger groups keep the
# default (best at 17 and 33 positions).
SMALL_GROUP_CONFIG = ChunkConfig(64, 128, 4, 3)


def default_config(rows: int) -> ChunkConfig:
    """The launch shape `chunk_attention` uses for G * T = `rows` query rows per KV group."""
    return SMALL_GROUP_CONFIG if rows <= SMALL_GROUP_CONFIG.block_m else ChunkConfig()


def query_tiles(rows: int, config: ChunkConfig) -> tuple[int, int]:
    """(rows per tile, tiles) for the G * T query rows of one KV group: tiles of config.block_m
    rows, smaller (a power of two, at least 16) when the group has fewer."""
    block_m = min(config.block_m, max(16, triton.next_power_of_2(rows)))
    return block_m, triton.cdiv(rows, block_m)


def choose_chunk_splits(groups: int, m_tiles: int, capacity: int, block_n: int, num_sms: int) -> int:
    """Splits per (row, KV head) that fill whole waves of the GPU.

    The default launch shape holds one program per SM (its pipelined K/V tiles take most of the
    shared memory), so a launch lasts about ceil(programs / SMs) waves of one program's work:
    ceil(key tiles / splits) tiles plus a fixed cost of about four tiles (its queries, the
    pipeline fill, its partial output). The split count that minimises that estimate is taken,
    the fewest on a tie, with at least four key tiles per split. Measured on an H200 (132 SMs,
    Qwen2.5-7B shapes, `scripts/splits_sweep.py`): 2.18 waves (9 splits at 128K, batch 4, f = 32)
    took 945 us, 0.97 waves (4 splits) 724 us.
    """
    tiles = max(1, triton.cdiv(capacity, block_n))
    programs = max(groups * m_tiles, 1)
    most = max(1, min(tiles // 4, 128))
    best, best_cost = 1, None
    for s in range(1, most + 1):
        cost = triton.cdiv(programs * s, num_sms) * (triton.cdiv(tiles, s) + 4)
        if best_cost is None or cost < best_cost:
            best, best_cost = s, cost
    return best


def chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pages: torch.Tensor,
    start: torch.Tensor,
    n_valid: torch.Tensor,
    scale: float | None = None,
    *,
    num_splits: int | None = None,
    config: ChunkConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of T queries per row over that row's paged cache; same contract as
    `resa.ref.dense_attention_ref` on the cache that `pages` describes (query t of row b at
    position start[b] + t sees keys j <= start[b] + t and j < start[b] + n_valid[b]; queries
    t >= n_valid[b] are padding).

    q: [B, H, T, D] fp16/bf16 (fp32 accepted), any strides with a contiguous last dimension;
    k, v: one layer of the K/V pool, [num_blocks, HKV, BS, D] in q's dtype, any strides with a
    contiguous last dimension; the block size BS = k.shape[2] is a power of two. pages:
    [B, max_blocks] int32/int64, key position j of row b is row j % BS of physical block
    pages[b, j // BS]; only entries j // BS < ceil((start[b] + n_valid[b]) / BS) are read (and
    no other block of the pool). start, n_valid: [B] int32/int64 on the device. G = H / HKV any,
    D in 64, 128, 256. config: the launch shape (default: `default_config(G * T)`). Returns
    [B, H, T, D] in q's dtype, written into `out` if given (any strides with a contiguous last
    dimension).
    """
    name = "chunk_attention"
    device = check_device(name, q, k, v, pages, start, n_valid)
    if q.dim() != 4:
        raise ValueError(f"{name}: q must be [B, H, T, D], got {list(q.shape)}")
    B, H, T, D = q.shape
    num_blocks, HKV, block_size, _ = check_pool(name, "k", k)
    check_pool(name, "v", v, HKV)
    check_shape(name, "k", k, (num_blocks, HKV, block_size, D))
    check_shape(name, "v", v, (num_blocks, HKV, block_size, D))
    max_blocks = check_pages(name, pages, B)
    check_shape(name, "start", start, (B,))
    check_shape(name, "n_valid", n_valid, (B,))
    check_qkv(name, q, k, v)
    check_dtype(name, "start", start, INDEX_DTYPES)
    check_dtype(name, "n_valid", n_valid, INDEX_DTYPES)
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"{name}: block size (k.shape[2]) must be a power of two, got {block_size}")
    G = H // HKV
    cfg = config or default_config(G * T)
    if out is None:
        out = torch.empty(B, H, T, D, dtype=q.dtype, device=device)
    else:
        check_shape(name, "out", out, (B, H, T, D))
        check_last_contiguous(name, "out", out)
    if B == 0 or T == 0:
        return out
    rows = G * T
    block_m, m_tiles = query_tiles(rows, cfg)
    block_n = cfg.block_n
    if num_splits is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        num_splits = choose_chunk_splits(B * HKV, m_tiles, max_blocks * block_size, block_n, sms)
    num_splits = max(1, min(int(num_splits), 128))
    o_part = torch.empty(B, HKV, rows, num_splits, D, dtype=torch.float32, device=device)
    lse = torch.empty(B, HKV, rows, num_splits, dtype=torch.float32, device=device)
    scale = D ** -0.5 if scale is None else float(scale)
    chunk_attention_kernel[(m_tiles, B * HKV, num_splits)](
        q, k, v, pages, start, n_valid, o_part, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        pages.stride(0), pages.stride(1),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), o_part.stride(3),
        lse.stride(0), lse.stride(1), lse.stride(2),
        HKV, T, num_splits, scale * 1.4426950408889634,
        G=G, D=D, BLOCK_M=block_m, BLOCK_N=block_n, BS=block_size,
        UPCAST=interpreting() or q.dtype == torch.float32, WHILE_LOOP=interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    merge_chunk_kernel[(B * HKV * rows,)](
        o_part, lse, out,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), o_part.stride(3),
        lse.stride(0), lse.stride(1), lse.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        HKV, T, num_splits,
        G=G, D=D, SPLITS_P=max(2, triton.next_power_of_2(num_splits)), num_warps=4,
    )
    return out
