"""chunk_attention (Triton) against dense_attention_ref; on CPU through Triton's interpreter."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of triton: kernels are bound to the interpreter when defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from resa.kernels import chunk_attention  # noqa: E402
from resa.kernels.chunk_attention import ChunkConfig  # noqa: E402
from resa.ref import dense_attention_ref  # noqa: E402
from tests.tolerance import assert_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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
    # (start, n_valid, HKV, G, D, dtype, splits, block_m)
    pytest.param([0], [1], 1, 1, 64, torch.bfloat16, None, 128, id="first-token"),
    pytest.param([100], [32], 2, 7, 128, torch.bfloat16, 3, 128, id="window-G7-D128-split3"),
    pytest.param([33, 0], [16, 16], 1, 6, 64, torch.float16, 2, 32, id="ragged-start-fp16-m32"),
    pytest.param([200, 50, 7], [9, 9, 3], 2, 4, 64, torch.bfloat16, 4, 16, id="ragged-valid-m16"),
    pytest.param([64], [20], 1, 16, 64, torch.float32, 1, 64, id="G16-fp32-single"),
    pytest.param([500], [31], 1, 7, 64, torch.bfloat16, None, 128, id="fused-window-auto-splits"),
    pytest.param([130, 47, 16], [5, 5, 5], 2, 3, 64, torch.bfloat16, 1, 16, id="interior-tiles-single-split"),
]


@pytest.mark.parametrize("start,n_valid,hkv,g,d,dtype,splits,block_m", CASES)
def test_chunk_attention(start, n_valid, hkv, g, d, dtype, splits, block_m):
    q, k, v, s, n = make_inputs(start, n_valid, hkv, g, d, dtype)
    out = torch.full_like(q, float("nan"))
    got = chunk_attention(q, k, v, s, n, num_splits=splits, config=ChunkConfig(block_m, 16), out=out)
    assert got.data_ptr() == out.data_ptr()
    ref = dense_attention_ref(q, k, v, s, n)
    low = lowp_baseline(q, k, v, s, n)
    assert_close(valid_queries(got, n), valid_queries(ref, n), valid_queries(low, n))


def test_chunk_attention_strided_output_and_layer_view():
    """K/V as one layer of a [L, B, HKV, Nmax, D] cache; output written into a [B, T, H, D] buffer
    seen as [B, H, T, D] (what the model's output projection wants)."""
    gen = torch.Generator().manual_seed(5)
    L, B, HKV, N, D, G, T = 2, 2, 2, 80, 64, 3, 8
    kv = torch.randn(2, L, B, HKV, N, D, generator=gen).to(torch.bfloat16).to(DEVICE)
    k, v = kv[0, 1], kv[1, 1]
    start = torch.tensor([72, 40], device=DEVICE)
    n = torch.tensor([T, T], device=DEVICE)
    q = torch.randn(B, T, HKV * G, D, generator=gen).to(torch.bfloat16).to(DEVICE).transpose(1, 2)
    out = torch.empty(B, T, HKV * G, D, dtype=torch.bfloat16, device=DEVICE).transpose(1, 2)
    chunk_attention(q, k, v, start, n, num_splits=2, config=ChunkConfig(block_n=16), out=out)
    assert_close(out, dense_attention_ref(q, k, v, start, n), lowp_baseline(q, k, v, start, n))


def test_chunk_attention_rejects_bad_inputs():
    q, k, v, s, n = make_inputs([10], [4], 2, 3, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="head dim"):
        chunk_attention(q[..., :48].contiguous(), k[..., :48].contiguous(), v[..., :48].contiguous(), s, n)
    with pytest.raises(TypeError, match="dtype"):
        chunk_attention(q, k.float(), v, s, n)
    with pytest.raises(ValueError, match="multiple"):
        chunk_attention(q[:, :5], k, v, s, n)
    with pytest.raises(ValueError, match="shape"):
        chunk_attention(q, k, v, s.repeat(2), n)
    with pytest.raises(ValueError, match="block_m"):
        ChunkConfig(block_m=24)
