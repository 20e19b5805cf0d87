"""chunk_attention (Triton) on a paged K/V pool against dense_attention_ref on the same contiguous
K/V; on CPU through Triton's interpreter. The pool's blocks lie in shuffled order and every block no
row's table names is NaN."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of triton: kernels are bound to the interpreter when defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from resa.kernels import chunk_attention  # noqa: E402
from resa.kernels.chunk_attention import ChunkConfig  # noqa: E402
from resa.ref import dense_attention_ref  # noqa: E402
from tests.paging import page_table, to_pool  # noqa: E402
from tests.tolerance import assert_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def paged(k, v, ends, block_size, *, seed=0, max_blocks=None):
    """(pages, pool_k, pool_v): a shuffled paged copy of contiguous K/V [B, HKV, N, D]."""
    pages, nphys = page_table(ends, block_size, max_blocks, seed=seed)
    return pages.to(DEVICE), to_pool(k, pages, nphys, block_size), to_pool(v, pages, nphys, block_size)


def make_inputs(start, n_valid, hkv, g, d, dtype, nmax=None, seed=0):
    """Random q [B, H, T, D] and K/V whose slots >= start + n_valid are NaN (must never be read)."""
    gen = torch.Generator().manual_seed(seed)
    B, T = len(start), max(n_valid)
    end = torch.tensor(start) + torch.tensor(n_valid)
    nmax = nmax or int(end.max())
    k = torch.randn(B, hkv, nmax, d, generator=gen)
    v = torch.randn(B, hkv, nmax, d, generator=gen)
    dead = (torch.arange(nmax)[None, :] >= end[:, None])[:, None, :, None]
    k = torch.where(dead, float("nan"), k).to(dtype).to(DEVICE)
    v = torch.where(dead, float("nan"), v).to(dtype).to(DEVICE)
    q = torch.randn(B, hkv * g, T, d, generator=gen).to(dtype).to(DEVICE)
    return q, k, v, torch.tensor(start, device=DEVICE), torch.tensor(n_valid, device=DEVICE)


def lowp_baseline(q, k, v, start, n_valid):
    """The same masked softmax done by PyTorch in the inputs' dtype (the tolerance baseline)."""
    B, H, T, D = q.shape
    G = H // k.shape[1]
    end = start + n_valid
    nmax = k.shape[2]
    pos_j = torch.arange(nmax, device=q.device)
    pos_q = start[:, None] + torch.arange(T, device=q.device)[None, :]
    ok = (pos_j[None, None, :] <= pos_q[:, :, None]) & (pos_j[None, None, :] < end[:, None, None])
    key_ok = (pos_j[None, :] < end[:, None])[:, None, :, None]
    zero = torch.zeros((), dtype=k.dtype, device=k.device)
    kk = torch.where(key_ok, k, zero).repeat_interleave(G, 1)
    vv = torch.where(key_ok, v, zero).repeat_interleave(G, 1)
    s = torch.einsum("bhtd,bhnd->bhtn", q, kk) * D ** -0.5
    s = torch.where(ok[:, None], s, float("-inf"))
    p = torch.softmax(s.float(), dim=-1).to(q.dtype)
    return torch.einsum("bhtn,bhnd->bhtd", p, vv)


def valid_queries(x, n_valid):
    """Zero the padding queries (t >= n_valid[b]): their output is unspecified."""
    T = x.shape[2]
    keep = (torch.arange(T, device=x.device)[None, :] < n_valid[:, None].to(x.device))[:, None, :, None]
    return torch.where(keep, x.float(), 0.0)


CASES = [
    # (start, n_valid, HKV, G, D, dtype, splits, block_m, block_n, BS)
    pytest.param([0], [1], 1, 1, 64, torch.bfloat16, None, 128, 16, 16, id="first-token"),
    pytest.param([100], [32], 2, 7, 128, torch.bfloat16, 3, 128, 16, 16, id="window-G7-D128-split3"),
    pytest.param([33, 0], [16, 16], 1, 6, 64, torch.float16, 2, 32, 16, 4, id="ragged-start-fp16-m32-bs4"),
    pytest.param([200, 50, 7], [9, 9, 3], 2, 4, 64, torch.bfloat16, 4, 16, 16, 16, id="ragged-valid-m16"),
    pytest.param([64], [20], 1, 16, 64, torch.float32, 1, 64, 16, 16, id="G16-fp32-single"),
    pytest.param([500], [31], 1, 7, 64, torch.bfloat16, None, 128, 16, 16, id="fused-window-auto-splits"),
    pytest.param([130, 47, 16], [5, 5, 5], 2, 3, 64, torch.bfloat16, 1, 16, 16, 4,
                 id="interior-tiles-single-split-bs4"),
    pytest.param([150, 21], [7, 7], 1, 3, 64, torch.bfloat16, 2, 16, 32, 4, id="tile-of-8-blocks-bs4"),
    pytest.param([150, 21], [7, 7], 1, 3, 64, torch.bfloat16, 3, 16, 16, 64, id="tiles-inside-a-block-bs64"),
]


@pytest.mark.parametrize("start,n_valid,hkv,g,d,dtype,splits,block_m,block_n,bs", CASES)
def test_chunk_attention(start, n_valid, hkv, g, d, dtype, splits, block_m, block_n, bs):
    q, k, v, s, n = make_inputs(start, n_valid, hkv, g, d, dtype)
    ends = [a + b for a, b in zip(start, n_valid)]
    pages, pk, pv = paged(k, v, ends, bs, seed=1, max_blocks=-(-max(ends) // bs) + 2)
    out = torch.full_like(q, float("nan"))
    got = chunk_attention(q, pk, pv, pages, s, n, num_splits=splits, config=ChunkConfig(block_m, block_n), out=out)
    assert got.data_ptr() == out.data_ptr()
    ref = dense_attention_ref(q, k, v, s, n)
    low = lowp_baseline(q, k, v, s, n)
    assert_close(valid_queries(got, n), valid_queries(ref, n), valid_queries(low, n))


def test_chunk_attention_strided_output_and_layer_view():
    """K/V as one layer of a [L, num_blocks, HKV, BS, D] pool stored with HKV inside BS
    (non-contiguous block and head strides), pages as a column slice of a wider int64 table;
    output written into a [B, T, H, D] buffer seen as [B, H, T, D] (what the model's output
    projection wants)."""
    gen = torch.Generator().manual_seed(5)
    L, B, HKV, N, D, G, T, bs = 2, 2, 2, 80, 64, 3, 8, 16
    kc = torch.randn(B, HKV, N, D, generator=gen).to(torch.bfloat16).to(DEVICE)
    vc = torch.randn(B, HKV, N, D, generator=gen).to(torch.bfloat16).to(DEVICE)
    pages, pk, pv = paged(kc, vc, [N, N], bs, seed=3)
    nphys = pk.shape[0]
    store = torch.full((2, L, nphys, bs, HKV, D), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    store[0, 1] = pk.transpose(1, 2)
    store[1, 1] = pv.transpose(1, 2)
    k, v = store[0, 1].transpose(1, 2), store[1, 1].transpose(1, 2)
    wide = torch.full((B, 2 * pages.shape[1]), nphys + 10**6, dtype=torch.int64, device=DEVICE)
    wide[:, 1::2] = pages
    start = torch.tensor([72, 40], device=DEVICE)
    n = torch.tensor([T, T], device=DEVICE)
    q = torch.randn(B, T, HKV * G, D, generator=gen).to(torch.bfloat16).to(DEVICE).transpose(1, 2)
    out = torch.empty(B, T, HKV * G, D, dtype=torch.bfloat16, device=DEVICE).transpose(1, 2)
    chunk_attention(q, k, v, wide[:, 1::2], start, n, num_splits=2, config=ChunkConfig(block_n=16), out=out)
    assert_close(out, dense_attention_ref(q, kc, vc, start, n), lowp_baseline(q, kc, vc, start, n))


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
@pytest.mark.parametrize("bs", [4, 16])
def test_chunk_attention_reads_through_pages(bs):
    """The pages decide which physical blocks are read: two shuffles of the same K/V give the same
    output bit for bit; pointing one logical block of row 1 at a NaN block spoils row 1 only."""
    start, n_valid = [60, 37], [6, 6]
    q, k, v, s, n = make_inputs(start, n_valid, 2, 3, 64, torch.bfloat16, seed=4)
    ends = [a + b for a, b in zip(start, n_valid)]
    cfg = ChunkConfig(16, 16)
    pages, pk, pv = paged(k, v, ends, bs, seed=1)
    first = chunk_attention(q, pk, pv, pages, s, n, num_splits=2, config=cfg)
    assert_close(valid_queries(first, n), valid_queries(dense_attention_ref(q, k, v, s, n), n),
                 valid_queries(lowp_baseline(q, k, v, s, n), n))
    pages2, pk2, pv2 = paged(k, v, ends, bs, seed=2)
    assert not torch.equal(pages2, pages)
    assert torch.equal(chunk_attention(q, pk2, pv2, pages2, s, n, num_splits=2, config=cfg), first)
    spare = sorted(set(range(pk.shape[0])) - set(pages.flatten().tolist()))
    bad = pages.clone()
    bad[1, 0] = spare[0]                    # row 1's first block: seen by every query of row 1
    got = chunk_attention(q, pk, pv, bad, s, n, num_splits=2, config=cfg)
    assert torch.equal(got[0], first[0])
    assert torch.isnan(got[1]).all()


def test_chunk_attention_rejects_bad_inputs():
    q, k, v, s, n = make_inputs([10], [4], 2, 3, 64, torch.bfloat16)
    pages, k, v = paged(k, v, [14], 4)
    with pytest.raises(ValueError, match="head dim"):
        chunk_attention(q[..., :48].contiguous(), k[..., :48].contiguous(), v[..., :48].contiguous(), pages, s, n)
    with pytest.raises(TypeError, match="dtype"):
        chunk_attention(q, k.float(), v, pages, s, n)
    with pytest.raises(ValueError, match="multiple"):
        chunk_attention(q[:, :5], k, v, pages, s, n)
    with pytest.raises(ValueError, match="shape"):
        chunk_attention(q, k, v, pages, s.repeat(2), n)
    with pytest.raises(ValueError, match=r"pool layer \[num_blocks, HKV, BS, D\]"):
        chunk_attention(q, k[0], v, pages, s, n)
    with pytest.raises(ValueError, match="KV heads"):
        chunk_attention(q, k, v[:, :1], pages, s, n)
    with pytest.raises(ValueError, match=r"pages must be \[B=1, max_blocks\]"):
        chunk_attention(q, k, v, pages[0], s, n)
    with pytest.raises(TypeError, match="pages"):
        chunk_attention(q, k, v, pages.float(), s, n)
    with pytest.raises(ValueError, match="power of two"):
        chunk_attention(q, k[:, :, :3], v[:, :, :3], pages, s, n)
    with pytest.raises(ValueError, match="block_m"):
        ChunkConfig(block_m=24)


def test_chunk_splits_fill_whole_waves():
    """The split counts that measured fastest on an H200 (132 SMs, one program per SM; Qwen2.5-7B
    shapes, scripts/splits_sweep.py): whole waves, not a partial extra one."""
    from resa.kernels.chunk_attention import choose_chunk_splits

    # (groups = batch * KV heads, query tiles, context) -> best measured splits
    measured = {(16, 2, 131072): 4, (4, 2, 131072): 16, (32, 2, 131072): 2, (16, 1, 131072): 8,
                (32, 1, 131072): 4, (4, 1, 262144): 33, (16, 1, 262144): 8}
    for (groups, m_tiles, n), best in measured.items():
        assert choose_chunk_splits(groups, m_tiles, n, 128, 132) == best, (groups, m_tiles, n)
    assert choose_chunk_splits(1, 1, 128, 128, 132) == 1  # a one-tile row is never split
