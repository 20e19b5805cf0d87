"""KV cache: writes, incremental summaries, refresh of exactly the touched blocks."""

import pytest
import torch

from resa.cache import KVCache, Span
from resa.ref import block_summaries_ref

L, HKV, D, BS = 2, 2, 8, 4


def _cache(batch=2, capacity=50):
    return KVCache(L, batch, HKV, capacity, D, BS, poison=True)


def _append(cache, lens_new, seed):
    torch.manual_seed(seed)
    B = cache.batch
    width = max(lens_new)
    span = Span.make(list(cache.host_lengths), lens_new, width, "cpu")
    for layer in range(L):
        cache.write(layer, torch.randn(B, HKV, width, D), torch.randn(B, HKV, width, D), span)
    cache.commit(span)


def _check_summaries(cache):
    for layer in range(L):
        kmin, kmax = block_summaries_ref(cache.k[layer], cache.lengths, BS)
        for b, n in enumerate(cache.host_lengths):
            nb = -(-n // BS)
            torch.testing.assert_close(cache.kmin[layer, b, :, :nb], kmin[b, :, :nb], rtol=0, atol=0)
            torch.testing.assert_close(cache.kmax[layer, b, :, :nb], kmax[b, :, :nb], rtol=0, atol=0)


def test_incremental_summaries_equal_scratch():
    cache = _cache()
    _append(cache, [7, 3], 0)  # ragged chunk
    for step in range(23):
        _append(cache, [1, 1], step + 1)
        _check_summaries(cache)
    assert cache.host_lengths == [30, 26]
    assert cache.lengths.tolist() == [30, 26]


def test_rectify_overwrite_refreshes_only_touched_blocks():
    cache = _cache(batch=1)
    _append(cache, [29], 0)
    sentinel = cache.kmin[:, :, :, :5].clone()
    # overwrite the newest 8 tokens (positions 21..28 -> blocks 5, 6, 7)
    torch.manual_seed(9)
    span = Span.make([21], [8], 8, "cpu")
    for layer in range(L):
        cache.write(layer, torch.randn(1, HKV, 8, D), torch.randn(1, HKV, 8, D), span)
    cache.commit(span)
    assert torch.equal(cache.kmin[:, :, :, :5], sentinel)
    _check_summaries(cache)
    assert torch.isnan(cache.k[:, :, :, 29:]).all()  # nothing written past the row


def test_write_past_capacity_and_gaps_are_errors():
    cache = _cache(batch=1, capacity=10)
    with pytest.raises(ValueError, match="cache holds 10"):
        cache.check_span(Span.make([0], [11], 11, "cpu"))
    with pytest.raises(ValueError, match="gap"):
        cache.check_span(Span.make([3], [1], 1, "cpu"))
