"""update_summaries / refresh_summaries (Triton) against block_summaries_ref; CPU via the interpreter."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of triton: kernels are bound to the interpreter when defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from resa.kernels import refresh_summaries, update_summaries  # noqa: E402
from resa.ref import block_summaries_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BS = 16


def poisoned_cache(lengths, hkv, d, nmax, dtype, seed):
    """Random keys with NaN in every slot >= lengths[b], and exact summaries of the valid part
    (NaN for blocks with no valid token)."""
    gen = torch.Generator().manual_seed(seed)
    B = len(lengths)
    k = torch.randn(B, hkv, nmax, d, generator=gen).to(dtype)
    lens = torch.tensor(lengths, dtype=torch.int64)
    dead = (torch.arange(nmax)[None, :] >= lens[:, None])[:, None, :, None]
    k = torch.where(dead, torch.tensor(float("nan"), dtype=dtype), k)
    kmin, kmax = block_summaries_ref(k, lens, BS)
    kmin = torch.where(torch.isinf(kmin), float("nan"), kmin).to(dtype)
    kmax = torch.where(torch.isinf(kmax), float("nan"), kmax).to(dtype)
    return k, kmin, kmax


def valid_blocks(lengths, nbmax):
    nb = torch.tensor([-(-n // BS) for n in lengths])
    return (torch.arange(nbmax)[None, :] < nb[:, None])[:, None, :, None]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("d", [64, 128], ids=["D64", "D128"])
def test_update_summaries(d, dtype):
    """Append one token per row: into a partial block, into a fresh block (its NaN summary must
    not be read), and a row that does not append (position -1)."""
    lengths = [15, 16, 17, 1, 0, 40]
    appends = [True, True, True, True, True, False]
    hkv, nmax = 2, 64
    k, kmin, kmax = poisoned_cache(lengths, hkv, d, nmax, dtype, seed=1)
    gen = torch.Generator().manual_seed(2)
    k_new = torch.randn(len(lengths), hkv, d, generator=gen).to(dtype)
    pos = torch.tensor([n if a else -1 for n, a in zip(lengths, appends)])
    new_len = torch.tensor([n + 1 if a else n for n, a in zip(lengths, appends)])
    for b, a in enumerate(appends):
        if a:
            k[b, :, lengths[b]] = k_new[b]
    kmin_d, kmax_d = kmin.to(DEVICE), kmax.to(DEVICE)
    update_summaries(k_new.to(DEVICE), kmin_d, kmax_d, pos.to(DEVICE), BS)
    want_min, want_max = block_summaries_ref(k, new_len, BS)
    ok = valid_blocks(new_len.tolist(), kmin.shape[2])
    assert torch.equal(torch.where(ok, kmin_d.cpu().float(), 0.0), torch.where(ok, want_min, 0.0))
    assert torch.equal(torch.where(ok, kmax_d.cpu().float(), 0.0), torch.where(ok, want_max, 0.0))
    # Blocks no token reached are untouched (still NaN).
    assert torch.isnan(torch.where(ok, float("nan"), kmin_d.cpu().float())).all()


@pytest.mark.parametrize(
    "lengths,start,end",
    [
        pytest.param([40, 70], [8, 38], [40, 70], id="window-32-ragged"),
        pytest.param([1, 255], [0, 223], [1, 255], id="N1-and-N255"),
        pytest.param([1000, 16], [968, 16], [1000, 16], id="N1000-and-empty-window"),
        pytest.param([17, 48], [15, 0], [17, 33], id="end-before-written-tail"),
    ],
)
def test_refresh_summaries(lengths, start, end):
    """Overwrite keys in [start, end), refresh: touched blocks equal the reference over keys < end;
    every other block is bit-for-bit unchanged."""
    hkv, d, dtype = 2, 64, torch.bfloat16
    nmax = max(lengths) + 20
    k, kmin, kmax = poisoned_cache(lengths, hkv, d, nmax, dtype, seed=3)
    gen = torch.Generator().manual_seed(4)
    for b, (s, e) in enumerate(zip(start, end)):
        k[b, :, s:e] = torch.randn(hkv, e - s, d, generator=gen).to(dtype)
    touched = torch.zeros(kmin.shape[:3], dtype=torch.bool)
    for b, (s, e) in enumerate(zip(start, end)):
        if e > s:
            touched[b, :, s // BS: -(-e // BS)] = True
    before_min, before_max = kmin.clone(), kmax.clone()
    kmin_d, kmax_d = kmin.to(DEVICE), kmax.to(DEVICE)
    refresh_summaries(k.to(DEVICE), kmin_d, kmax_d, torch.tensor(start, device=DEVICE),
                      torch.tensor(end, dtype=torch.int32, device=DEVICE), BS)
    want_min, want_max = block_summaries_ref(k, torch.tensor(end), BS)
    got_min, got_max = kmin_d.cpu(), kmax_d.cpu()
    t = touched[..., None].expand_as(got_min)
    assert torch.equal(got_min[t].float(), want_min[t])
    assert torch.equal(got_max[t].float(), want_max[t])
    same = lambda a, b: torch.equal(torch.nan_to_num(a[~t].float(), 7.0), torch.nan_to_num(b[~t].float(), 7.0))  # noqa: E731
    assert same(got_min, before_min) and same(got_max, before_max)


def test_summaries_reject_bad_inputs():
    k = torch.zeros(1, 2, 32, 64, device=DEVICE)
    kmin = torch.zeros(1, 2, 2, 64, device=DEVICE)
    pos = torch.tensor([3], device=DEVICE)
    with pytest.raises(ValueError, match="kmax"):
        update_summaries(k[:, :, 0], kmin, kmin[:, :1], pos, BS)
    with pytest.raises(TypeError, match="positions"):
        update_summaries(k[:, :, 0], kmin, kmin.clone(), pos.float(), BS)
    with pytest.raises(ValueError, match="start"):
        refresh_summaries(k, kmin, kmin.clone(), torch.tensor([0, 1], device=DEVICE), pos, BS)
