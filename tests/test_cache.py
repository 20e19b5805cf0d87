"""KV writes through `resa.attention.write_kv` (torch reference and Triton kernels under the
interpreter) into a paged pool whose blocks lie in shuffled order: incremental summaries, refresh
of exactly the touched blocks, no write past a row or into a block the row does not hold."""

import pytest
import torch

from resa import attention as attn
from resa.cache import KVCache, Span
from resa.pool import KVPool
from resa.ref import block_summaries_ref
from resa.ref.paging import gather_blocks, gather_summaries
from tests.tiny import tiny_engine

L, HKV, D, BS = 2, 2, 16, 4
# The Triton kernels run here on CPU tensors, under the interpreter (not on CUDA machines).
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                                     reason="interpreter test"))]


def _cache(batch, capacity, spare=5, seed=0):
    blocks = batch * -(-capacity // BS) + spare
    order = torch.randperm(blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    return KVCache(KVPool(L, blocks, HKV, BS, D, order=order), batch, capacity)


def _logical(cache, t, n):
    """The logical [B, HKV, n, D] view of pool tensor t (all layers stacked)."""
    return torch.stack([gather_blocks(t[layer], cache.pages, -(-n // BS))[:, :, :n] for layer in range(L)])


def _append(cache, lengths, lens_new, seed, backend):
    torch.manual_seed(seed)
    B = cache.batch
    width = max(lens_new)
    span = Span.make(lengths, lens_new, width, "cpu")
    cache.reserve(span.start, span.end)
    for layer in range(L):
        attn.write_kv(cache, layer, torch.randn(B, HKV, width, D), torch.randn(B, HKV, width, D), span, backend)
    cache.lengths.copy_(span.end_t)
    return list(span.end)


def _check_summaries(cache, lengths):
    for layer in range(L):
        for b, n in enumerate(lengths):
            nb = -(-n // BS)
            k = gather_blocks(cache.k[layer], cache.pages[b:b + 1], nb)
            kmin, kmax = block_summaries_ref(k, torch.tensor([n]), BS)
            got_min = gather_summaries(cache.kmin[layer], cache.pages[b:b + 1], nb)
            got_max = gather_summaries(cache.kmax[layer], cache.pages[b:b + 1], nb)
            torch.testing.assert_close(got_min, kmin, rtol=0, atol=0)
            torch.testing.assert_close(got_max, kmax, rtol=0, atol=0)


def _unheld(cache):
    held = {blk for row in cache.blocks for blk in row}
    return [b for b in range(cache.pool.num_blocks) if b not in held]


@pytest.mark.parametrize("backend", BACKENDS)
def test_incremental_summaries_equal_scratch(backend):
    cache = _cache(2, 50)
    lengths = _append(cache, [0, 0], [7, 3], 0, backend)  # ragged chunk
    for step in range(13):
        lengths = _append(cache, lengths, [1, 1], step + 1, backend)
        _check_summaries(cache, lengths)
    assert lengths == [20, 16] and cache.lengths.tolist() == [20, 16]
    assert [len(b) for b in cache.blocks] == [5, 4]  # blocks only as the rows grew
    # Nothing written past a row, nor into any block the rows do not hold.
    assert torch.isnan(cache.k[:, cache.blocks[0][4], :, 0:]).sum() == 0
    assert torch.isnan(_logical(cache, cache.k, 20)[:, 1, :, 16:]).all()
    assert torch.isnan(cache.k[:, _unheld(cache)]).all() and torch.isnan(cache.kmin[:, _unheld(cache)]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_rectify_overwrite_refreshes_only_touched_blocks(backend):
    cache = _cache(1, 50)
    _append(cache, [0], [29], 0, backend)
    first = cache.blocks[0][:5]
    sentinel = cache.kmin[:, first].clone()
    # overwrite the newest 8 tokens (positions 21..28 -> blocks 5, 6, 7)
    _append(cache, [21], [8], 9, backend)
    assert torch.equal(cache.kmin[:, first], sentinel)
    _check_summaries(cache, [29])
    assert torch.isnan(_logical(cache, cache.k, 32)[:, :, :, 29:]).all()  # nothing written past the row
    assert torch.isnan(cache.k[:, _unheld(cache)]).all()


def test_device_only_ragged_span_without_a_sink_block_is_refused():
    cache = _cache(2, 10)
    ragged = Span.make([0, 0], [3, 1], 3, "cpu")
    device_only = Span.on_device(ragged.start_t, 3, ragged.n_valid_t)
    with pytest.raises(ValueError, match="ensure_sink"):
        attn.write_kv(cache, 0, torch.randn(2, HKV, 3, D), torch.randn(2, HKV, 3, D), device_only, "torch")


def test_runner_refuses_passes_past_capacity_and_truncates_exactly():
    engine = tiny_engine()
    runner = engine.open(2, 12, 4)
    runner.extend([[1, 2, 3, 4, 5, 6, 7], [8, 9, 10]], 4)
    with pytest.raises(ValueError, match="cache holds 12"):
        runner.extend([[1] * 6, [2]], 4)
    with pytest.raises(ValueError, match="cannot rewrite 5"):
        runner.window(torch.zeros(2, 5, dtype=torch.int64), overwrite=5)
    free = runner.cache.pool.allocator.num_free
    runner.truncate([3, 2])
    assert runner.lengths == [3, 2] and runner.cache.lengths.tolist() == [3, 2]
    assert [len(b) for b in runner.cache.blocks] == [1, 1]
    assert runner.cache.pool.allocator.num_free == free + 1  # row 0's second block went back
    c = runner.cache
    for layer in range(engine.model.cfg.num_layers):
        for b, n in enumerate([3, 2]):
            nb = -(-n // 4)
            kmin, kmax = block_summaries_ref(gather_blocks(c.k[layer], c.pages[b:b + 1], nb), torch.tensor([n]), 4)
            assert torch.equal(gather_summaries(c.kmin[layer], c.pages[b:b + 1], nb), kmin)
            assert torch.equal(gather_summaries(c.kmax[layer], c.pages[b:b + 1], nb), kmax)
    with pytest.raises(ValueError, match="truncate"):
        runner.truncate([4, 2])
