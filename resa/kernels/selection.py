"""Block selection (the GBSA plan, docs/method.md 2.2-2.6) as Triton kernels, without host sync.

The summaries live per physical block of the paged cache, kmin, kmax [num_blocks, HKV, D]; row b's
logical block j is physical block pages[b, j]. Scores, keys and the output table are indexed by
logical block: the scoring pass reads the summary of logical block j from kmin[pages[b, j]],
loading the page ids of a tile (only those of valid blocks, j < ceil(len / BS)) as one vector.

Layout of the work:
- `select_blocks_kernel`, grid (B * HKV, chunks): pools the G queries of a group (their mean, or
  with POOL_MAX the largest of the heads' own bounds), scores a chunk of a row's logical
  blocks from the min/max summaries and writes each score as an order-preserving int32 key to a
  scratch row. With FUSED, every program then bumps a per-row counter; the program that finishes
  a row last runs the exact top-n of that row (one launch in all). The counter is reset by that
  program, so the scratch counters stay zero between calls.
- `select_topn_kernel`, grid (B * HKV): the same top-n as a second launch (the two-pass variant,
  the default: faster on H100 because the scoring pass keeps 4 warps a program).
The top-n holds a whole row of keys in registers, bisects the threshold key (stopping as soon as
exactly n keys clear it), breaks ties by lowest block index, and compacts the chosen indices into
ascending order with a prefix sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..config import GROUP_POOLS
from ..ref.selection import block_budget, ratio_ppm
from ._common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_device,
    check_dtype,
    check_last_contiguous,
    check_pages,
    check_shape,
    interpreting,
)

# Rows of more blocks than this do not fit the register-resident top-n; they fall back to torch.topk
# over the kernel's keys (512K tokens at block 16 still fit).
MAX_TOPN_BLOCKS = 32768
METHODS = ("two_pass", "fused", "torch", "scores")
TOPN = ("bisect", "interp", "radix")


@triton.jit
def _score_to_key(s):
    """fp32 score -> int32 key with the same order (NaN sorts just above the 'invalid' key)."""
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = tl.minimum(tl.maximum(key, -2147483647), 2147483646)
    return tl.where(s != s, -2147483647, key)


@triton.jit
def _count_ge(key, key_t, t):
    """Keys >= t in both parts of a row."""
    return tl.sum((key >= t).to(tl.int32)) + tl.sum((key_t >= t).to(tl.int32))


@triton.jit
def _threshold_bisect(key, inb, key_t, inb_t, nb, n, nloc, INTERP: tl.constexpr):
    """Largest t with count(key >= t) >= n. Returns (t, count(key >= t)).

    Each round costs one pass over the row held in registers plus one block reduction, so the
    number of rounds is what matters. Plain bisection halves the key interval per round (~20
    rounds). INTERP guesses where the count crosses n by linear interpolation between the interval
    ends (keys of nearby floats are linear in the value) and probes two keys around the guess in
    the same reduction; when a round fails to bracket the crossing, the next one probes around
    the midpoint, so the interval still at least halves every two rounds. Both stop as soon as
    exactly n keys clear the lower end. The row comes in two parts (key, key_t: see `_topn_row`);
    INTERP needs the tail empty."""
    valid_other = inb & (key != 2147483647)
    valid_other_t = inb_t & (key_t != 2147483647)
    lo = tl.minimum(tl.min(tl.where(inb, key, 2147483647)), tl.min(tl.where(inb_t, key_t, 2147483647))).to(tl.int64)
    # The answer is INT_MAX when the forced local blocks alone fill the budget; otherwise it is
    # at most the largest non-local key.
    top = tl.maximum(tl.max(tl.where(valid_other, key, -2147483648)),
                     tl.max(tl.where(valid_other_t, key_t, -2147483648)))
    hi = tl.where(n <= nloc, 2147483647, top).to(tl.int64)
    hi = tl.maximum(hi, lo)
    c_lo = nb
    c_up = tl.where(n <= nloc, 0, nloc)  # count(key >= hi + 1)
    if INTERP:
        pair = tl.arange(0, 2)
        bracketed = 1
        while (lo < hi) & (c_lo != n):
            span = hi + 1 - lo
            guess = lo + (span * (c_lo - n).to(tl.int64)) // tl.maximum(c_lo - c_up, 1).to(tl.int64)
            guess = tl.where(bracketed != 0, guess, lo + (span >> 1))
            delta = tl.maximum(span >> 6, 1)
            cand = tl.minimum(tl.maximum(guess - delta + 2 * delta * pair, lo + 1), hi)  # [2], ascending
            cnt = tl.sum((key[None, :] >= cand.to(tl.int32)[:, None]).to(tl.int32), 1)
            ok = cnt >= n
            k = tl.sum(ok.to(tl.int32), 0)
            lo_new = tl.max(tl.where(ok, cand, lo), 0)
            c_lo = tl.where(k > 0, tl.min(tl.where(ok, cnt, nb), 0), c_lo)
            up_new = tl.min(tl.where(ok, hi + 1, cand), 0)
            c_up = tl.where(k < 2, tl.max(tl.where(ok, 0, cnt), 0), c_up)
            bracketed = (k == 1).to(tl.int32)
            lo = lo_new
            hi = tl.minimum(hi, up_new - 1)
    else:
        while (lo < hi) & (c_lo != n):
            mid = (lo + hi + 1) >> 1
            c = _count_ge(key, key_t, mid.to(tl.int32))
            take = c >= n
            lo = tl.where(take, mid, lo)
            c_lo = tl.where(take, c, c_lo)
            hi = tl.where(take, hi, mid - 1)
    return lo.to(tl.int32), c_lo


@triton.jit
def _radix_pass(ukey, cand, need, prefix, SHIFT: tl.constexpr, WIDTH: tl.constexpr):
    """One digit of the radix select: the largest digit d such that at least `need` candidates
    have a digit >= d; candidates narrow to digit == d and `need` drops by those above it."""
    digit = (ukey >> SHIFT) & ((1 << WIDTH) - 1)
    hist = tl.histogram(digit, 1 << WIDTH, mask=cand)
    ge = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # candidates with digit >= d
    d = tl.sum((ge >= need).to(tl.int32), 0) - 1
    d = tl.minimum(tl.maximum(d, 0), (1 << WIDTH) - 1)
    bins = tl.arange(0, 1 << WIDTH)
    need -= tl.sum(tl.where(bins > d, hist, 0), 0)
    return cand & (digit == d), need, (prefix << WIDTH) | d


@triton.jit
def _threshold_radix(key, inb, n):
    """The same threshold by radix select: histograms over 11, 11 and 10 bits of the key (as
    unsigned), each pass keeping only the keys that share the digits found so far."""
    ukey = key ^ -2147483648  # signed order -> unsigned bit order
    prefix = tl.zeros([], tl.int32)
    cand, need, prefix = _radix_pass(ukey, inb, n, prefix, 21, 11)
    cand, need, prefix = _radix_pass(ukey, cand, need, prefix, 10, 11)
    cand, need, prefix = _radix_pass(ukey, cand, need, prefix, 0, 10)
    return prefix ^ -2147483648


@triton.jit
def _topn_row(keys_row, table_row, stride_ts, nsel_ptr, write_nsel, nb, num_slots, ppm, min_blocks,
              local_blocks, BLOCK_NB: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
              RADIX: tl.constexpr, WAYS: tl.constexpr):
    """Exact top-n of one (row, KV head): keys_row[0:nb] -> table_row[0:S] ascending, then -1.

    The row is held in registers as two parts, keys [0, BLOCK_NB) and a tail [BLOCK_NB,
    BLOCK_NB + BLOCK_T), both powers of two: a row just past a power of two (a 256K context plus
    the generated tokens) then costs BLOCK_NB + a small tail instead of twice BLOCK_NB. Only the
    bisection reads the tail; the interpolation and radix variants are launched with an empty one.
    """
    # resa.ref.selection.block_budget in integer arithmetic (ppm: parts per RATIO_SCALE = 10^6).
    n = tl.maximum((nb.to(tl.int64) * ppm + 999999) // 1000000, tl.minimum(nb, min_blocks).to(tl.int64))
    n = tl.minimum(n, nb.to(tl.int64)).to(tl.int32)
    offs = tl.arange(0, BLOCK_NB)
    offs_t = BLOCK_NB + tl.arange(0, BLOCK_T)
    inb = offs < nb
    inb_t = offs_t < nb
    # .cg: the keys were written by other programs of this launch; read them from L2, not L1.
    key = tl.load(keys_row + offs, mask=inb, other=-2147483648, cache_modifier=".cg")
    key_t = tl.load(keys_row + offs_t, mask=inb_t, other=-2147483648, cache_modifier=".cg")
    key = tl.where(inb & (offs >= nb - local_blocks), 2147483647, key)
    key_t = tl.where(inb_t & (offs_t >= nb - local_blocks), 2147483647, key_t)
    if RADIX:
        t = _threshold_radix(key, inb, n)
        c_t = n + 1
    else:
        t, c_t = _threshold_bisect(key, inb, key_t, inb_t, nb, n, tl.minimum(local_blocks, nb), WAYS == 2)
    if c_t == n:
        # Exactly n keys are >= t (the usual case with distinct scores): no ties to break.
        sel = inb & (key >= t) & (n > 0)
        sel_t = inb_t & (key_t >= t) & (n > 0)
    else:
        gt = inb & (key > t) & (n > 0)
        gt_t = inb_t & (key_t > t) & (n > 0)
        need = n - tl.sum(gt.to(tl.int32)) - tl.sum(gt_t.to(tl.int32))
        eq = (inb & (key == t)).to(tl.int32)
        eq_t = (inb_t & (key_t == t)).to(tl.int32)
        sel = gt | ((eq != 0) & (tl.cumsum(eq, 0) <= need))
        sel_t = gt_t | ((eq_t != 0) & (tl.cumsum(eq_t, 0) + tl.sum(eq) <= need))
    sel_i = sel.to(tl.int32)
    pos = tl.cumsum(sel_i, 0) - 1
    tl.store(table_row + pos.to(tl.int64) * stride_ts, offs.to(tl.int32), mask=sel)
    sel_ti = sel_t.to(tl.int32)
    pos_t = tl.sum(sel_i) + tl.cumsum(sel_ti, 0) - 1
    tl.store(table_row + pos_t.to(tl.int64) * stride_ts, offs_t.to(tl.int32), mask=sel_t)
    # A while loop: run-time range bounds do not work in Triton's interpreter (numpy >= 2.4).
    s0 = n // BLOCK_S * BLOCK_S
    while s0 < num_slots:
        slot = s0 + tl.arange(0, BLOCK_S)
        tl.store(table_row + slot.to(tl.int64) * stride_ts, tl.full([BLOCK_S], -1, tl.int32),
                 mask=(slot >= n) & (slot < num_slots))
        s0 += BLOCK_S
    if write_nsel:
        tl.store(nsel_ptr, n)


@triton.jit
def select_blocks_kernel(
    q_ptr, kmin_ptr, kmax_ptr, pages_ptr, lens_ptr, keys_ptr, count_ptr, table_ptr, nsel_ptr,
    stride_qb, stride_qh,
    stride_sp, stride_sh,
    stride_pb, stride_pj,
    stride_tb, stride_th, stride_ts,
    num_kv_heads, nbmax, num_slots, ppm, min_blocks, local_blocks, chunks,
    G: tl.constexpr, G_P: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
    BLOCK_B: tl.constexpr, TILES: tl.constexpr, BLOCK_NB: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_S: tl.constexpr, FUSED: tl.constexpr, RADIX: tl.constexpr, WAYS: tl.constexpr,
    POOL_MAX: tl.constexpr,
):
    """Score logical blocks [chunk * TILES * BLOCK_B, ...) of row (b, hk); with FUSED also select.
    POOL_MAX: a block's score is the largest of the G heads' own bounds, else the bound of the
    group's mean query.

    q: [B, H, D]; kmin, kmax: [NBLK, HKV, D] per physical block (same strides); pages:
    [B, NBmax] block table (logical block j of row b at physical block pages[b, j]); keys:
    [B * HKV, NBmax] int32 scratch, by logical block; count: [B * HKV] int32, zero on entry and on
    exit; table: [B, HKV, S] logical block ids; nsel: [B]. Only the page ids and summaries of valid
    blocks (j < ceil(len / BS)) are read.
    """
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    b = row // num_kv_heads
    hk = row % num_kv_heads
    length = tl.load(lens_ptr + b).to(tl.int32)
    nb = (length + BS - 1) // BS
    offs_g = tl.arange(0, G_P)
    offs_d = tl.arange(0, D)
    q_rows = q_ptr + b.to(tl.int64) * stride_qb + (hk * G + offs_g).to(tl.int64)[:, None] * stride_qh
    q = tl.load(q_rows + offs_d[None, :], mask=offs_g[:, None] < G, other=0.0).to(tl.float32)
    qg = (tl.sum(q, 0) / G)[None, :]
    s_head = hk.to(tl.int64) * stride_sh
    pages_row = pages_ptr + b.to(tl.int64) * stride_pb
    keys_row = keys_ptr + row.to(tl.int64) * nbmax
    for t in range(TILES):
        blk = (chunk * TILES + t) * BLOCK_B + tl.arange(0, BLOCK_B)
        ok = blk < nb
        # The tile's physical block ids in one vector load; invalid blocks' entries are never read.
        page = tl.load(pages_row + blk.to(tl.int64) * stride_pj, mask=ok, other=0).to(tl.int64)
        offs = page[:, None] * stride_sp + s_head + offs_d[None, :]
        kmn = tl.load(kmin_ptr + offs, mask=ok[:, None], other=0.0).to(tl.float32)
        kmx = tl.load(kmax_ptr + offs, mask=ok[:, None], other=0.0).to(tl.float32)
        if POOL_MAX:
            # Head g's bound sum_d max(q_d * kmax_d, q_d * kmin_d) = max(q, 0) . kmax + min(q, 0) . kmin
            # (kmax >= kmin): two multiply-adds an element; each head's row is read straight from q.
            s = tl.full([BLOCK_B], float("-inf"), tl.float32)
            for g in tl.static_range(G):
                qh = tl.load(q_ptr + b.to(tl.int64) * stride_qb + (hk * G + g).to(tl.int64) * stride_qh
                             + offs_d).to(tl.float32)[None, :]
                s = tl.maximum(s, tl.sum(tl.maximum(qh, 0.0) * kmx + tl.minimum(qh, 0.0) * kmn, 1))
        else:
            s = tl.sum(tl.maximum(qg * kmx, qg * kmn), 1)
        tl.store(keys_row + blk, _score_to_key(s), mask=ok)
    if FUSED:
        # All threads' key stores are issued before the one release-atomic of this program.
        tl.debug_barrier()
        done = tl.atomic_add(count_ptr + row, 1, sem="acq_rel", scope="gpu")
        if done == chunks - 1:
            table_row = table_ptr + b.to(tl.int64) * stride_tb + hk.to(tl.int64) * stride_th
            _topn_row(keys_row, table_row, stride_ts, nsel_ptr + b, hk == 0, nb, num_slots, ppm,
                      min_blocks, local_blocks, BLOCK_NB, BLOCK_T, BLOCK_S, RADIX, WAYS)
            tl.atomic_xchg(count_ptr + row, 0)


@triton.jit
def select_topn_kernel(
    lens_ptr, keys_ptr, table_ptr, nsel_ptr,
    stride_tb, stride_th, stride_ts,
    num_kv_heads, nbmax, num_slots, ppm, min_blocks, local_blocks,
    BS: tl.constexpr, BLOCK_NB: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
    RADIX: tl.constexpr, WAYS: tl.constexpr,
):
    """Top-n of one (row, KV head) from the keys `select_blocks_kernel` wrote (two-pass variant)."""
    row = tl.program_id(0)
    b = row // num_kv_heads
    hk = row % num_kv_heads
    length = tl.load(lens_ptr + b).to(tl.int32)
    nb = (length + BS - 1) // BS
    table_row = table_ptr + b.to(tl.int64) * stride_tb + hk.to(tl.int64) * stride_th
    _topn_row(keys_ptr + row.to(tl.int64) * nbmax, table_row, stride_ts, nsel_ptr + b, hk == 0, nb,
              num_slots, ppm, min_blocks, local_blocks, BLOCK_NB, BLOCK_T, BLOCK_S, RADIX, WAYS)


def topn_parts(nbmax: int, topn: str = "bisect") -> tuple[int, int]:
    """Register parts of a top-n row of nbmax keys: (main, tail), powers of two with main + tail >=
    nbmax. The bisection splits a row just past a power of two into that power and a small tail;
    the other variants keep one part (tail 16, always empty)."""
    whole = triton.next_power_of_2(nbmax)
    if topn != "bisect" or whole == nbmax or whole < 64:
        return whole, 16
    main = whole // 2
    tail = max(16, triton.next_power_of_2(nbmax - main))
    return (main, tail) if tail < main else (whole, 16)


@dataclass(frozen=True)
class ScoreConfig:
    """Launch shape of the scoring pass: summary blocks per tile, tiles per program (at most),
    warps (the fused variant uses at least what its top-n needs)."""

    blocks_per_tile: int = 64
    max_tiles: int = 1
    num_warps: int = 4

    def __post_init__(self) -> None:
        if self.blocks_per_tile < 1 or self.blocks_per_tile & (self.blocks_per_tile - 1) or self.max_tiles < 1:
            raise ValueError(f"blocks_per_tile must be a power of two and max_tiles >= 1, got {self}")


# The short list the benchmark sweeps.
SCORE_CONFIGS = (ScoreConfig(64, 1, 4), ScoreConfig(64, 4, 4), ScoreConfig(128, 1, 8), ScoreConfig(32, 2, 4))


@dataclass(frozen=True)
class SelectionWorkspace:
    """Scratch of `select_blocks`, preallocated once per cache shape (so calls can be graph-captured).

    keys: [B * HKV, NBmax] int32 keys of each row's logical blocks (NBmax: the block table's width,
    pages.shape[1]); counters: [B * HKV] int32, zero between calls.
    """

    keys: torch.Tensor
    counters: torch.Tensor

    @classmethod
    def allocate(cls, batch: int, num_kv_heads: int, nbmax: int, device: torch.device | str) -> "SelectionWorkspace":
        rows = batch * num_kv_heads
        return cls(torch.empty(rows, max(nbmax, 1), dtype=torch.int32, device=device),
                   torch.zeros(rows, dtype=torch.int32, device=device))


def _topn_torch(keys, lengths, table, nsel, *, block_size, active_ratio, min_blocks, local_blocks):
    """torch.topk over the kernel's keys (baseline and fallback for very long rows); no host sync."""
    B, HKV, S = table.shape
    nbmax = keys.shape[1]
    dev = keys.device
    nb = (lengths.to(torch.int64) + block_size - 1) // block_size
    n = block_budget(nb, active_ratio, min_blocks)
    idx = torch.arange(nbmax, device=dev)
    k = keys.reshape(B, HKV, nbmax)
    k = torch.where(idx < nb[:, None, None], k, torch.iinfo(torch.int32).min)
    local = (idx >= nb[:, None, None] - local_blocks) & (idx < nb[:, None, None])
    k = torch.where(local, torch.iinfo(torch.int32).max, k)
    width = min(S, nbmax)
    top = torch.topk(k, width, dim=-1, sorted=True).indices
    keep = torch.arange(width, device=dev) < n[:, None, None]
    top = torch.where(keep, top, nbmax).sort(dim=-1).values
    table.fill_(-1)
    table[..., :width] = torch.where(top == nbmax, -1, top).to(torch.int32)
    nsel.copy_(n.to(torch.int32))


def select_blocks(
    q: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    pages: torch.Tensor,
    lengths: torch.Tensor,
    *,
    block_size: int,
    active_ratio: float,
    min_blocks: int,
    local_blocks: int = 1,
    num_slots: int | None = None,
    method: str = "two_pass",
    topn: str = "bisect",
    workspace: SelectionWorkspace | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    score_config: "ScoreConfig | None" = None,
    group_pool: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose, per (row, KV head), the blocks a decode query attends to; same contract as
    `resa.ref.select_blocks_ref` (group_pool included), without a host sync.

    q: [B, H, D] post-RoPE queries (fp16/bf16/fp32); kmin, kmax: [NBLK, HKV, D] summaries per
    physical block of the paged cache (same dtype and strides, last dimension contiguous); pages:
    [B, NBmax] int32/int64 block table on q's device, logical block j of row b (tokens j*BS ..
    j*BS+BS-1) summarised at kmin[pages[b, j]]; only entries j < ceil(lengths[b] / BS) are read,
    so ceil(lengths[b] / BS) <= NBmax; lengths: [B] int32/int64, the current token included.
    Row b keeps n_b = block_budget(ceil(lengths[b] / BS), active_ratio, min_blocks) blocks:
    its last `local_blocks` always, the rest by top score (ties: lowest block index).
    num_slots: S, the table width, required (no host sync to derive it): at least the largest n_b,
    e.g. `block_budget(NBmax, ...)`. Returns (block_table [B, HKV, S] int32 logical block ids,
    ascending then -1, num_selected [B] int32), written into `out` when given. workspace: a
    `SelectionWorkspace` of at least [B * HKV, NBmax] keys (allocated when None).
    method: "two_pass" (score, then top-n: fastest on H100 at every measured shape), "fused" (one
    launch, but the scoring pass then runs with the top-n's 16 warps) or "torch" (score, then
    torch.topk); docs/kernels.md has the numbers;
    "scores" only writes the workspace keys (a benchmark aid: table and counts are left unwritten).
    score_config: launch shape of the scoring pass (default ScoreConfig()).
    topn: how the in-kernel top-n finds its threshold (same result): "bisect" (default),
    "interp" (interpolation search: fewer rounds but two probes each; slower on H100) or "radix"
    (histograms; much slower). Both alternatives are kept as measured baselines.
    """
    name = "select_blocks"
    if num_slots is None:
        raise ValueError(f"{name}: num_slots is required (the table width; deriving it would sync the host)")
    if method not in METHODS:
        raise ValueError(f"{name}: method must be one of {', '.join(METHODS)}, got {method!r}")
    if topn not in TOPN:
        raise ValueError(f"{name}: topn must be one of {', '.join(TOPN)}, got {topn!r}")
    if group_pool not in GROUP_POOLS:
        raise ValueError(f"{name}: group_pool must be one of {', '.join(GROUP_POOLS)}, got {group_pool!r}")
    device = check_device(name, q, kmin, kmax, pages, lengths)
    if q.dim() != 3 or kmin.dim() != 3:
        raise ValueError(f"{name}: q must be [B, H, D] and kmin [num_blocks, HKV, D], "
                         f"got {list(q.shape)}, {list(kmin.shape)}")
    B, H, D = q.shape
    HKV = kmin.shape[1]
    check_shape(name, "kmin", kmin, (kmin.shape[0], HKV, D))
    check_shape(name, "kmax", kmax, tuple(kmin.shape))
    nbmax = check_pages(name, pages, B)
    check_shape(name, "lengths", lengths, (B,))
    for what, t in (("q", q), ("kmin", kmin), ("kmax", kmax)):
        check_dtype(name, what, t, FLOAT_DTYPES)
        check_last_contiguous(name, what, t)
    check_dtype(name, "lengths", lengths, INDEX_DTYPES)
    if kmin.stride() != kmax.stride():
        raise ValueError(f"{name}: kmin and kmax must have the same strides")
    if kmax.dtype != kmin.dtype:
        raise TypeError(f"{name}: kmin and kmax must have the same dtype")
    if H % HKV:
        raise ValueError(f"{name}: {H} query heads are not a multiple of {HKV} KV heads")
    if D not in (64, 128, 256):
        raise ValueError(f"{name}: head dim {D} unsupported (64, 128, 256)")
    if block_size < 1 or num_slots < 0 or local_blocks < 0 or min_blocks < 0:
        raise ValueError(f"{name}: block_size >= 1 and num_slots, local_blocks, min_blocks >= 0 needed")
    G = H // HKV
    if out is None:
        table = torch.empty(B, HKV, num_slots, dtype=torch.int32, device=device)
        nsel = torch.empty(B, dtype=torch.int32, device=device)
    else:
        table, nsel = out
        check_shape(name, "out block_table", table, (B, HKV, num_slots))
        check_shape(name, "out num_selected", nsel, (B,))
        if table.dtype != torch.int32 or nsel.dtype != torch.int32:
            raise TypeError(f"{name}: out tensors must be int32")
    if workspace is None:
        workspace = SelectionWorkspace.allocate(B, HKV, nbmax, device)
    elif workspace.keys.shape[0] != B * HKV or workspace.keys.shape[1] < nbmax:
        raise ValueError(f"{name}: workspace is for {list(workspace.keys.shape)} keys, need [{B * HKV}, >= {nbmax}]")
    if B == 0 or nbmax == 0:
        table.fill_(-1)
        nsel.zero_()
        return table, nsel
    block_nb, block_t = topn_parts(nbmax, topn)
    if block_nb + block_t > MAX_TOPN_BLOCKS and method in ("fused", "two_pass"):
        method = "torch"
    ppm = ratio_ppm(active_ratio)
    ways = 1 if topn == "bisect" else 2
    sc = score_config or ScoreConfig()
    # Up to max_tiles tiles a program, but at least ~64 programs per row so batch 1 fills the GPU.
    block_b = 16 if interpreting() else sc.blocks_per_tile
    tiles = 1 if interpreting() else max(1, min(sc.max_tiles, triton.cdiv(nbmax, block_b * 64)))
    chunks = triton.cdiv(nbmax, block_b * tiles)
    fused = method == "fused"
    # The top-n holds a whole row in registers: 32 keys a thread at most.
    topn_warps = max(4, min(16, block_nb // 1024))
    block_s = min(1024, triton.next_power_of_2(max(num_slots, 1)))
    wkeys = workspace.keys
    select_blocks_kernel[(B * HKV, chunks)](
        q, kmin, kmax, pages, lengths, wkeys, workspace.counters, table, nsel,
        q.stride(0), q.stride(1),
        kmin.stride(0), kmin.stride(1),
        pages.stride(0), pages.stride(1),
        table.stride(0), table.stride(1), table.stride(2),
        HKV, wkeys.shape[1], num_slots, ppm, min_blocks, local_blocks, chunks,
        G=G, G_P=triton.next_power_of_2(G), D=D, BS=block_size,
        BLOCK_B=block_b, TILES=tiles, BLOCK_NB=block_nb if fused else 16, BLOCK_T=block_t if fused else 16,
        BLOCK_S=block_s,
        FUSED=fused, RADIX=topn == "radix", WAYS=ways, POOL_MAX=group_pool == "max",
        num_warps=max(topn_warps, sc.num_warps) if fused else sc.num_warps,
    )
    if method == "two_pass":
        select_topn_kernel[(B * HKV,)](
            lengths, wkeys, table, nsel,
            table.stride(0), table.stride(1), table.stride(2),
            HKV, wkeys.shape[1], num_slots, ppm, min_blocks, local_blocks,
            BS=block_size, BLOCK_NB=block_nb, BLOCK_T=block_t, BLOCK_S=block_s, RADIX=topn == "radix", WAYS=ways,
            num_warps=topn_warps,
        )
    elif method == "torch":
        _topn_torch(wkeys[:, :nbmax], lengths, table, nsel, block_size=block_size, active_ratio=active_ratio,
                    min_blocks=min_blocks, local_blocks=local_blocks)
    return table, nsel
