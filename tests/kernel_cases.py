"""Shared inputs and low-precision baselines of the kernel tests."""

from __future__ import annotations

import torch

from resa.ref import block_scores_ref, block_summaries_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BS = 16


def make_inputs(lengths, hkv, g, d, dtype, seed=0, nbmax=None):
    """Random queries and bf16/fp16 summaries of random keys; summaries of blocks past a row's
    length are NaN (the kernel must not read them)."""
    gen = torch.Generator().manual_seed(seed)
    B = len(lengths)
    nmax = max(max(lengths), 1)
    k = torch.randn(B, hkv, nmax, d, generator=gen)
    lens = torch.tensor(lengths, dtype=torch.int64)
    kmin, kmax = block_summaries_ref(k, lens, BS)
    nb = kmin.shape[2] if nbmax is None else nbmax
    pad = nb - kmin.shape[2]
    kmin = torch.nn.functional.pad(kmin, (0, 0, 0, pad), value=float("nan"))
    kmax = torch.nn.functional.pad(kmax, (0, 0, 0, pad), value=float("nan"))
    dead = (torch.arange(nb)[None, :] >= ((lens + BS - 1) // BS)[:, None])[:, None, :, None]
    kmin = torch.where(dead, float("nan"), kmin).to(dtype)
    kmax = torch.where(dead, float("nan"), kmax).to(dtype)
    q = torch.randn(B, hkv * g, d, generator=gen).to(dtype)
    return q.to(DEVICE), kmin.to(DEVICE), kmax.to(DEVICE), lens.to(DEVICE)


def assert_same_selection(table, nsel, ref_table, ref_nsel, q, kmin, kmax, lens, local_blocks, group_pool="mean"):
    """Same budgets; same block sets, except that blocks whose scores tie the threshold within
    fp32 rounding (summation order differs) may be swapped."""
    assert torch.equal(nsel.cpu(), ref_nsel.cpu())
    table, ref_table = table.cpu(), ref_table.cpu()
    B, HKV, S = ref_table.shape
    assert table.shape == ref_table.shape
    scores = block_scores_ref(q.cpu(), kmin.cpu(), kmax.cpu(), group_pool)
    for b in range(B):
        n = int(ref_nsel[b])
        nb = -(-int(lens[b]) // BS)
        for h in range(HKV):
            got, want = table[b, h], ref_table[b, h]
            assert (got[n:] == -1).all(), f"row {b} head {h}: unused slots must be -1"
            if n == 0:
                continue
            assert torch.all(got[1:n] > got[: n - 1]), f"row {b} head {h}: not strictly ascending"
            assert got[:n].min() >= 0 and got[:n].max() < nb
            assert set(range(max(nb - local_blocks, 0), nb)) <= set(got[:n].tolist())
            diff = set(got[:n].tolist()) ^ set(want[:n].tolist())
            if diff:
                s = scores[b, h]
                chosen = [i for i in want[:n].tolist() if i < nb - local_blocks]
                thresh = min(float(s[i]) for i in chosen)
                for i in diff:
                    assert abs(float(s[i]) - thresh) <= 1e-5 * (1 + abs(thresh)), (
                        f"row {b} head {h}: block {i} (score {float(s[i])}) differs from the reference "
                        f"beyond a tie at the threshold {thresh}")


def make_cache(lengths, hkv, d, dtype, nmax=None, gen=None):
    """Random K/V [B, HKV, Nmax, D] with every slot >= lengths[b] poisoned with NaN."""
    nmax = nmax or max(lengths)
    B = len(lengths)
    k = torch.randn(B, hkv, nmax, d, generator=gen)
    v = torch.randn(B, hkv, nmax, d, generator=gen)
    pos = torch.arange(nmax)
    dead = (pos[None, :] >= torch.tensor(lengths)[:, None])[:, None, :, None]
    k = torch.where(dead, float("nan"), k).to(dtype)
    v = torch.where(dead, float("nan"), v).to(dtype)
    return k.to(DEVICE), v.to(DEVICE)


def sparse_decode_lowp(q, k, v, lengths, table, block_size):
    """The reference computation done by PyTorch in the inputs' own dtype (the tolerance baseline)."""
    B, H, D = q.shape
    HKV, nmax = k.shape[1], k.shape[2]
    S = table.shape[-1]
    t = table.long()
    tok = (t.clamp(min=0)[..., None] * block_size + torch.arange(block_size, device=q.device)).view(B, HKV, -1)
    ok = (t >= 0)[..., None].expand(B, HKV, S, block_size).reshape(B, HKV, -1) & (tok < lengths[:, None, None])
    idx = tok.clamp(max=nmax - 1)[..., None].expand(-1, -1, -1, D)
    zero = torch.zeros((), dtype=k.dtype, device=k.device)
    kg = torch.where(ok[..., None], torch.gather(k, 2, idx), zero)
    vg = torch.where(ok[..., None], torch.gather(v, 2, idx), zero)
    qg = q.view(B, HKV, H // HKV, D)
    s = torch.einsum("bkgd,bknd->bkgn", qg, kg) * (D ** -0.5)
    s = torch.where(ok[:, :, None], s, float("-inf"))
    p = torch.softmax(s.float(), dim=-1).to(q.dtype)
    return torch.einsum("bkgn,bknd->bkgd", p, vg).reshape(B, H, D)
