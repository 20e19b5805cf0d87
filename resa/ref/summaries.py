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
