"""Continuous batching (resa.batching): requests that join and leave a running batch get exactly
what they get alone; masked passes leave the rows that sit them out untouched; blocks come back."""

import pytest
import torch

from resa.batching import Batcher, QueueFullError, Request
from resa.blocks import CacheTooLargeError
from resa.cache import Span
from resa.config import ResaConfig
from resa.engine import Engine, PromptTooLongError
from resa.pool import KVPool
from resa.sampling import SamplingConfig
from tests.tiny import random_prompts, tiny_engine, tiny_model

# Block 4 and min_blocks 4 make contexts above 16 tokens really sparse at tiny sizes.
SMALL = dict(block_size=4, min_blocks=4, active_ratio=0.1, rectify_every=8)
NEW = 24


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


def _alone(engine, prompt, cfg, sampling=SamplingConfig(), new=NEW):
    return engine.generate_ids([prompt], resa=cfg, sampling=sampling, max_new_tokens=new,
                               eos_token_ids=[]).token_ids[0]


def _staggered(batcher, requests, every=3):
    """Submit the requests `every` iterations apart, then run to the end."""
    for req in requests:
        batcher.submit(req)
        for _ in range(every):
            batcher.step()
    batcher.run_until_done()


def test_continuous_batch_equals_each_request_alone(engine):
    """16 requests of very different lengths and settings (ReSA paper/fused at two cadences,
    sparse, dense), arriving at staggered times into 5 slots with a small prefill budget: every
    output equals the request generated alone, token for token."""
    cfgs = [ResaConfig(**SMALL), ResaConfig(**SMALL, rectify_variant="fused"),
            ResaConfig(**{**SMALL, "rectify_every": 5}), ResaConfig(**SMALL, mode="sparse"),
            ResaConfig(**SMALL, mode="dense")]
    prompts = random_prompts([300, 7, 123, 1, 57, 200, 31, 90, 250, 16, 3, 180, 64, 40, 111, 9], seed=5)
    requests = [Request(p, max_tokens=NEW - (i % 3) * 7, resa=cfgs[i % len(cfgs)], eos_token_ids=[])
                for i, p in enumerate(prompts)]
    want = [_alone(engine, r.prompt_ids, r.resa, new=r.max_tokens) for r in requests]
    batcher = Batcher(engine, max_num_seqs=5, max_num_batched_tokens=96, block_size=4)
    _staggered(batcher, requests, every=2)
    for r, w in zip(requests, want):
        assert r.output_ids == w, r.id
        assert r.finish_reason == "length"
    c = batcher.counters
    assert c.rectifications >= 10 and c.rectification_passes <= c.rectifications
    assert c.kv_tokens_read < 0.8 * c.kv_tokens_dense  # sparsity really active
    dense = [_alone(engine, r.prompt_ids, r.resa.with_(mode="dense"), new=r.max_tokens) for r in requests]
    assert sum(a != b for a, b in zip(want, dense)) >= 5  # ... and it changes the outputs
    assert batcher.blocks_in_use() == 0


def test_requests_due_together_share_one_window_pass(engine):
    """Requests in step (same arrival, same cadence) are rectified in one window pass each time."""
    cfg = ResaConfig(**SMALL, rectify_variant="fused")
    prompts = random_prompts([100, 60, 80], seed=9)
    requests = [Request(p, max_tokens=NEW, resa=cfg, eos_token_ids=[]) for p in prompts]
    batcher = Batcher(engine, max_num_seqs=3, block_size=4)
    _staggered(batcher, requests, every=0)
    assert [r.output_ids for r in requests] == [_alone(engine, p, cfg) for p in prompts]
    c = batcher.counters
    assert c.rectifications == 3 * c.rectification_passes >= 6


def test_a_shared_prefix_arriving_together_is_computed_once(engine):
    """Four prompts that share a 200-token prefix nothing has cached yet, submitted at once, with
    a prefill budget far below the prefix: one computes each of its blocks, the others wait and
    take them; outputs as alone."""
    cfg = ResaConfig(**SMALL)
    prefix = random_prompts([200], seed=12)[0]
    prompts = [prefix + tail for tail in random_prompts([5, 30, 1, 17], seed=13)]
    want = [_alone(engine, p, cfg) for p in prompts]
    batcher = Batcher(Engine(engine.model), max_num_seqs=4, max_num_batched_tokens=48, block_size=4)
    requests = [Request(p, max_tokens=NEW, resa=cfg, eos_token_ids=[]) for p in prompts]
    _staggered(batcher, requests, every=0)
    assert [r.output_ids for r in requests] == want
    assert [r.stats.cached_tokens for r in requests] == [0, 200, 200, 200]
    assert batcher.counters.prefix_cache_hit_tokens == 600


def test_seeded_sampling_equals_each_request_alone(engine):
    cfg = ResaConfig(**SMALL)
    prompts = random_prompts([150, 20, 77, 5], seed=8)
    samplings = [SamplingConfig(temperature=0.8, top_p=0.9, seed=s) for s in (1, 2, 3, 4)]
    requests = [Request(p, max_tokens=NEW, resa=cfg, sampling=s, eos_token_ids=[]) for p, s in zip(prompts, samplings)]
    want = [_alone(engine, p, cfg, s) for p, s in zip(prompts, samplings)]
    batcher = Batcher(engine, max_num_seqs=3, max_num_batched_tokens=64, block_size=4)
    _staggered(batcher, requests)
    assert [r.output_ids for r in requests] == want


def test_eos_and_length_finish_and_stream_every_token(engine):
    prompts = random_prompts([60, 90], seed=2)
    cfg = ResaConfig(**SMALL)
    first = _alone(engine, prompts[0], cfg)
    eos = first[5]  # the sixth token of the first prompt ends it there
    seen: dict[str, list[int]] = {}
    ends: list[str] = []

    def on_output(req, ids, text):
        seen.setdefault(req.id, []).extend(ids)
        if req.finished:
            ends.append(req.id)

    requests = [Request(p, max_tokens=NEW, resa=cfg, eos_token_ids=[eos], on_output=on_output) for p in prompts]
    batcher = Batcher(engine, max_num_seqs=2, block_size=4)
    _staggered(batcher, requests, every=0)
    a, b = requests
    assert a.finish_reason == "eos" and a.output_ids == first[:first.index(eos)]
    assert seen[a.id] == a.output_ids and seen[b.id] == b.output_ids  # every token streamed, once
    assert sorted(ends) == sorted([a.id, b.id])
    assert a.stats.completion_tokens == len(a.output_ids) and a.stats.ttft is not None


def test_cancel_frees_blocks_of_running_and_waiting_requests(engine):
    cfg = ResaConfig(**SMALL)
    prompts = random_prompts([200, 150, 100], seed=3)
    requests = [Request(p, max_tokens=200, resa=cfg, eos_token_ids=[]) for p in prompts]
    batcher = Batcher(engine, max_num_seqs=2, block_size=4)
    for r in requests:
        batcher.submit(r)
    for _ in range(6):
        batcher.step()
    assert batcher.num_running == 2 and batcher.num_waiting == 1 and batcher.blocks_in_use() > 0
    batcher.cancel(requests[0].id)
    batcher.cancel(requests[2].id)
    batcher.step()
    assert requests[0].finish_reason == requests[2].finish_reason == "cancelled"
    assert batcher.num_running == 1
    batcher.cancel(requests[1].id)
    batcher.run_until_done()
    assert batcher.blocks_in_use() == 0 and batcher.pool.allocator.num_held == 0


def test_requests_wait_for_blocks_and_refusals_are_clear():
    """A pool that holds one request at a time: the second waits for the first one's blocks and
    both come out as alone; one that can never fit, one too long, a full queue: clear errors."""
    model = tiny_model()
    cfg = model.cfg
    per_block = KVPool.bytes_per_block(cfg.num_layers, cfg.num_kv_heads, 4, cfg.head_dim, 4)
    engine = Engine(model, kv_cache_gib=64 * per_block / 2**30)  # 64 blocks of 4 tokens
    cfg = ResaConfig(**SMALL)
    prompts = random_prompts([150, 120], seed=4)
    requests = [Request(p, max_tokens=NEW, resa=cfg, eos_token_ids=[]) for p in prompts]
    batcher = Batcher(engine, max_num_seqs=2, block_size=4, max_waiting=2)
    assert batcher.pool.max_blocks == 64
    for r in requests:
        batcher.submit(r)
    batcher.step()
    assert batcher.num_running == 1 and batcher.num_waiting == 1
    batcher.run_until_done()
    assert [r.output_ids for r in requests] == [_alone(engine, p, cfg) for p in prompts]
    with pytest.raises(CacheTooLargeError, match="more than the whole pool"):
        batcher.submit(Request(random_prompts([300])[0], max_tokens=8, resa=cfg))
    with pytest.raises(PromptTooLongError, match="max_tokens"):
        batcher.submit(Request([1] * 4000, max_tokens=200, resa=cfg))
    for r in [Request([1, 2], resa=cfg), Request([3], resa=cfg)]:
        batcher.submit(r)
    with pytest.raises(QueueFullError, match="retry later"):
        batcher.submit(Request([4], resa=cfg))
    with pytest.raises(ValueError, match="block_size must match"):
        Batcher(engine, block_size=4).submit(Request([1], resa=ResaConfig()))


def test_background_loop_serves_and_drains(engine):
    cfg = ResaConfig(**SMALL)
    prompts = random_prompts([80, 30, 140], seed=6)
    batcher = Batcher(engine, max_num_seqs=2, block_size=4)
    batcher.start()
    requests = [batcher.submit(Request(p, max_tokens=NEW, resa=cfg, eos_token_ids=[])) for p in prompts]
    batcher.shutdown(drain=True, timeout=60)
    assert [r.output_ids for r in requests] == [_alone(engine, p, cfg) for p in prompts]
    with pytest.raises(QueueFullError, match="shutting down"):
        batcher.submit(Request(prompts[0], resa=cfg))


# ---- masked passes (what a continuous batch runs): device-only spans as CUDA graphs capture ----

class _CallThrough:
    """Stands in for `resa.graphs.GraphSet` on CPU: runs the pass a graph would capture (its
    device-only span) every time, so the graph path of the runner runs without a GPU."""

    capture_seconds = 0.0

    def __init__(self) -> None:
        self.keys: set = set()

    def run(self, key, fn, tokens):
        self.keys.add(key)
        return fn(tokens)

    def clear(self) -> None:
        pass


@pytest.mark.parametrize("variant", ["paper", "fused"])
def test_graph_path_of_the_batch_equals_each_request_alone(engine, variant):
    """The batcher's masked passes as CUDA graphs run them (device-side row mask and starts,
    padding written to the sink block), on CPU: outputs equal each request alone."""
    cfg = ResaConfig(**SMALL, rectify_variant=variant)
    prompts = random_prompts([200, 9, 130, 60, 33], seed=11)
    want = [_alone(engine, p, cfg) for p in prompts]
    batcher = Batcher(engine, max_num_seqs=3, max_num_batched_tokens=80, block_size=4)
    batcher.runner.graphs = graphs = _CallThrough()
    requests = [Request(p, max_tokens=NEW, resa=cfg, eos_token_ids=[]) for p in prompts]
    _staggered(batcher, requests, every=2)
    assert [r.output_ids for r in requests] == want
    masked = [k for k in graphs.keys if k[0] == "rows"]
    assert any(k[1:3] == (1, 0) for k in masked) and any(k[1] > 1 for k in masked)  # steps and windows
    assert batcher.runner.cache.sink is not None and batcher.blocks_in_use() == 0


def test_verify_requests_in_a_continuous_batch_equal_dense(engine):
    """Greedy verify-mode requests sharing the batch with ReSA (fused, so verification windows and
    rectification windows may share a pass) and dense requests: each verify output is dense
    decoding's token for token; drafts were both accepted and rejected; every block comes back."""
    cfgs = [ResaConfig(**SMALL, mode="verify", draft_min=2, draft_max=8), ResaConfig(**SMALL, rectify_variant="fused"),
            ResaConfig(**SMALL, mode="verify"), ResaConfig(**SMALL, mode="dense")]
    prompts = random_prompts([300, 40, 123, 200, 9, 250, 77, 150], seed=17)
    requests = [Request(p, max_tokens=NEW + 6, resa=cfgs[i % len(cfgs)], eos_token_ids=[])
                for i, p in enumerate(prompts)]
    want = [_alone(engine, r.prompt_ids, r.resa.with_(mode="dense") if r.resa.mode == "verify" else r.resa,
                   new=r.max_tokens) for r in requests]
    batcher = Batcher(engine, max_num_seqs=4, max_num_batched_tokens=96, block_size=4)
    _staggered(batcher, requests, every=2)
    verify = [r for r in requests if r.resa.mode == "verify"]
    for r, w in zip(requests, want):
        assert r.output_ids == w, r.id
        assert r.finish_reason == "length"
    drafted = sum(r.stats.drafted for r in verify)
    accepted = sum(r.stats.accepted for r in verify)
    assert 0 < accepted < drafted and all(r.stats.verify_windows > 0 for r in verify)
    assert batcher.blocks_in_use() == 0
    sparse = [_alone(engine, r.prompt_ids, r.resa.with_(mode="sparse"), new=r.max_tokens) for r in verify]
    assert any(s != r.output_ids for s, r in zip(sparse, verify))  # the drafts alone would differ


def test_sampled_verify_requests_finish_with_their_budget(engine):
    """Sampled verify requests (seeded) in a batch: each emits exactly max_tokens tokens, the same
    ones on a second run, and rolled-back rows leave no blocks behind."""
    cfg = ResaConfig(**SMALL, mode="verify")
    prompts = random_prompts([200, 60, 140], seed=19)

    def run():
        batcher = Batcher(engine, max_num_seqs=2, max_num_batched_tokens=128, block_size=4)
        reqs = [Request(p, max_tokens=NEW, resa=cfg, eos_token_ids=[], sampling=SamplingConfig(temperature=0.8, seed=i))
                for i, p in enumerate(prompts)]
        _staggered(batcher, reqs, every=1)
        assert batcher.blocks_in_use() == 0
        return reqs

    first, second = run(), run()
    assert all(len(r.output_ids) == NEW for r in first)
    assert [r.output_ids for r in first] == [r.output_ids for r in second]
    assert sum(r.stats.drafted for r in first) > sum(r.stats.accepted for r in first) > 0


@pytest.mark.parametrize("variant", ["paper", "fused"])
def test_auto_cadence_is_each_requests_own(engine, variant):
    """rectify_every="auto" in a continuous batch: a request whose sparse steps drift (active
    0.05) and one whose steps agree with dense (active 0.9) share the batch with a fixed-f request;
    each gets the tokens and the sequence of window widths it gets alone, and the two auto
    requests' f part ways (the cadence is the request's own, not the batch's). They arrive
    together, so their first windows share one pass."""
    auto = dict(block_size=4, min_blocks=4, rectify_every="auto", rectify_min=4, rectify_max=32,
                rectify_variant=variant)
    cfgs = [ResaConfig(**auto, active_ratio=0.05), ResaConfig(**auto, active_ratio=0.9), ResaConfig(**SMALL)]
    prompts = random_prompts([160, 160, 77], seed=13)
    new = 100
    alone = [engine.generate_ids([p], resa=c, max_new_tokens=new, eos_token_ids=[]) for p, c in zip(prompts, cfgs)]
    batcher = Batcher(engine, max_num_seqs=3, max_num_batched_tokens=512, block_size=4)
    requests = [Request(p, max_tokens=new, resa=c, eos_token_ids=[]) for p, c in zip(prompts, cfgs)]
    _staggered(batcher, requests, every=0)
    assert batcher.counters.rectification_passes < batcher.counters.rectifications  # windows shared a pass
    for r, a in zip(requests, alone):
        assert r.output_ids == a.token_ids[0], r.id
        assert r.stats.rectify_widths == [w for _, _, w in a.stats.rectified_at], r.id
    low, high, fixed = (r.stats.rectify_widths for r in requests)
    assert low[-1] < high[-1] and len(low) > len(high)
    assert set(fixed) == {8}


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton interpreter test (CPU tensors)")
@pytest.mark.parametrize("backend,sparse", [("torch", True), ("torch", False), ("triton", True)])
def test_masked_device_spans_equal_host_spans(backend, sparse):
    """Steps and windows of a subset of rows through device-only ragged spans (padding columns
    written into the sink block) give the logits and K/V of host spans, and leave the other rows'
    K/V, summaries and lengths as they were."""
    model = tiny_model(seed=3, hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=64, num_layers=2)
    model.backend = backend
    engine = Engine(model)
    cfg = ResaConfig(block_size=16, min_blocks=2, active_ratio=0.3) if sparse else None
    # > 128: the prefill runs through SDPA (fast); row 3 stays empty (an idle slot) throughout
    prompts = random_prompts([150, 140, 129], seed=6) + [[]]
    host, dev = engine.open(4, 200, 16), engine.open(4, 200, 16)
    logits = host.extend(prompts, 256)
    dev.extend(prompts, 256)
    dev.cache.ensure_sink()
    tok = logits.argmax(-1)
    passes = [([True, False, True, False], 1, 0), ([False, True, False, False], 1, 0),
              ([True, True, False, False], 2, 1), ([False, False, True, False], 3, 3)]
    for active, W, overwrite in passes:
        mask = torch.tensor(active, dtype=torch.int64)
        start = [n - overwrite if a else n for n, a in zip(host.lengths, active)]
        n_valid = [W if a else 0 for a in active]
        for r in (host, dev):
            r.cache.reserve(start, [s + n for s, n in zip(start, n_valid)])
        before = {b: dev.cache.row(b, n) for b, n in enumerate(dev.lengths) if not active[b]}
        window = tok[:, None].expand(4, W).contiguous()
        step_cfg = cfg if W == 1 else None
        a = model.run(window, host.cache, Span.make(start, n_valid, W, "cpu"), step_cfg)
        b = model.run(window, dev.cache, Span.on_device(dev.cache.lengths - overwrite * mask, W, mask * W), step_cfg)
        rows = [i for i, x in enumerate(active) if x]
        torch.testing.assert_close(b[rows], a[rows], rtol=1e-4, atol=1e-4)
        host.lengths = dev.lengths = [s + n for s, n in zip(start, n_valid)]
        assert dev.cache.lengths.tolist() == host.cache.lengths.tolist() == host.lengths
        for i, n in enumerate(host.lengths):
            got, want = dev.cache.row(i, n), host.cache.row(i, n)
            torch.testing.assert_close(got.k, want.k, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got.kmax, want.kmax, rtol=1e-4, atol=1e-4)
            if i in before:  # sat the pass out: bit for bit as before
                assert torch.equal(got.k, before[i].k) and torch.equal(got.kmin, before[i].kmin)
        tok = a.argmax(-1)
