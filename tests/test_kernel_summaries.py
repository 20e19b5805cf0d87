"""update_summaries / refresh_summaries (Triton) on the paged cache against block_summaries_ref;
CPU via the interpreter. The kernels get a paged copy (shuffled block table, NaN in every block no
row references) of the contiguous data the reference gets; results are read back through the table."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of triton: kernels are bound to the interpreter when defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from resa.kernels import refresh_summaries, update_summaries  # noqa: E402
from resa.ref import block_summaries_ref  # noqa: E402

from tests.paging import page_table, summaries_from_pool, summaries_to_pool, to_pool  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BS = 16
# Page ids of blocks a row does not hold: far outside the pool, so dereferencing one fails.
GARBAGE_PAGE = 1 << 30


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


def paged(lengths, nb, seed, dtype=torch.int32):
    """(table, pages, num_physical): `table` maps logical blocks 0..nb-1 of every row (to build and
    read back pools); `pages`, what the kernel gets, is the same table with every entry past
    ceil(lengths[b] / BS) replaced by an id no pool has."""
    table, total = page_table([nb * BS] * len(lengths), BS, seed=seed)
    pages = table.clone().to(dtype)
    for b, n in enumerate(lengths):
        pages[b, -(-n // BS):] = GARBAGE_PAGE
    return table.to(DEVICE), pages.to(DEVICE), total


def unreferenced(table, lengths, total):
    """[total] bool: physical blocks that no row's valid pages (j < ceil(lengths[b] / BS)) reference."""
    free = torch.ones(total, dtype=torch.bool)
    for b, n in enumerate(lengths):
        free[table[b, :-(-n // BS)].long().cpu()] = False
    return free


def strided(x):
    """The same values in a view whose strides are not the contiguous ones (last dim contiguous)."""
    wide = torch.full(x.shape[:-1] + (2 * x.shape[-1],), float("nan"), dtype=x.dtype, device=x.device)
    wide[..., : x.shape[-1]] = x
    return wide[..., : x.shape[-1]]


def bits(x):
    """Bit pattern of a float tensor (NaN compares equal to itself)."""
    return x.contiguous().view({2: torch.int16, 4: torch.int32}[x.element_size()]).cpu()


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
    nb = kmin.shape[2]
    table, pages, total = paged(new_len.tolist(), nb, seed=d)
    kmin_p = summaries_to_pool(kmin.to(DEVICE), table, total)
    kmax_p = summaries_to_pool(kmax.to(DEVICE), table, total)
    before_min, before_max = bits(kmin_p), bits(kmax_p)
    update_summaries(k_new.to(DEVICE), kmin_p, kmax_p, pages, pos.to(DEVICE), BS)
    want_min, want_max = block_summaries_ref(k, new_len, BS)
    got_min, got_max = summaries_from_pool(kmin_p, table, nb).cpu(), summaries_from_pool(kmax_p, table, nb).cpu()
    ok = valid_blocks(new_len.tolist(), nb)
    assert torch.equal(torch.where(ok, got_min.float(), 0.0), torch.where(ok, want_min, 0.0))
    assert torch.equal(torch.where(ok, got_max.float(), 0.0), torch.where(ok, want_max, 0.0))
    # Blocks no token reached are untouched (still NaN), and so is every block no valid page names.
    assert torch.isnan(torch.where(ok, float("nan"), got_min.float())).all()
    free = unreferenced(table, new_len.tolist(), total)
    assert torch.equal(bits(kmin_p)[free], before_min[free]) and torch.equal(bits(kmax_p)[free], before_max[free])
    assert torch.isnan(kmin_p.cpu()[free].float()).all()


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
    every other block, and every physical block no valid page names, is bit-for-bit unchanged."""
    hkv, d, dtype = 2, 64, torch.bfloat16
    nmax = max(lengths) + 20
    k, kmin, kmax = poisoned_cache(lengths, hkv, d, nmax, dtype, seed=3)
    gen = torch.Generator().manual_seed(4)
    for b, (s, e) in enumerate(zip(start, end)):
        k[b, :, s:e] = torch.randn(hkv, e - s, d, generator=gen).to(dtype)
    nb = -(-max(lengths) // BS)
    touched = torch.zeros(len(lengths), hkv, nb, dtype=torch.bool)
    for b, (s, e) in enumerate(zip(start, end)):
        if e > s:
            touched[b, :, s // BS: -(-e // BS)] = True
    table, pages, total = paged(lengths, nb, seed=5, dtype=torch.int64)
    # Strided pools: a K layer and summaries whose non-last strides are not the contiguous ones.
    k_p = strided(to_pool(k[:, :, :nb * BS].to(DEVICE), table, total, BS))
    kmin_p = strided(summaries_to_pool(kmin[:, :, :nb].to(DEVICE), table, total))
    kmax_p = strided(summaries_to_pool(kmax[:, :, :nb].to(DEVICE), table, total))
    before_min, before_max = bits(kmin_p), bits(kmax_p)
    refresh_summaries(k_p, kmin_p, kmax_p, pages, torch.tensor(start, device=DEVICE),
                      torch.tensor(end, dtype=torch.int32, device=DEVICE))
    want_min, want_max = block_summaries_ref(k, torch.tensor(end), BS)
    got_min, got_max = summaries_from_pool(kmin_p, table, nb).cpu(), summaries_from_pool(kmax_p, table, nb).cpu()
    t = touched[..., None].expand_as(got_min)
    assert torch.equal(got_min[t].float(), want_min[:, :, :nb][t])
    assert torch.equal(got_max[t].float(), want_max[:, :, :nb][t])
    old_min = summaries_from_pool(summaries_to_pool(kmin[:, :, :nb], table.cpu(), total), table.cpu(), nb)
    old_max = summaries_from_pool(summaries_to_pool(kmax[:, :, :nb], table.cpu(), total), table.cpu(), nb)
    assert torch.equal(bits(got_min)[~t], bits(old_min)[~t]) and torch.equal(bits(got_max)[~t], bits(old_max)[~t])
    free = unreferenced(table, lengths, total)
    assert torch.equal(bits(kmin_p)[free], before_min[free]) and torch.equal(bits(kmax_p)[free], before_max[free])
    assert torch.isnan(kmin_p.cpu()[free].float()).all()


def test_summaries_follow_the_table():
    """The same rows under two different shuffles give the same summaries, read back per row."""
    lengths, hkv, d = [70, 33, 100], 2, 64
    k, kmin, kmax = poisoned_cache(lengths, hkv, d, 112, torch.bfloat16, seed=6)
    gen = torch.Generator().manual_seed(7)
    for b, n in enumerate(lengths):
        k[b, :, n - 20:n] = torch.randn(hkv, 20, d, generator=gen).to(torch.bfloat16)
    nb = -(-max(lengths) // BS)
    start = torch.tensor([n - 20 for n in lengths], device=DEVICE)
    end = torch.tensor(lengths, device=DEVICE)
    got = []
    for seed in (11, 12):
        table, pages, total = paged(lengths, nb, seed=seed)
        k_p = to_pool(k[:, :, :nb * BS].to(DEVICE), table, total, BS)
        kmin_p = summaries_to_pool(kmin[:, :, :nb].to(DEVICE), table, total)
        kmax_p = summaries_to_pool(kmax[:, :, :nb].to(DEVICE), table, total)
        refresh_summaries(k_p, kmin_p, kmax_p, pages, start, end)
        got.append((summaries_from_pool(kmin_p, table, nb).cpu(), summaries_from_pool(kmax_p, table, nb).cpu()))
    want_min, want_max = block_summaries_ref(k, end.cpu(), BS)
    ok = valid_blocks(lengths, nb).expand(-1, hkv, -1, d)
    for got_min, got_max in got:
        assert torch.equal(got_min[ok].float(), want_min[ok]) and torch.equal(got_max[ok].float(), want_max[ok])
    assert torch.equal(bits(got[0][0]), bits(got[1][0])) and torch.equal(bits(got[0][1]), bits(got[1][1]))


def test_summaries_reject_bad_inputs():
    k = torch.zeros(4, 2, BS, 64, device=DEVICE)
    kmin = torch.zeros(4, 2, 64, device=DEVICE)
    pages = torch.tensor([[2, 0]], dtype=torch.int32, device=DEVICE)
    pos = torch.tensor([3], device=DEVICE)
    with pytest.raises(ValueError, match="kmax"):
        update_summaries(k[:1, :, 0], kmin, kmin[:1], pages, pos, BS)
    with pytest.raises(TypeError, match="positions"):
        update_summaries(k[:1, :, 0], kmin, kmin.clone(), pages, pos.float(), BS)
    with pytest.raises(ValueError, match="pages"):
        update_summaries(k[:1, :, 0], kmin, kmin.clone(), pages[0], pos, BS)
    with pytest.raises(TypeError, match="pages"):
        update_summaries(k[:1, :, 0], kmin, kmin.clone(), pages.float(), pos, BS)
    with pytest.raises(ValueError, match="kmin"):
        update_summaries(k[:1, :, 0], kmin[:, None], kmin[:, None].clone(), pages, pos, BS)
    with pytest.raises(ValueError, match="start"):
        refresh_summaries(k, kmin, kmin.clone(), pages, torch.tensor([0, 1], device=DEVICE), pos)
    with pytest.raises(ValueError, match="pages"):
        refresh_summaries(k, kmin, kmin.clone(), pages[0], pos, pos)
    with pytest.raises(ValueError, match="pool layer"):
        refresh_summaries(k[:, :, 0], kmin, kmin.clone(), pages, pos, pos)
    with pytest.raises(ValueError, match="kmin"):
        refresh_summaries(k, kmin[:3], kmin[:3].clone(), pages, pos, pos)


def test_refresh_summaries_of_every_layer_in_one_launch():
    """Pool tensors of 3 layers ([L, NBLK, ...]): each layer's touched blocks equal the reference
    over that layer's own keys, and untouched blocks keep their bits (a kernel that ignored the
    layer stride would write layer 0's summaries everywhere)."""
    lengths, start, end, hkv, d, dtype = [40, 70], [8, 50], [40, 70], 2, 64, torch.bfloat16
    nb = -(-max(lengths) // BS)
    table, pages, total = paged(lengths, nb, seed=21, dtype=torch.int64)
    layers = [poisoned_cache(lengths, hkv, d, nb * BS, dtype, seed=30 + i) for i in range(3)]
    k_p = torch.stack([to_pool(k.to(DEVICE), table, total, BS) for k, _, _ in layers])
    kmin_p = torch.stack([summaries_to_pool(mn.to(DEVICE), table, total) for _, mn, _ in layers])
    kmax_p = torch.stack([summaries_to_pool(mx.to(DEVICE), table, total) for _, _, mx in layers])
    # Stale summaries of the touched blocks: the refresh must rewrite them.
    for b, (s, e) in enumerate(zip(start, end)):
        for j in range(s // BS, -(-e // BS)):
            kmin_p[:, table[b, j]] = 7.0
            kmax_p[:, table[b, j]] = -7.0
    before_min = kmin_p.clone()
    refresh_summaries(k_p, kmin_p, kmax_p, pages, torch.tensor(start, device=DEVICE), torch.tensor(end, device=DEVICE))
    touched = torch.zeros(len(lengths), hkv, nb, dtype=torch.bool)
    for b, (s, e) in enumerate(zip(start, end)):
        touched[b, :, s // BS: -(-e // BS)] = True
    t = touched[..., None].expand(-1, -1, -1, d)
    for i, (k, _, _) in enumerate(layers):
        want_min, want_max = block_summaries_ref(k, torch.tensor(end), BS)
        got_min = summaries_from_pool(kmin_p[i], table, nb).cpu()
        got_max = summaries_from_pool(kmax_p[i], table, nb).cpu()
        assert torch.equal(got_min[t].float(), want_min[t]) and torch.equal(got_max[t].float(), want_max[t])
        old = summaries_from_pool(before_min[i], table, nb).cpu()
        assert torch.equal(bits(got_min)[~t], bits(old)[~t])
    with pytest.raises(ValueError, match="layers"):
        refresh_summaries(k_p, kmin_p[0], kmax_p[0], pages, torch.tensor(start, device=DEVICE),
                          torch.tensor(end, device=DEVICE))
