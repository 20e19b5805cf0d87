"""sparse_decode (Triton) on a paged K/V pool against sparse_decode_ref on the same contiguous K/V;
on CPU through Triton's interpreter. The pool's blocks lie in shuffled order and every block no
row's table names is NaN."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of triton: kernels are bound to the interpreter when defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from resa.kernels import sparse_decode  # noqa: E402
from resa.ref import dense_attention_ref, select_blocks_ref, sparse_decode_ref  # noqa: E402
from tests.tolerance import assert_close  # noqa: E402

from tests.kernel_cases import BS, DEVICE, make_cache, sparse_decode_lowp  # noqa: E402
from tests.paging import page_table, to_pool  # noqa: E402


def paged(k, v, lengths, *, seed=0, max_blocks=None):
    """(pages, pool_k, pool_v): a shuffled paged copy of contiguous K/V [B, HKV, N, D]."""
    pages, nphys = page_table(lengths, BS, max_blocks, seed=seed)
    return pages.to(DEVICE), to_pool(k, pages, nphys, BS), to_pool(v, pages, nphys, BS)


def run_case(lengths, hkv, g, d, dtype, *, ratio=0.25, min_blocks=4, table=None, splits=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B = len(lengths)
    k, v = make_cache(lengths, hkv, d, dtype, gen=gen)
    q = torch.randn(B, hkv * g, d, generator=gen).to(dtype).to(DEVICE)
    lens = torch.tensor(lengths, dtype=torch.int64, device=DEVICE)
    nsel = None
    if table is None:
        from resa.ref import block_summaries_ref

        kmin, kmax = block_summaries_ref(k, lens, BS)
        table, nsel = select_blocks_ref(q, kmin, kmax, lens, block_size=BS, active_ratio=ratio, min_blocks=min_blocks)
    pages, pk, pv = paged(k, v, lengths, seed=seed + 1, max_blocks=-(-max(lengths) // BS) + 2)
    out = torch.full((B, hkv * g, d), float("nan"), dtype=dtype, device=DEVICE)
    got = sparse_decode(q, pk, pv, pages, lens, table, num_selected=nsel, num_splits=splits, out=out)
    assert got.data_ptr() == out.data_ptr()
    ref = sparse_decode_ref(q, k, v, lens, table, BS)
    low = sparse_decode_lowp(q, k, v, lens, table, BS)
    assert_close(got, ref, low)


CASES = [
    # (lengths, HKV, G, D, dtype, splits)
    pytest.param([1], 1, 1, 64, torch.bfloat16, None, id="N1-G1-D64"),
    pytest.param([15], 2, 6, 128, torch.bfloat16, None, id="N15-G6-D128"),
    pytest.param([16], 1, 7, 64, torch.float16, None, id="N16-G7-D64-fp16"),
    pytest.param([17], 2, 9, 128, torch.bfloat16, 2, id="N17-G9-D128-split2"),
    pytest.param([255], 1, 7, 128, torch.bfloat16, 3, id="N255-G7-D128-split3"),
    pytest.param([1000], 1, 6, 64, torch.bfloat16, 4, id="N1000-G6-D64-split4"),
    pytest.param([1000, 17, 255, 1], 2, 7, 64, torch.bfloat16, 3, id="ragged-G7-D64-split3"),
    pytest.param([300, 33], 1, 16, 64, torch.float32, 2, id="ragged-G16-D64-fp32"),
    pytest.param([40], 1, 1, 64, torch.bfloat16, 1, id="N40-G1-single"),
]


@pytest.mark.parametrize("lengths,hkv,g,d,dtype,splits", CASES)
def test_sparse_decode(lengths, hkv, g, d, dtype, splits):
    run_case(lengths, hkv, g, d, dtype, splits=splits)


def test_sparse_decode_full_table_equals_dense():
    """A table holding every block is dense attention: compared with the dense causal reference
    (the decode query at position len-1 over keys < len) and low-precision SDPA, not with the
    sparse reference."""
    gen = torch.Generator().manual_seed(5)
    lengths, hkv, g, d = [100, 37], 1, 7, 64
    k, v = make_cache(lengths, hkv, d, torch.bfloat16, gen=gen)
    q = torch.randn(2, hkv * g, d, generator=gen).to(torch.bfloat16).to(DEVICE)
    lens = torch.tensor(lengths, dtype=torch.int64, device=DEVICE)
    nb = -(-max(lengths) // BS)
    table = torch.full((2, hkv, nb), -1, dtype=torch.int32)
    for b, n in enumerate(lengths):
        table[b, :, : -(-n // BS)] = torch.arange(-(-n // BS), dtype=torch.int32)
    pages, pk, pv = paged(k, v, lengths)
    got = sparse_decode(q, pk, pv, pages, lens, table.to(DEVICE), num_splits=2)
    dense = dense_attention_ref(q[:, :, None], k, v, lens - 1, torch.ones_like(lens))[:, :, 0]
    low = torch.stack([torch.nn.functional.scaled_dot_product_attention(
        q[b:b + 1, :, None], k[b:b + 1, :, :n], v[b:b + 1, :, :n], enable_gqa=True)[0, :, 0]
        for b, n in enumerate(lengths)])
    assert_close(got, dense, low)


def test_sparse_decode_holes_and_unsorted_table():
    """-1 anywhere in the table is skipped; slot order does not matter."""
    table = torch.tensor([[[5, -1, 0, 3, -1, 2]]], dtype=torch.int32, device=DEVICE)
    run_case([90], 1, 6, 64, torch.bfloat16, table=table, splits=2)


def test_sparse_decode_strided_layer_view():
    """K/V as one layer of a [L, num_blocks, HKV, BS, D] pool stored block-major with HKV inside BS
    (non-contiguous block and head strides); pages as a column slice of a wider int64 table."""
    gen = torch.Generator().manual_seed(3)
    L, B, HKV, D, G = 2, 2, 2, 64, 7
    lengths = [48, 20]
    k, v = make_cache(lengths, HKV, D, torch.bfloat16, gen=gen)
    pages, pk, pv = paged(k, v, lengths, seed=4)
    nphys = pk.shape[0]
    store = torch.full((2, L, nphys, BS, HKV, D), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    store[0, 1] = pk.transpose(1, 2)
    store[1, 1] = pv.transpose(1, 2)
    lk, lv = store[0, 1].transpose(1, 2), store[1, 1].transpose(1, 2)
    wide = torch.full((B, 2 * pages.shape[1]), nphys + 10**6, dtype=torch.int64, device=DEVICE)
    wide[:, 1::2] = pages
    lens = torch.tensor(lengths, device=DEVICE)
    q = torch.randn(B, HKV * G, D, generator=gen).to(torch.bfloat16).to(DEVICE)
    table = torch.tensor([[[0, 2], [1, 2]], [[0, 1], [1, -1]]], dtype=torch.int32, device=DEVICE)
    got = sparse_decode(q, lk, lv, wide[:, 1::2], lens, table, num_splits=2)
    assert_close(got, sparse_decode_ref(q, k, v, lens, table, BS), sparse_decode_lowp(q, k, v, lens, table, BS))


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
def test_sparse_decode_reads_through_pages():
    """The pages decide which physical blocks are read: two shuffles of the same K/V give the same
    output bit for bit; pointing one logical block of row 1 at a NaN block spoils row 1 only."""
    gen = torch.Generator().manual_seed(11)
    lengths, hkv, g, d = [70, 45], 2, 4, 64
    k, v = make_cache(lengths, hkv, d, torch.bfloat16, gen=gen)
    q = torch.randn(2, hkv * g, d, generator=gen).to(torch.bfloat16).to(DEVICE)
    lens = torch.tensor(lengths, device=DEVICE)
    table = torch.tensor([[[0, 2, 4], [1, 3, 4]], [[0, 1, 2], [2, -1, -1]]], dtype=torch.int32, device=DEVICE)
    pages, pk, pv = paged(k, v, lengths, seed=1)
    first = sparse_decode(q, pk, pv, pages, lens, table, num_splits=2)
    assert_close(first, sparse_decode_ref(q, k, v, lens, table, BS), sparse_decode_lowp(q, k, v, lens, table, BS))
    pages2, pk2, pv2 = paged(k, v, lengths, seed=2)
    assert not torch.equal(pages2[:, :3], pages[:, :3])
    assert torch.equal(sparse_decode(q, pk2, pv2, pages2, lens, table, num_splits=2), first)
    spare = sorted(set(range(pk.shape[0])) - set(pages[:, :-(-max(lengths) // BS)].flatten().tolist()))
    bad = pages.clone()
    bad[1, 2] = spare[0]                    # row 1's block 2: selected by both of its heads
    got = sparse_decode(q, pk, pv, bad, lens, table, num_splits=2)
    assert torch.equal(got[0], first[0])
    assert torch.isnan(got[1]).all()


def test_sparse_decode_rejects_bad_inputs():
    q = torch.zeros(1, 4, 64, dtype=torch.bfloat16, device=DEVICE)
    k = torch.zeros(3, 2, BS, 64, dtype=torch.bfloat16, device=DEVICE)
    pages = torch.tensor([[0, 2]], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([32], device=DEVICE)
    table = torch.zeros(1, 2, 2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(TypeError, match="dtype"):
        sparse_decode(q, k.float(), k, pages, lens, table)
    with pytest.raises(ValueError, match="shape"):
        sparse_decode(q, k, k, pages, lens, table[:, :1])
    with pytest.raises(ValueError, match="head dim"):
        sparse_decode(q[..., :48], k[..., :48], k[..., :48], pages, lens, table)
    with pytest.raises(TypeError, match="lengths"):
        sparse_decode(q, k, k, pages, lens.float(), table)
    with pytest.raises(ValueError, match=r"pool layer \[num_blocks, HKV, BS, D\]"):
        sparse_decode(q, k[0], k, pages, lens, table)
    with pytest.raises(ValueError, match="KV heads"):
        sparse_decode(q, k, k[:, :1], pages, lens, table)
    with pytest.raises(ValueError, match=r"pages must be \[B=1, max_blocks\]"):
        sparse_decode(q, k, k, pages[0], lens, table)
    with pytest.raises(TypeError, match="pages"):
        sparse_decode(q, k, k, pages.float(), lens, table)
    with pytest.raises(ValueError, match="power of two"):
        sparse_decode(q, k[:, :, :12], k[:, :, :12], pages, lens, table)


def test_decode_splits_two_whole_waves():
    """Two whole waves of programs (rounded down), at least one iteration per split: the
    fastest measured on an H200 (132 SMs) at 128K and 256K, batch 1 and 4 (scripts/splits_sweep.py)."""
    from resa.kernels.sparse_decode import choose_splits

    assert choose_splits(1, 4, 820, 8, 132) == 66
    assert choose_splits(4, 4, 820, 8, 132) == 16
    assert choose_splits(1, 4, 1639, 8, 132) == 66
    assert choose_splits(1, 4, 40, 8, 132) == 5  # short rows: one iteration of blocks per split
