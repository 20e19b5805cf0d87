"""select_blocks (Triton) against select_blocks_ref; on CPU through Triton's interpreter.

The kernel gets a paged copy of the contiguous summaries the reference gets: physical blocks in a
shuffled order, NaN in every block no row references, and page ids past each row's blocks that
name no block at all; its logical block tables must equal the reference's."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of triton: kernels are bound to the interpreter when defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from resa.kernels import SelectionWorkspace, select_blocks  # noqa: E402
from resa.ref import block_budget, select_blocks_ref  # noqa: E402

from tests.kernel_cases import BS, DEVICE, assert_same_selection, make_inputs  # noqa: E402
from tests.paging import page_table, summaries_to_pool  # noqa: E402

SENTINEL = 12345
# Page ids of blocks a row does not hold: far outside the pool, so dereferencing one fails.
GARBAGE_PAGE = 1 << 30


def paged(kmin, kmax, lens, *, seed=0, strided=False, dtype=torch.int32):
    """Contiguous summaries [B, HKV, NBmax, D] -> (kmin_p, kmax_p, pages): pools [NBLK, HKV, D]
    through a shuffled block table pages [B, NBmax]; entries j >= ceil(lens[b] / BS) are garbage.
    strided: pools whose non-last strides are not the contiguous ones."""
    lengths = lens.tolist()
    table, total = page_table(lengths, BS, max_blocks=kmin.shape[2], seed=seed, device=DEVICE)
    nb = max(1, -(-max(max(lengths), 1) // BS))  # the blocks the table maps
    pools = []
    for s in (kmin, kmax):
        p = summaries_to_pool(s[:, :, :nb], table, total)
        if strided:
            wide = torch.full(p.shape[:-1] + (2 * p.shape[-1],), float("nan"), dtype=p.dtype, device=p.device)
            wide[..., : p.shape[-1]] = p
            p = wide[..., : p.shape[-1]]
        pools.append(p)
    pages = table.to(dtype)
    for b, n in enumerate(lengths):
        pages[b, -(-n // BS):] = GARBAGE_PAGE
    return pools[0], pools[1], pages


CASES = [
    # (lengths, HKV, G, D, active_ratio, min_blocks, local_blocks)
    pytest.param([1], 1, 1, 64, 0.1, 16, 1, id="N1-G1-D64"),
    pytest.param([15], 2, 6, 128, 0.1, 16, 1, id="N15-G6-D128"),
    pytest.param([16], 1, 7, 64, 0.1, 0, 1, id="N16-G7-D64"),
    pytest.param([17], 2, 9, 128, 0.1, 0, 1, id="N17-G9-D128"),
    pytest.param([255], 1, 7, 128, 0.2, 2, 1, id="N255-G7-D128"),
    pytest.param([1000], 2, 6, 64, 0.1, 2, 2, id="N1000-G6-D64-local2"),
    pytest.param([1000, 17, 255, 1, 0], 2, 7, 64, 0.1, 3, 1, id="ragged-G7-D64"),
    pytest.param([700, 300], 1, 1, 64, 1.0, 16, 1, id="ratio1-dense"),
    # 69 blocks: a top-n row of 64 keys plus a 16-key tail holding the newest blocks
    pytest.param([1100], 1, 7, 64, 0.1, 4, 1, id="N1100-two-part-row"),
    pytest.param([1100, 1030, 400], 2, 7, 64, 0.2, 4, 2, id="ragged-two-part-row-local2"),
]


@pytest.mark.parametrize("method,topn", [("fused", "interp"), ("fused", "bisect"), ("fused", "radix"),
                                         ("two_pass", "interp"), ("two_pass", "bisect"), ("torch", "interp")],
                         ids=["fused", "fused-bisect", "fused-radix", "two_pass", "two_pass-bisect", "torch"])
@pytest.mark.parametrize("lengths,hkv,g,d,ratio,min_blocks,local", CASES)
def test_select_blocks(lengths, hkv, g, d, ratio, min_blocks, local, method, topn):
    q, kmin, kmax, lens = make_inputs(lengths, hkv, g, d, torch.bfloat16)
    nbmax = kmin.shape[2]
    slots = block_budget(nbmax, ratio, min_blocks) + 2  # wider than needed: the tail must be -1
    B = len(lengths)
    out = (torch.full((B, hkv, slots), SENTINEL, dtype=torch.int32, device=DEVICE),
           torch.full((B,), SENTINEL, dtype=torch.int32, device=DEVICE))
    ws = SelectionWorkspace.allocate(B, hkv, nbmax, DEVICE)
    kmin_p, kmax_p, pages = paged(kmin, kmax, lens, seed=len(lengths) + nbmax)
    for _ in range(2):  # twice: the fused variant's counters must be back to zero after a call
        table, nsel = select_blocks(q, kmin_p, kmax_p, pages, lens, block_size=BS, active_ratio=ratio,
                                    min_blocks=min_blocks, local_blocks=local, num_slots=slots, method=method,
                                    topn=topn, workspace=ws, out=out)
        assert table.data_ptr() == out[0].data_ptr()
        ref_table, ref_nsel = select_blocks_ref(q, kmin, kmax, lens, block_size=BS, active_ratio=ratio,
                                                min_blocks=min_blocks, local_blocks=local, num_slots=slots)
        assert_same_selection(table, nsel, ref_table, ref_nsel, q, kmin, kmax, lens, local)
        assert int(ws.counters.abs().sum()) == 0


@pytest.mark.parametrize("method", ["fused", "two_pass", "torch"])
@pytest.mark.parametrize("lengths,hkv,g,d", [([1000, 17, 255, 1, 0], 2, 7, 64), ([1100], 1, 9, 128), ([500], 2, 1, 64)],
                         ids=["ragged-G7-D64", "two-part-G9-D128", "G1"])
def test_select_blocks_group_pool_max(lengths, hkv, g, d, method):
    q, kmin, kmax, lens = make_inputs(lengths, hkv, g, d, torch.bfloat16, seed=3)
    kw = dict(block_size=BS, active_ratio=0.1, min_blocks=3, local_blocks=1,
              num_slots=block_budget(kmin.shape[2], 0.1, 3), group_pool="max")
    table, nsel = select_blocks(q, *paged(kmin, kmax, lens, seed=4), lens, method=method, topn="bisect", **kw)
    ref_table, ref_nsel = select_blocks_ref(q, kmin, kmax, lens, **kw)
    assert_same_selection(table, nsel, ref_table, ref_nsel, q, kmin, kmax, lens, 1, "max")


def test_select_blocks_fp16_and_padded_summaries():
    """fp16 summaries with a wider block table than any length needs (a preallocated cache),
    int64 page ids and strided pools."""
    q, kmin, kmax, lens = make_inputs([333, 80], 2, 7, 64, torch.float16, seed=5, nbmax=40)
    slots = block_budget(40, 0.25, 4)
    kmin_p, kmax_p, pages = paged(kmin, kmax, lens, seed=6, strided=True, dtype=torch.int64)
    assert pages.shape == (2, 40) and not kmin_p.is_contiguous()
    table, nsel = select_blocks(q, kmin_p, kmax_p, pages, lens, block_size=BS, active_ratio=0.25, min_blocks=4,
                                num_slots=slots)
    ref_table, ref_nsel = select_blocks_ref(q, kmin, kmax, lens, block_size=BS, active_ratio=0.25, min_blocks=4,
                                            num_slots=slots)
    assert_same_selection(table, nsel, ref_table, ref_nsel, q, kmin, kmax, lens, 1)


@pytest.mark.parametrize("topn", ["interp", "bisect", "radix"])
def test_select_blocks_ties_take_lowest_index(topn):
    """Equal scores: the lowest block indices win (deterministic, like a stable sort)."""
    B, HKV, D, nb = 1, 1, 64, 20
    q = torch.ones(B, 2, D, device=DEVICE)
    kmin = torch.zeros(B, HKV, nb, D, device=DEVICE)
    kmax = torch.zeros(B, HKV, nb, D, device=DEVICE)
    kmax[0, 0, 7] = 1.0  # the one block above the rest
    lens = torch.tensor([nb * BS], device=DEVICE)
    table, nsel = select_blocks(q, *paged(kmin, kmax, lens), lens, block_size=BS, active_ratio=0.2, min_blocks=0,
                                num_slots=4, topn=topn)
    assert nsel.tolist() == [4]
    assert table[0, 0].tolist() == [0, 1, 7, 19]


def test_select_blocks_requires_num_slots_and_checks_inputs():
    q, kmin, kmax, lens = make_inputs([100], 1, 2, 64, torch.bfloat16)
    kmin, kmax, pages = paged(kmin, kmax, lens)
    kw = dict(block_size=BS, active_ratio=0.1, min_blocks=2)
    with pytest.raises(ValueError, match="num_slots"):
        select_blocks(q, kmin, kmax, pages, lens, **kw)
    with pytest.raises(ValueError, match="shape"):
        select_blocks(q, kmin[:3], kmax, pages, lens, **kw, num_slots=4)
    with pytest.raises(ValueError, match=r"kmin \[num_blocks, HKV, D\]"):
        select_blocks(q, kmin[None], kmax[None], pages, lens, **kw, num_slots=4)
    with pytest.raises(TypeError, match="lengths"):
        select_blocks(q, kmin, kmax, pages, lens.float(), **kw, num_slots=4)
    with pytest.raises(ValueError, match="pages"):
        select_blocks(q, kmin, kmax, pages[0], lens, **kw, num_slots=4)
    with pytest.raises(ValueError, match="pages"):
        select_blocks(q, kmin, kmax, pages.expand(2, -1), lens, **kw, num_slots=4)
    with pytest.raises(TypeError, match="pages"):
        select_blocks(q, kmin, kmax, pages.float(), lens, **kw, num_slots=4)
    with pytest.raises(ValueError, match="method"):
        select_blocks(q, kmin, kmax, pages, lens, **kw, num_slots=4, method="x")


@pytest.mark.parametrize("method,topn", [("fused", "interp"), ("two_pass", "bisect"), ("fused", "radix")])
def test_select_blocks_many_ties_stable(method, topn):
    """Scores drawn from 5 values: the chosen set is the n best, ties broken by lowest index."""
    gen = torch.Generator().manual_seed(7)
    B, HKV, D, nb = 2, 2, 64, 300
    kmax = torch.randint(0, 5, (B, HKV, nb, 1), generator=gen).float().expand(B, HKV, nb, D).contiguous()
    kmin = torch.zeros_like(kmax)
    q = torch.ones(B, HKV * 3, D)
    lens = torch.tensor([nb * BS, 200 * BS - 3])
    slots = block_budget(nb, 0.1, 16)
    table, nsel = select_blocks(q.to(DEVICE), *paged(kmin.to(DEVICE), kmax.to(DEVICE), lens, seed=8), lens.to(DEVICE),
                                block_size=BS, active_ratio=0.1, min_blocks=16, num_slots=slots, method=method,
                                topn=topn)
    for b in range(B):
        nbb = -(-int(lens[b]) // BS)
        n = block_budget(nbb, 0.1, 16)
        assert int(nsel[b]) == n
        for h in range(HKV):
            s = kmax[b, h, :nbb, 0].clone()
            s[nbb - 1] = float("inf")
            order = sorted(range(nbb), key=lambda i: (-float(s[i]), i))[:n]
            assert table[b, h, :n].cpu().tolist() == sorted(order)


@pytest.mark.parametrize("method", ["two_pass", "fused", "torch"])
def test_select_blocks_reads_through_the_table(method):
    """The same summaries under two different shuffles of the pool select the same logical blocks
    (bit-identical scores), equal to the reference's."""
    q, kmin, kmax, lens = make_inputs([1000, 17, 255, 1, 0, 600], 2, 3, 64, torch.bfloat16, seed=9)
    kw = dict(block_size=BS, active_ratio=0.1, min_blocks=3, local_blocks=1,
              num_slots=block_budget(kmin.shape[2], 0.1, 3))
    got = [select_blocks(q, *paged(kmin, kmax, lens, seed=seed), lens, method=method, **kw) for seed in (21, 22)]
    assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])
    ref_table, ref_nsel = select_blocks_ref(q, kmin, kmax, lens, **kw)
    assert_same_selection(*got[0], ref_table, ref_nsel, q, kmin, kmax, lens, 1)


def test_topn_parts():
    """Rows just past a power of two get a small tail; others keep one power-of-two part."""
    from resa.kernels.selection import topn_parts

    assert topn_parts(16393) == (16384, 16)
    assert topn_parts(16384) == (16384, 16)
    assert topn_parts(12000) == (8192, 4096)
    assert topn_parts(16000) == (16384, 16)
    assert topn_parts(69) == (64, 16)
    assert topn_parts(16393, "radix") == (32768, 16)
    for nb in (1, 20, 63, 64, 65, 100, 300, 5000, 8193, 20000):
        main, tail = topn_parts(nb)
        assert main + tail >= nb and main & (main - 1) == 0 and tail & (tail - 1) == 0
