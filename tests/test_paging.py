"""The paged KV pool end to end: rows' blocks in any physical order give the same tokens and K/V,
prefix caching shares exactly the full prompt blocks and never writes them, blocks go back to the
pool when sequences finish, eviction spares blocks in use, free blocks are never read, and a
pool that is too small is a clear error."""

import pytest
import torch

from resa.blocks import BlockAllocator, CacheTooLargeError, block_hashes
from resa.config import ResaConfig
from resa.pool import KVPool
from tests.tiny import random_prompts, tiny_engine

BS = 4
SMALL = dict(block_size=BS, min_blocks=4, active_ratio=0.1, rectify_every=8)
NEW = 30


def _engine(backend="torch", shuffle_seed=None, blocks=400):
    """A tiny engine whose pool (`blocks` blocks of BS tokens) hands out blocks in shuffled order
    (head_dim 64 for the Triton kernels, the smallest they take)."""
    engine = tiny_engine(**(dict(hidden_size=128, num_heads=4, head_dim=64) if backend == "triton" else {}))
    engine.model.backend = backend
    if shuffle_seed is not None:
        cfg = engine.model.cfg
        order = torch.randperm(blocks, generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
        engine._pools[BS] = KVPool(cfg.num_layers, blocks, cfg.num_kv_heads, BS, cfg.head_dim, order=order,
                                   max_blocks=blocks)
    return engine


def _gen(engine, prompts, new=NEW, **cfg):
    return engine.generate_ids(prompts, resa=ResaConfig(**{**SMALL, **cfg}), max_new_tokens=new,
                               eos_token_ids=[], keep_cache=True)


# ---- allocator ----

def test_allocator_counts_references_and_frees_least_recent_first():
    a = BlockAllocator(6)
    x, y = a.allocate(2), a.allocate(2)
    assert (x, y, a.num_free) == ([0, 1], [2, 3], 2)
    a.share(x)
    a.release(x)
    assert a.num_free == 2  # still held once
    a.release(y)
    a.release(x)
    # free order: 4, 5, then y's tail first (3, 2), then x's (1, 0)
    assert a.allocate(6) == [4, 5, 3, 2, 1, 0]
    with pytest.raises(CacheTooLargeError, match="0 free blocks, 1 are needed"):
        a.allocate(1)
    a.release([0])
    with pytest.raises(ValueError, match="released more often"):
        a.release([0])


def test_prefix_cache_lookup_register_and_eviction_spares_held_blocks():
    a = BlockAllocator(4)
    hashes = block_hashes(list(range(12)), 4)
    assert len(hashes) == 3 and block_hashes(list(range(13)), 4) == hashes  # the partial block has none
    assert block_hashes([9] + list(range(1, 12)), 4)[1] != hashes[1]  # a hash covers the whole prefix
    blocks = a.allocate(3)
    a.register(blocks, hashes)
    assert a.cached_prefix(hashes) == 3 and a.num_cached == 3
    other = a.lookup(hashes[:2])
    assert other == blocks[:2] and a.refs[blocks[0]] == 2
    a.release(blocks)
    assert a.num_free == 2  # blocks 0 and 1 are still held through `other`
    # Pressure: two allocations evict the free cached block (2) and the never-used one, never 0 or 1.
    got = a.allocate(2)
    assert sorted(got) == [2, 3] and a.cached_prefix(hashes) == 2
    with pytest.raises(CacheTooLargeError):
        a.allocate(1)
    assert a.blocks_saved([hashes[:2], hashes[:3]]) == 2 + 2  # cached x2; block 3 counted once, repeated once
    # A cached block taken back from the free list is held: no allocation may hand it out again.
    a.release(other)
    a.release(got)
    taken = a.lookup(hashes[:1])
    assert taken == [blocks[0]] and a.num_free == 3
    assert blocks[0] not in a.allocate(3)


# ---- paged == any layout ----

INTERPRETED = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test")


@pytest.mark.parametrize("backend,mode,variant", [
    ("torch", "dense", "paper"), ("torch", "sparse", "paper"), ("torch", "resa", "paper"), ("torch", "resa", "fused"),
    pytest.param("triton", "resa", "fused", marks=INTERPRETED),
])
def test_shuffled_blocks_give_the_same_tokens_and_kv(backend, mode, variant):
    """Ragged rows whose blocks come from a shuffled free list (non-contiguous, interleaved) decode
    exactly as rows whose blocks are in order: the kernels and references follow the table."""
    # Shorter under the interpreter (slow): still ragged, sparse and rectified.
    prompts = random_prompts([70, 33, 5] if backend == "torch" else [45, 20, 5], seed=3)
    new, f = (NEW, 8) if backend == "torch" else (10, 4)
    runs = [_gen(_engine(backend, seed), prompts, mode=mode, rectify_variant=variant, rectify_every=f, new=new)
            for seed in (None, 11)]
    plain, shuffled = runs
    assert shuffled.token_ids == plain.token_ids
    blocks = shuffled.runner.cache.blocks
    assert any(b1 != b0 + 1 for row in blocks for b0, b1 in zip(row, row[1:])), "blocks were contiguous"
    for b, n in enumerate(plain.runner.lengths):
        got, want = shuffled.cache.row(b, n), plain.cache.row(b, n)
        torch.testing.assert_close(got.k, want.k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.kmax, want.kmax, rtol=1e-5, atol=1e-5)
    if mode != "dense":
        assert shuffled.stats.sparse_steps > 0 and shuffled.stats.kv_read_fraction < 0.9  # sparsity really active


def test_free_blocks_are_never_read():
    """Between every pass, all blocks no row holds are filled with NaN: the output is unchanged."""
    prompts = random_prompts([61, 18], seed=4)
    engine = _engine(shuffle_seed=5)
    want = _gen(engine, prompts, mode="resa").token_ids
    pool = engine.kv_pool(BS)
    original = engine.decode

    def poisoning_decode(runner, logits, **kw):
        step = runner.step

        def poisoned_step(tokens, sparse, observe=None, active=None):
            held = {b for row in runner.cache.blocks for b in row}
            free = torch.tensor([b for b in range(pool.num_blocks) if b not in held])
            for t in (pool.k, pool.v, pool.kmin, pool.kmax):
                t[:, free] = float("nan")
            return step(tokens, sparse, observe, active)

        runner.step = poisoned_step
        return original(runner, logits, **kw)

    engine.decode = poisoning_decode
    assert _gen(engine, prompts, mode="resa").token_ids == want


# ---- prefix caching ----

def test_common_prefix_of_three_and_a_half_blocks_shares_exactly_three():
    doc = random_prompts([14], seed=7)[0]                      # 3.5 blocks of 4
    a, b = doc + [1, 2, 3, 4, 5], doc + [6, 7]
    alone = [_gen(_engine(shuffle_seed=1), [p], mode="resa").token_ids[0] for p in (a, b)]
    engine = _engine(shuffle_seed=1)
    pool = engine.kv_pool(BS)
    first = _gen(engine, [a], mode="resa")
    assert first.stats.prefix_cached_tokens == 0
    shared_blocks = first.runner.cache.blocks[0][:3]
    snapshot = [t[:, shared_blocks].clone() for t in (pool.k, pool.v, pool.kmin, pool.kmax)]
    second = _gen(engine, [b], mode="resa")
    assert second.stats.prefix_cached_tokens == 3 * BS
    assert second.runner.cache.blocks[0][:3] == shared_blocks and second.runner.cache.blocks[0][3] != \
        first.runner.cache.blocks[0][3]
    assert [first.token_ids[0], second.token_ids[0]] == alone
    # Rectification, sparse steps and the second prompt's partial block never touched the shared blocks.
    for t, before in zip((pool.k, pool.v, pool.kmin, pool.kmax), snapshot):
        assert torch.equal(t[:, shared_blocks], before)
    del first, second
    assert pool.allocator.num_held == 0 and pool.allocator.num_free == pool.num_blocks  # all back
    assert pool.allocator.num_cached == 4 + 1  # a's four full prompt blocks, and b's own fourth


def test_batch_with_a_common_prefix_prefills_it_once():
    doc = random_prompts([40], seed=8)[0]
    prompts = [doc + q for q in random_prompts([3, 6, 9], seed=9)]
    shared = _gen(_engine(), prompts, mode="dense")
    unshared_engine = _engine()
    unshared_engine.prefix_caching = False
    unshared = _gen(unshared_engine, prompts, mode="dense")
    assert shared.token_ids == unshared.token_ids
    assert shared.stats.prefix_cached_tokens == 2 * 40  # rows 1 and 2 take row 0's ten blocks
    assert unshared.stats.prefix_cached_tokens == 0
    held = shared.runner.cache.blocks
    assert held[0][:10] == held[1][:10] == held[2][:10]


def test_fork_shares_blocks_until_written():
    engine = _engine(shuffle_seed=2)
    runner = engine.open(1, 200, BS)
    logits = runner.extend(random_prompts([22], seed=5), 16)
    parent_blocks = list(runner.cache.blocks[0])
    before = runner.cache.row(0, 22)
    child = runner.fork()
    assert child.cache.blocks[0] == parent_blocks
    cfg = ResaConfig(**SMALL)
    engine.decode(child, logits, resa=cfg, max_new_tokens=20, eos_token_ids=[])
    # The child wrote its own copy of the partial last block and new blocks; the parent is intact.
    assert child.cache.blocks[0][:5] == parent_blocks[:5] and child.cache.blocks[0][5] != parent_blocks[5]
    after = runner.cache.row(0, 22)
    assert torch.equal(after.k, before.k) and torch.equal(after.kmax, before.kmax)


# ---- limits ----

def test_pool_limits_are_clear_errors():
    engine = tiny_engine()
    cfg = engine.model.cfg
    per_block = KVPool.bytes_per_block(cfg.num_layers, cfg.num_kv_heads, BS, cfg.head_dim, 4)
    tiny = tiny_engine()
    tiny.kv_cache_gib = 0.5 * per_block / 2**30
    with pytest.raises(CacheTooLargeError, match="less than one block"):
        _gen(tiny, [[1, 2, 3]])
    small = tiny_engine()
    small.kv_cache_gib = 20 * per_block / 2**30  # 20 blocks = 80 tokens
    with pytest.raises(CacheTooLargeError, match="needs .* GiB of KV blocks but the pool has"):
        _gen(small, [list(range(60))] * 2)  # 2 x (60 + 30) tokens never fit
    assert _gen(small, [list(range(40))]).token_ids  # one row does
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        type(engine)(engine.model, gpu_memory_utilization=1.5)


def test_eviction_under_pressure_spares_the_blocks_in_use():
    """A pool of 40 blocks: cached prefixes are evicted when a later request needs the room, but
    never a block a row holds; outputs stay those of a fresh engine."""
    doc = random_prompts([24], seed=10)[0]                     # 6 blocks
    a, b = doc + [1, 2, 3], doc + [4, 5]
    other, third = random_prompts([60, 60], seed=11)           # 15 blocks + 8 for the new tokens each
    fresh = {tuple(p): _gen(_engine(), [p], mode="resa").token_ids[0] for p in (a, b, other, third)}
    engine = _engine(shuffle_seed=3, blocks=40)
    alloc = engine.kv_pool(BS).allocator
    assert _gen(engine, [a], mode="resa").token_ids[0] == fresh[tuple(a)]
    assert alloc.num_cached == 6
    # b takes a's six cached blocks while `other` runs next to it: together they hold 6 + 2 + 7 (b)
    # + 22 (other) = 37 of 40 blocks, so the allocation must not evict the six b holds.
    out = _gen(engine, [b, other], mode="resa")
    assert out.token_ids == [fresh[tuple(b)], fresh[tuple(other)]]
    assert out.stats.prefix_cached_tokens == 6 * BS
    del out
    cached = alloc.num_cached
    assert cached == 6 + 15                                     # a's prefix and other's full blocks
    # `third` (22 blocks, none cached) does not fit the 19 never-cached free blocks: some cached
    # blocks are evicted to make room.
    assert _gen(engine, [third], mode="resa").token_ids[0] == fresh[tuple(third)]
    assert alloc.num_cached < cached + 15
    again = _gen(engine, [a], mode="resa")
    assert again.token_ids[0] == fresh[tuple(a)]
    assert alloc.num_held == again.runner.cache.blocks_for(len(a) + NEW - 1)  # the last token is never fed


def test_pool_out_of_memory_is_a_clear_error(monkeypatch):
    """An allocation the device refuses becomes CacheTooLargeError naming the pool's size (not an
    AttributeError from the half-built pool)."""
    import resa.pool as pool_mod

    def refuse(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(pool_mod.torch, "empty", refuse)
    with pytest.raises(CacheTooLargeError, match=r"out of memory allocating a KV pool of 10 blocks \(0\.\d+ GiB\)"):
        pool_mod.KVPool(2, 10, 2, 4, 8, torch.float32, "cpu")
