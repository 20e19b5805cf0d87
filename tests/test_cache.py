"""KV writes through `resa.attention.write_kv` (torch reference and Triton kernels under the
interpreter): incremental summaries, refresh of exactly the touched blocks, no write past a row."""

import pytest
import torch

from resa import attention as attn
from resa.cache import KVCache, Span
from resa.ref import block_summaries_ref
from tests.tiny import tiny_engine

L, HKV, D, BS = 2, 2, 8, 4
# The Triton kernels run here on CPU tensors, under the interpreter (not on CUDA machines).
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                                     reason="interpreter test"))]


def _append(cache, lengths, lens_new, seed, backend):
    torch.manual_seed(seed)
    B = cache.batch
    width = max(lens_new)
    span = Span.make(lengths, lens_new, width, "cpu")
    for layer in range(L):
        attn.write_kv(cache, layer, torch.randn(B, HKV, width, D), torch.randn(B, HKV, width, D), span, backend)
    cache.lengths.copy_(span.end_t)
    return list(span.end)


def _check_summaries(cache, lengths):
    for layer in range(L):
        kmin, kmax = block_summaries_ref(cache.k[layer], cache.lengths, BS)
        for b, n in enumerate(lengths):
            nb = -(-n // BS)
            torch.testing.assert_close(cache.kmin[layer, b, :, :nb], kmin[b, :, :nb], rtol=0, atol=0)
            torch.testing.assert_close(cache.kmax[layer, b, :, :nb], kmax[b, :, :nb], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_incremental_summaries_equal_scratch(backend):
    cache = KVCache(L, 2, HKV, 50, D, BS)
    lengths = _append(cache, [0, 0], [7, 3], 0, backend)  # ragged chunk
    for step in range(13):
        lengths = _append(cache, lengths, [1, 1], step + 1, backend)
        _check_summaries(cache, lengths)
    assert lengths == [20, 16] and cache.lengths.tolist() == [20, 16]
    assert torch.isnan(cache.k[:, 0, :, 20:]).all() and torch.isnan(cache.k[:, 1, :, 16:]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_rectify_overwrite_refreshes_only_touched_blocks(backend):
    cache = KVCache(L, 1, HKV, 50, D, BS)
    _append(cache, [0], [29], 0, backend)
    sentinel = cache.kmin[:, :, :, :5].clone()
    # overwrite the newest 8 tokens (positions 21..28 -> blocks 5, 6, 7)
    _append(cache, [21], [8], 9, backend)
    assert torch.equal(cache.kmin[:, :, :, :5], sentinel)
    _check_summaries(cache, [29])
    assert torch.isnan(cache.k[:, :, :, 29:]).all()  # nothing written past the row


def test_ragged_span_without_host_mirror_is_refused():
    cache = KVCache(L, 2, HKV, 10, D, BS)
    ragged = Span.make([0, 0], [3, 1], 3, "cpu")
    device_only = Span(ragged.start_t, ragged.n_valid_t, 3, False)
    with pytest.raises(ValueError, match="host mirrors"):
        attn.write_kv(cache, 0, torch.randn(2, HKV, 3, D), torch.randn(2, HKV, 3, D), device_only, "torch")


def test_runner_refuses_passes_past_capacity_and_truncates_exactly():
    engine = tiny_engine()
    runner = engine.open(2, 12, 4)
    runner.extend([[1, 2, 3, 4, 5, 6, 7], [8, 9, 10]], 4)
    with pytest.raises(ValueError, match="cache holds 12"):
        runner.extend([[1] * 6, [2]], 4)
    with pytest.raises(ValueError, match="cannot rewrite 5"):
        runner.window(torch.zeros(2, 5, dtype=torch.int64), overwrite=5)
    runner.truncate([5, 2])
    assert runner.lengths == [5, 2] and runner.cache.lengths.tolist() == [5, 2]
    for layer in range(engine.model.cfg.num_layers):
        kmin, kmax = block_summaries_ref(runner.cache.k[layer], runner.cache.lengths, 4)
        for b, n in enumerate([5, 2]):
            nb = -(-n // 4)
            assert torch.equal(runner.cache.kmin[layer, b, :, :nb], kmin[b, :, :nb])
            assert torch.equal(runner.cache.kmax[layer, b, :, :nb], kmax[b, :, :nb])
    with pytest.raises(ValueError, match="truncate"):
        runner.truncate([6, 2])
