"""The references on the paged KV pool: each row's logical blocks are looked up through its block
table, then the contiguous references of this package do the math.

Pool layers: k, v [NBLK, HKV, BS, D]; summaries kmin, kmax [NBLK, HKV, D]; pages [B, max_blocks]
(logical block j of row b is physical block pages[b, j]). Only blocks a row holds below its
length are read, and writes touch exactly the blocks of the positions written.
"""

from __future__ import annotations

import torch

from .attention import _masked_softmax_av


def gather_blocks(pool: torch.Tensor, pages: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """The logical view of rows' first `num_blocks` blocks: pool [NBLK, HKV, BS, D] ->
    [B, HKV, num_blocks * BS, D] (a copy). Table entries past a row's held blocks gather
    whatever they name; callers mask those positions."""
    blocks = pool[pages[:, :num_blocks].long()]                  # [B, nb, HKV, BS, D]
    B, nb, HKV, BS, D = blocks.shape
    return blocks.permute(0, 2, 1, 3, 4).reshape(B, HKV, nb * BS, D)


def gather_summaries(pool: torch.Tensor, pages: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Summaries of rows' first `num_blocks` logical blocks: [NBLK, HKV, D] -> [B, HKV, num_blocks, D]."""
    return pool[pages[:, :num_blocks].long()].transpose(1, 2)


def token_slots(pages: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, block_size: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(physical block, offset in it) of token pos[i] of row rows[i] (any matching shapes)."""
    return pages[rows, pos // block_size].long(), pos % block_size


def write_slots(pool: torch.Tensor, slots: tuple[torch.Tensor, torch.Tensor], values: torch.Tensor) -> None:
    """pool[slot i] = values[i] ([..., HKV, D]) for the `token_slots` of some tokens."""
    phys, off = slots
    pool[phys, :, off] = values.to(pool.dtype)


def update_summaries_paged_ref(k_new: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, pages: torch.Tensor,
                               positions: torch.Tensor, block_size: int) -> None:
    """`resa.ref.update_summaries_ref` on the pool: row b's new key k_new[b] ([B, HKV, D]) at
    positions[b] (< 0: none) starts or extends the summary of physical block
    pages[b, positions[b] // BS]."""
    rows = (positions >= 0).nonzero(as_tuple=True)[0]
    if rows.numel() == 0:
        return
    phys, off = token_slots(pages, rows, positions[rows].to(torch.int64), block_size)
    fresh = (off == 0)[:, None, None]
    k_tok = k_new[rows].to(kmin.dtype)
    kmin[phys] = torch.where(fresh, k_tok, torch.minimum(kmin[phys], k_tok))
    kmax[phys] = torch.where(fresh, k_tok, torch.maximum(kmax[phys], k_tok))


def refresh_summaries_paged_ref(k: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, pages: torch.Tensor,
                                start: torch.Tensor, end: torch.Tensor) -> None:
    """`resa.ref.refresh_summaries_ref` on the pool: the logical blocks positions [start[b], end[b])
    touch get the min/max of their keys below end[b]. k: [NBLK, HKV, BS, D]."""
    bs = k.shape[2]
    start, end = start.to(torch.int64), end.to(torch.int64)
    b0 = start // bs
    b1 = torch.where(end > start, (end + bs - 1) // bs, b0)
    rows, = (b1 > b0).nonzero(as_tuple=True)
    if rows.numel() == 0:
        return
    counts = (b1 - b0)[rows]
    row_of = rows.repeat_interleave(counts)                                      # one entry per touched block
    first = torch.cumsum(counts, 0) - counts
    blk = b0[row_of] + torch.arange(int(counts.sum()), device=k.device) - first.repeat_interleave(counts)
    phys = pages[row_of, blk].long()
    keys = k[phys].float()                                                       # [N, HKV, BS, D]
    ok = (blk[:, None] * bs + torch.arange(bs, device=k.device) < end[row_of][:, None])[:, None, :, None]
    kmin[phys] = torch.where(ok, keys, float("inf")).amin(dim=2).to(kmin.dtype)
    kmax[phys] = torch.where(ok, keys, float("-inf")).amax(dim=2).to(kmax.dtype)


def sparse_decode_paged_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pages: torch.Tensor,
                            lengths: torch.Tensor, block_table: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """`resa.ref.sparse_decode_ref` on the pool: one query per row over the tokens (< lengths[b])
    of the logical blocks block_table [B, HKV, S] selects (-1 unused), read from their physical
    blocks. q: [B, H, D]; k, v: [NBLK, HKV, BS, D]. Returns [B, H, D] fp32."""
    B, H, D = q.shape
    _, HKV, bs, _ = k.shape
    S = block_table.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    table = block_table.to(device=q.device, dtype=torch.int64)
    used = table >= 0
    phys = pages.long().gather(1, table.clamp(min=0).view(B, HKV * S)).view(B, HKV, S)
    # Unused slots read the row's first block (held: every length is >= 1) and are masked out.
    phys = torch.where(used, phys, pages[:, :1].long()[:, :, None])
    heads = torch.arange(HKV, device=q.device)[None, :, None]
    kg = k[phys, heads].float().reshape(B, HKV, S * bs, D)                     # [B, HKV, S*BS, D]
    vg = v[phys, heads].float().reshape(B, HKV, S * bs, D)
    tok = (table[..., None] * bs + torch.arange(bs, device=q.device)).view(B, HKV, S * bs)
    ok = used[..., None].expand(B, HKV, S, bs).reshape(B, HKV, S * bs) & (tok < lengths.to(q.device)[:, None, None])
    kg = torch.where(ok[..., None], kg, 0.0)
    vg = torch.where(ok[..., None], vg, 0.0)
    qg = q.float().view(B, HKV, H // HKV, D)
    s = torch.einsum("bkgd,bknd->bkgn", qg, kg) * scale
    return _masked_softmax_av(s, ok[:, :, None, :], vg).reshape(B, H, D)
