"""Reference block summaries: element-wise min and max of the keys of every block."""

from __future__ import annotations

import torch


def block_summaries_ref(
    k: torch.Tensor, lengths: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max of the post-RoPE keys over each block of `block_size` consecutive tokens.

    k: [B, HKV, N, D] key cache (any float dtype); lengths: [B] valid tokens per row.
    Returns (kmin, kmax), each [B, HKV, NB, D] fp32 with NB = ceil(N / block_size).
    Only positions < lengths[b] are read (unwritten slots may hold anything, NaN included).
    Blocks with no valid token get kmin = +inf, kmax = -inf.
    """
    B, HKV, N, D = k.shape
    nb = -(-N // block_size)
    pad = nb * block_size - N
    kf = k.float()
    if pad:
        kf = torch.nn.functional.pad(kf, (0, 0, 0, pad))
    pos = torch.arange(nb * block_size, device=k.device)
    valid = (pos[None, :] < lengths.to(k.device)[:, None]).view(B, 1, nb, block_size, 1)
    kb = kf.view(B, HKV, nb, block_size, D)
    inf = torch.tensor(float("inf"), device=k.device)
    kmin = torch.where(valid, kb, inf).amin(dim=3)
    kmax = torch.where(valid, kb, -inf).amax(dim=3)
    return kmin, kmax


def update_summaries_ref(k_new: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, positions: torch.Tensor,
                         block_size: int) -> None:
    """Fold one appended key per row into its block summary, in place (the contract of
    `resa.kernels.update_summaries`): the key itself when it opens a block, else min/max with the
    block's summary. k_new: [B, HKV, D]; kmin, kmax: [B, HKV, NBmax, D]; positions: [B] position
    of each row's new token (< 0: the row did not append). Only the appending rows' blocks are
    read or written."""
    rows = (positions >= 0).nonzero(as_tuple=True)[0]
    if rows.numel() == 0:
        return
    pos = positions[rows].to(torch.int64)
    blk = pos // block_size
    fresh = (pos % block_size == 0)[:, None, None]
    k_tok = k_new[rows].to(kmin.dtype)
    kmin[rows, :, blk] = torch.where(fresh, k_tok, torch.minimum(kmin[rows, :, blk], k_tok))
    kmax[rows, :, blk] = torch.where(fresh, k_tok, torch.maximum(kmax[rows, :, blk], k_tok))


def refresh_summaries_ref(k: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, start: torch.Tensor,
                          end: torch.Tensor, block_size: int) -> None:
    """Recompute, in place, the summaries of exactly the blocks that positions [start[b], end[b])
    touch, from the keys at positions < end[b] (the contract of `resa.kernels.refresh_summaries`).
    k: [B, HKV, Nmax, D]; kmin, kmax: [B, HKV, NBmax, D]; start, end: [B] (end <= start: row
    untouched). Vectorised over rows: no slot >= end[b] reaches a result."""
    bs = block_size
    start, end = start.to(torch.int64), end.to(torch.int64)
    b0 = start // bs
    b1 = torch.where(end > start, (end + bs - 1) // bs, b0)
    width = int((b1 - b0).max()) if b1.numel() else 0
    if width <= 0:
        return
    B, HKV, nmax, D = k.shape
    blk = b0[:, None] + torch.arange(width, device=k.device)                   # [B, W]
    blk_ok = blk < b1[:, None]
    pos = blk[:, :, None] * bs + torch.arange(bs, device=k.device)             # [B, W, BS]
    tok_ok = (pos < end[:, None, None]) & blk_ok[:, :, None]
    idx = pos.clamp(max=nmax - 1).reshape(B, 1, width * bs, 1).expand(B, HKV, width * bs, D)
    keys = k.gather(2, idx).float().view(B, HKV, width, bs, D)
    ok = tok_ok[:, None, :, :, None]
    new_min = torch.where(ok, keys, float("inf")).amin(dim=3)                 # [B, HKV, W, D]
    new_max = torch.where(ok, keys, float("-inf")).amax(dim=3)
    rows, cols = blk_ok.nonzero(as_tuple=True)
    kmin[rows, :, blk[rows, cols]] = new_min[rows, :, cols].to(kmin.dtype)
    kmax[rows, :, blk[rows, cols]] = new_max[rows, :, cols].to(kmax.dtype)
