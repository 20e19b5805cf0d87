"""Reference attention over the KV cache: dense causal chunks and block-sparse decode."""

from __future__ import annotations

import torch


def _expand_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """[B, HKV, ...] -> [B, HKV * G, ...], query head h reading KV head h // G."""
    return x.repeat_interleave(group, dim=1)


def dense_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: torch.Tensor,
    n_valid: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention of a chunk of T queries per row over that row's cache.

    q: [B, H, T, D], query t of row b sits at position start[b] + t; k, v: [B, HKV, Nmax, D] with
    the chunk's own keys already written. Query t attends to keys j <= start[b] + t and
    j < start[b] + n_valid[b] (bottom-right aligned causal mask, ragged rows). Queries t >= n_valid[b]
    are padding; their output is finite but meaningless. No other cache slot is read.
    Returns [B, H, T, D] fp32.
    """
    B, H, T, D = q.shape
    HKV, nmax = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    start = start.to(device=q.device, dtype=torch.int64)
    end = start + n_valid.to(device=q.device, dtype=torch.int64)
    pos_j = torch.arange(nmax, device=q.device)
    pos_q = start[:, None] + torch.arange(T, device=q.device)[None, :]
    allowed = (pos_j[None, None, :] <= pos_q[:, :, None]) & (pos_j[None, None, :] < end[:, None, None])
    key_ok = (pos_j[None, :] < end[:, None])[:, None, :, None]
    kf = torch.where(key_ok, k.float(), 0.0)
    vf = torch.where(key_ok, v.float(), 0.0)
    kf, vf = _expand_groups(kf, H // HKV), _expand_groups(vf, H // HKV)
    s = torch.einsum("bhtd,bhnd->bhtn", q.float(), kf) * scale
    return _masked_softmax_av(s, allowed[:, None], vf)


def _masked_softmax_av(s: torch.Tensor, allowed: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(s over allowed keys) @ v; a query with no allowed key gets zeros."""
    s = torch.where(allowed, s, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    return (p @ v) / torch.where(denom > 0, denom, 1.0)


def sparse_decode_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    block_table: torch.Tensor,
    block_size: int,
    scale: float | None = None,
) -> torch.Tensor:
    """One decode query per row attending only to the tokens of its selected blocks.

    q: [B, H, D]; k, v: [B, HKV, Nmax, D]; lengths: [B] (the current token included);
    block_table: [B, HKV, S] int block indices, -1 = unused slot; every length must be >= 1. All G query heads of a KV group
    share the group's blocks. Tokens at positions >= lengths[b] inside a selected block are masked;
    nothing outside the selected blocks is read. Returns [B, H, D] fp32.
    """
    B, H, D = q.shape
    HKV = k.shape[1]
    S = block_table.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    table = block_table.to(device=q.device, dtype=torch.int64)
    offs = torch.arange(block_size, device=q.device)
    tok = (table.clamp(min=0)[..., None] * block_size + offs).view(B, HKV, S * block_size)
    ok = (table >= 0)[..., None].expand(B, HKV, S, block_size).reshape(B, HKV, S * block_size)
    ok = ok & (tok < lengths.to(q.device)[:, None, None])
    # Unused slots gather token 0 (always written: lengths >= 1) and are masked out of the softmax,
    # so no unwritten slot is ever read.
    gidx = torch.where(ok, tok, 0)[..., None].expand(B, HKV, S * block_size, D)
    kg = torch.gather(k, 2, gidx).float()
    vg = torch.gather(v, 2, gidx).float()
    G = H // HKV
    qg = q.float().view(B, HKV, G, D)
    s = torch.einsum("bkgd,bknd->bkgn", qg, kg) * scale
    out = _masked_softmax_av(s, ok[:, :, None, :], vg)
    return out.reshape(B, H, D)
