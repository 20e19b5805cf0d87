"""The kernel comparisons of the CPU tests at realistic sizes, on a CUDA GPU (marker `gpu`).

Run with `pytest -m gpu tests/test_kernels_gpu.py`; without a GPU every test is skipped.
"""

import pytest
import torch

from resa.ref import block_budget, block_summaries_ref, dense_attention_ref, select_blocks_ref, sparse_decode_ref
from tests.paging import page_table, summaries_from_pool, summaries_to_pool, to_pool
from tests.tolerance import assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BS = 16
K = 1024


def _cache(lengths, hkv, d, dtype, seed):
    """bf16/fp16 K/V [B, HKV, Nmax, D] with NaN in every slot >= lengths[b]; fp32-exact summaries."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    B, nmax = len(lengths), max(lengths)
    k = torch.randn(B, hkv, nmax, d, device="cuda", generator=g, dtype=dtype)
    v = torch.randn(B, hkv, nmax, d, device="cuda", generator=g, dtype=dtype)
    lens = torch.tensor(lengths, device="cuda")
    dead = (torch.arange(nmax, device="cuda")[None, :] >= lens[:, None])[:, None, :, None]
    k.masked_fill_(dead, float("nan"))
    v.masked_fill_(dead, float("nan"))
    kmin, kmax = block_summaries_ref(k, lens, BS)
    return k, v, kmin.to(dtype), kmax.to(dtype), lens, g


class Paged:
    """A paged copy (shuffled blocks, NaN elsewhere) of contiguous K/V and summaries: what the
    kernels read; the references read the contiguous originals."""

    def __init__(self, k, v, kmin, kmax, lengths, seed=0):
        self.pages, n = page_table(lengths, BS, seed=seed, device="cuda")
        self.k, self.v = to_pool(k, self.pages, n, BS), to_pool(v, self.pages, n, BS)
        self.kmin, self.kmax = summaries_to_pool(kmin, self.pages, n), summaries_to_pool(kmax, self.pages, n)


SHAPES = [
    # (lengths, H, HKV, D)
    pytest.param([128 * K], 28, 4, 128, id="qwen-128K-b1"),
    pytest.param([128 * K, 5000, 77777, 1], 28, 4, 128, id="qwen-ragged-128K-b4"),
    pytest.param([32 * K] * 8, 32, 8, 128, id="llama-32K-b8"),
    pytest.param([64 * K + 7, 999], 12, 2, 64, id="G6-D64-64K-b2"),
    pytest.param([20000, 3333], 36, 4, 128, id="G9-D128-b2"),
]


@pytest.mark.parametrize("lengths,H,HKV,D", SHAPES)
@pytest.mark.parametrize("method,topn", [("fused", "interp"), ("fused", "bisect"), ("fused", "radix"),
                                         ("two_pass", "interp"), ("torch", "interp")])
def test_select_blocks_gpu(lengths, H, HKV, D, method, topn):
    from resa.kernels import select_blocks
    from tests.kernel_cases import assert_same_selection

    k, v, kmin, kmax, lens, g = _cache(lengths, HKV, D, torch.bfloat16, seed=1)
    q = torch.randn(len(lengths), H, D, device="cuda", generator=g, dtype=torch.bfloat16)
    kw = dict(block_size=BS, active_ratio=0.1, min_blocks=16, num_slots=block_budget(kmin.shape[2], 0.1, 16))
    p = Paged(k, v, kmin, kmax, lengths)
    table, nsel = select_blocks(q, p.kmin, p.kmax, p.pages, lens, method=method, topn=topn, **kw)
    ref_table, ref_nsel = select_blocks_ref(q, kmin, kmax, lens, **kw)
    assert_same_selection(table, nsel, ref_table, ref_nsel, q, kmin, kmax, lens, 1)


def _lowp(q, k, v, lens, table):
    from tests.kernel_cases import sparse_decode_lowp

    return sparse_decode_lowp(q, k, v, lens, table, BS)


@pytest.mark.parametrize("lengths,H,HKV,D", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_sparse_decode_gpu(lengths, H, HKV, D, dtype):
    from resa.kernels import select_blocks, sparse_decode

    k, v, kmin, kmax, lens, g = _cache(lengths, HKV, D, dtype, seed=2)
    q = torch.randn(len(lengths), H, D, device="cuda", generator=g, dtype=dtype)
    kw = dict(block_size=BS, active_ratio=0.1, min_blocks=16, num_slots=block_budget(kmin.shape[2], 0.1, 16))
    p = Paged(k, v, kmin, kmax, lengths)
    table, nsel = select_blocks(q, p.kmin, p.kmax, p.pages, lens, **kw)
    out = torch.full_like(q, float("nan"))
    sparse_decode(q, p.k, p.v, p.pages, lens, table, num_selected=nsel, out=out)
    assert_close(out, sparse_decode_ref(q, k, v, lens, table, BS), _lowp(q, k, v, lens, table))
    out1 = sparse_decode(q, p.k, p.v, p.pages, lens, table, num_splits=1)
    assert_close(out1, sparse_decode_ref(q, k, v, lens, table, BS), _lowp(q, k, v, lens, table))


def test_full_table_equals_dense_gpu():
    from resa.kernels import sparse_decode

    lengths = [16 * K, 3000]
    k, v, _, _, lens, g = _cache(lengths, 4, 128, torch.bfloat16, seed=3)
    q = torch.randn(2, 28, 128, device="cuda", generator=g, dtype=torch.bfloat16)
    nb = -(-max(lengths) // BS)
    idx = torch.arange(nb, device="cuda", dtype=torch.int32)
    table = torch.where(idx < ((lens + BS - 1) // BS)[:, None], idx, -1)[:, None, :].expand(2, 4, nb).contiguous()
    p = Paged(k, v, k[:, :, :1], k[:, :, :1], lengths)
    out = sparse_decode(q, p.k, p.v, p.pages, lens, table)
    dense = dense_attention_ref(q[:, :, None], k, v, lens - 1, torch.ones_like(lens))[:, :, 0]
    low = torch.stack([torch.nn.functional.scaled_dot_product_attention(
        q[b:b + 1, :, None], k[b:b + 1, :, :n], v[b:b + 1, :, :n], enable_gqa=True)[0, :, 0]
        for b, n in enumerate(lengths)])
    assert_close(out, dense, low)


def test_cuda_graph_replay_matches_eager():
    """Selection + attention have no host sync: a captured step replays to the eager result."""
    from resa.kernels import SelectionWorkspace, select_blocks, sparse_decode

    k, v, kmin, kmax, lens, g = _cache([64 * K, 1000], 4, 128, torch.bfloat16, seed=4)
    q = torch.randn(2, 28, 128, device="cuda", generator=g, dtype=torch.bfloat16)
    kw = dict(block_size=BS, active_ratio=0.1, min_blocks=16, num_slots=block_budget(kmin.shape[2], 0.1, 16))
    p = Paged(k, v, kmin, kmax, [64 * K, 1000])
    ws = SelectionWorkspace.allocate(2, 4, p.pages.shape[1], "cuda")
    table = torch.empty(2, 4, kw["num_slots"], dtype=torch.int32, device="cuda")
    nsel = torch.empty(2, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)

    def step():
        select_blocks(q, p.kmin, p.kmax, p.pages, lens, **kw, workspace=ws, out=(table, nsel))
        sparse_decode(q, p.k, p.v, p.pages, lens, table, num_selected=nsel, out=out)

    step()
    eager = out.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


def test_summaries_gpu():
    from resa.kernels import refresh_summaries, update_summaries

    lengths = [128 * K - 1, 50000, 17, 16]
    k, _, kmin, kmax, lens, g = _cache([n + 1 for n in lengths], 4, 128, torch.bfloat16, seed=5)
    # Summaries as they were before the last token; then append it.
    before = torch.tensor(lengths, device="cuda")
    kmin0, kmax0 = block_summaries_ref(k, before, BS)
    kmin0, kmax0 = kmin0.to(torch.bfloat16), kmax0.to(torch.bfloat16)
    k_new = k[torch.arange(4, device="cuda"), :, before].contiguous()
    p = Paged(k, k, kmin0, kmax0, [n + 1 for n in lengths])
    update_summaries(k_new, p.kmin, p.kmax, p.pages, before, BS)
    nb = kmin.shape[2]
    ok = (torch.arange(nb, device="cuda")[None, :] < ((lens + BS - 1) // BS)[:, None])[:, None, :, None]
    got_min, got_max = summaries_from_pool(p.kmin, p.pages, nb), summaries_from_pool(p.kmax, p.pages, nb)
    assert torch.equal(torch.where(ok, got_min, 0), torch.where(ok, kmin, 0))
    assert torch.equal(torch.where(ok, got_max, 0), torch.where(ok, kmax, 0))
    # Rectify the last 32 tokens of each row: overwrite keys, refresh, compare.
    start = (lens - 32).clamp(min=0)
    pos = torch.arange(k.shape[2], device="cuda")
    win = ((pos[None, :] >= start[:, None]) & (pos[None, :] < lens[:, None]))[:, None, :, None]
    k.copy_(torch.where(win, torch.randn(k.shape, device="cuda", generator=g, dtype=k.dtype), k))
    kp = to_pool(k, p.pages, p.k.shape[0], BS)
    refresh_summaries(kp, p.kmin, p.kmax, p.pages, start, lens)
    want_min, want_max = block_summaries_ref(k, lens, BS)
    got_min, got_max = summaries_from_pool(p.kmin, p.pages, nb), summaries_from_pool(p.kmax, p.pages, nb)
    assert torch.equal(torch.where(ok, got_min.float(), 0), torch.where(ok, want_min, 0))
    assert torch.equal(torch.where(ok, got_max.float(), 0), torch.where(ok, want_max, 0))
