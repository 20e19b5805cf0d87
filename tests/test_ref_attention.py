"""Attention references and the torch dense path against brute force."""

import pytest
import torch

from resa.attention import dense_attention
from resa.cache import Span
from resa.ref import dense_attention_ref, sparse_decode_ref
from resa.ref.paging import gather_blocks, refresh_summaries_paged_ref, sparse_decode_paged_ref, update_summaries_paged_ref
from resa.ref.summaries import refresh_summaries_ref, update_summaries_ref
from tests.paging import page_table, summaries_from_pool, summaries_to_pool, to_pool

SHAPES = [(n, g, d) for n in (1, 15, 16, 17, 255, 1000) for g, d in ((1, 64), (6, 128), (7, 64), (9, 64))]


def brute_force(q, k, v, allowed):
    """q [H, D], k/v [HKV, N, D], allowed [HKV, N] bool -> [H, D], float64."""
    H, D = q.shape
    HKV = k.shape[0]
    out = torch.empty(H, D, dtype=torch.float64)
    for h in range(H):
        g = h // (H // HKV)
        idx = allowed[g].nonzero()[:, 0]
        s = (k[g, idx].double() @ q[h].double()) * D ** -0.5
        out[h] = torch.softmax(s, 0) @ v[g, idx].double()
    return out


@pytest.mark.parametrize("n,g,d", SHAPES, ids=[f"N{n}-G{g}-D{d}" for n, g, d in SHAPES])
def test_sparse_decode_ref_matches_brute_force(n, g, d):
    torch.manual_seed(n + g)
    HKV, BS, cap = 2, 16, n + 20
    q = torch.randn(1, HKV * g, d)
    k = torch.randn(1, HKV, cap, d)
    v = torch.randn(1, HKV, cap, d)
    k[:, :, n:], v[:, :, n:] = float("nan"), float("nan")
    nb = -(-n // BS)
    table = torch.full((1, HKV, nb + 2), -1, dtype=torch.int32)
    allowed = torch.zeros(HKV, cap, dtype=torch.bool)
    for h in range(HKV):
        chosen = sorted(set(torch.randperm(nb)[: max(1, nb // 3)].tolist()) | {nb - 1})
        table[0, h, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
        for c in chosen:
            allowed[h, c * BS: min((c + 1) * BS, n)] = True
    out = sparse_decode_ref(q, k, v, torch.tensor([n]), table, BS)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0].double(), brute_force(q[0], k[0], v[0], allowed), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 17, 255])
def test_full_block_table_equals_dense(n):
    torch.manual_seed(n)
    HKV, G, D, BS = 3, 3, 32, 16
    q = torch.randn(1, HKV * G, D)
    k, v = torch.randn(1, HKV, n, D), torch.randn(1, HKV, n, D)
    nb = -(-n // BS)
    table = torch.arange(nb, dtype=torch.int32).expand(1, HKV, nb)
    sparse = sparse_decode_ref(q, k, v, torch.tensor([n]), table, BS)
    dense = dense_attention_ref(q[:, :, None], k, v, torch.tensor([n - 1]), torch.tensor([1]))[:, :, 0]
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)


def _ragged_case(seed=0):
    torch.manual_seed(seed)
    B, H, HKV, T, D, cap = 3, 6, 2, 5, 16, 40
    start, n_valid = [10, 0, 22], [5, 3, 0]
    k = torch.randn(B, HKV, cap, D)
    v = torch.randn(B, HKV, cap, D)
    for b in range(B):
        k[b, :, start[b] + n_valid[b]:] = float("nan")
        v[b, :, start[b] + n_valid[b]:] = float("nan")
    q = torch.randn(B, H, T, D)
    return q, k, v, start, n_valid


def test_dense_attention_ref_matches_brute_force_on_ragged_rows():
    q, k, v, start, n_valid = _ragged_case()
    out = dense_attention_ref(q, k, v, torch.tensor(start), torch.tensor(n_valid))
    for b in range(3):
        for t in range(n_valid[b]):
            allowed = torch.zeros(2, 40, dtype=torch.bool)
            allowed[:, : start[b] + t + 1] = True
            ref = brute_force(q[b, :, t], k[b], v[b], allowed)
            torch.testing.assert_close(out[b, :, t].double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(out).all()


def test_torch_dense_path_matches_reference():
    q, k, v, start, n_valid = _ragged_case(1)
    span = Span.make(start, n_valid, q.shape[2], "cpu")
    pages, n = page_table([k.shape[2]] * 3, 4, seed=1)
    out = dense_attention(q, to_pool(k, pages, n, 4), to_pool(v, pages, n, 4), pages, span)
    ref = dense_attention_ref(q, k, v, span.start_t, span.n_valid_t)
    for b in range(3):
        torch.testing.assert_close(out[b, :, : n_valid[b]], ref[b, :, : n_valid[b]], rtol=1e-5, atol=1e-6)
        assert (out[b, :, n_valid[b]:] == 0).all()  # ignored columns, never NaN from unwritten slots


def test_torch_dense_path_aligned_rows_match_reference():
    torch.manual_seed(2)
    B, H, HKV, T, D, start = 2, 6, 2, 7, 16, 30
    k, v = torch.randn(B, HKV, start + T + 5, D), torch.randn(B, HKV, start + T + 5, D)
    k[:, :, start + T:], v[:, :, start + T:] = float("nan"), float("nan")
    q = torch.randn(B, H, T, D)
    span = Span.make([start] * B, [T] * B, T, "cpu")
    pages, n = page_table([k.shape[2]] * B, 8, seed=2)
    out = dense_attention(q, to_pool(k, pages, n, 8), to_pool(v, pages, n, 8), pages, span)
    torch.testing.assert_close(out, dense_attention_ref(q, k, v, span.start_t, span.n_valid_t), rtol=1e-5, atol=1e-6)


# ---- the paged references (resa/ref/paging.py) against the contiguous ones ----

def test_paged_references_equal_contiguous_ones():
    """Through a shuffled table with NaN in every other block: gather, sparse decode, summary
    append and refresh give the contiguous references' results, and write only the rows' blocks."""
    torch.manual_seed(5)
    bs, B, HKV, H, D = 4, 3, 2, 6, 16
    lengths = [37, 9, 20]
    k, v = torch.randn(B, HKV, 40, D), torch.randn(B, HKV, 40, D)
    pages, n = page_table([40] * B, bs, seed=3)
    kp, vp = to_pool(k, pages, n, bs), to_pool(v, pages, n, bs)
    assert torch.equal(gather_blocks(kp, pages, 10), k)
    lens = torch.tensor(lengths)
    q = torch.randn(B, H, D)
    table = torch.tensor([[[0, 3, 9, -1], [2, -1, 5, 7]], [[0, 1, 2, -1], [-1, 1, 2, 0]], [[4, 1, -1, 0], [3, 4, 2, 1]]])
    torch.testing.assert_close(sparse_decode_paged_ref(q, kp, vp, pages, lens, table),
                               sparse_decode_ref(q, k, v, lens, table, bs), rtol=1e-5, atol=1e-6)
    kmin = torch.randn(B, HKV, 10, D)
    kmax = kmin + 1
    pmin, pmax = summaries_to_pool(kmin, pages, n), summaries_to_pool(kmax, pages, n)
    spare = [b for b in range(n) if b not in set(pages.flatten().tolist())]  # blocks no row holds
    positions = torch.tensor([36, -1, 20])
    update_summaries_ref(k[:, :, 0].clone(), kmin, kmax, positions, bs)
    update_summaries_paged_ref(k[:, :, 0].clone(), pmin, pmax, pages, positions, bs)
    start, end = torch.tensor([30, 0, 5]), torch.tensor([37, 0, 20])
    refresh_summaries_ref(k, kmin, kmax, start, end, bs)
    refresh_summaries_paged_ref(kp, pmin, pmax, pages, start, end)
    assert torch.equal(summaries_from_pool(pmin, pages, 10), kmin)
    assert torch.equal(summaries_from_pool(pmax, pages, 10), kmax)
    assert len(spare) == 3 and torch.isnan(pmin[spare]).all() and torch.isnan(pmax[spare]).all()
