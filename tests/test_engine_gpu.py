"""GPU engine: CUDA-graph decoding equals eager decoding. Run with `-m gpu` on a CUDA machine."""

import pytest
import torch

from resa.config import ResaConfig
from resa.engine import Engine
from tests.tiny import random_prompts, tiny_model

pytestmark = pytest.mark.gpu

SMALL = dict(block_size=16, min_blocks=4, active_ratio=0.1)


@pytest.fixture(scope="module")
def model():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny_model(seed=2, num_layers=3, head_dim=64, num_heads=8, num_kv_heads=2,
                       hidden_size=256, intermediate_size=512).to("cuda").eval()
    model.backend = "auto"  # the Triton kernels: graph capture needs selection without host syncs
    return model


def _gen(engine, mode, variant="paper", **kw):
    prompts = random_prompts([1500, 700], seed=5)
    return engine.generate_ids(prompts, resa=ResaConfig(mode=mode, rectify_variant=variant, rectify_every=8,
                                                        **{**SMALL, **kw}),
                               max_new_tokens=48, eos_token_ids=[])


@pytest.mark.parametrize("mode,variant", [("dense", "paper"), ("sparse", "paper"), ("resa", "paper"),
                                          ("resa", "fused")])
def test_graphs_equal_eager(model, mode, variant):
    graphed = _gen(Engine(model, cuda_graphs=True), mode, variant)
    eager = _gen(Engine(model, cuda_graphs=False), mode, variant)
    assert graphed.token_ids == eager.token_ids


def test_sparse_path_with_full_budget_equals_dense_on_gpu(model):
    """active_ratio 1 through the sparse kernels (not the dense shortcut), graph replays."""
    engine = Engine(model, cuda_graphs=True)
    prompts = random_prompts([1500, 700], seed=5)
    full = ResaConfig(mode="sparse", **{**SMALL, "active_ratio": 1.0})
    a, b = engine.open(2, 1600, 16), engine.open(2, 1600, 16)
    la, lb = a.extend(prompts, 512), b.extend(prompts, 512)
    for _ in range(16):
        tok = la.argmax(-1)
        assert torch.equal(tok, lb.argmax(-1))
        la, lb = a.step(tok, full), b.step(tok, None)
    assert a.graphs is not None and ("step", full) in a.graphs.graphs


def test_sparse_really_differs(model):
    engine = Engine(model, cuda_graphs=True)
    assert _gen(engine, "sparse").token_ids != _gen(engine, "dense").token_ids


def test_compiled_decode_equals_plain(model):
    plain = _gen(Engine(model, cuda_graphs=True), "resa")
    model.compile_decode()
    try:
        compiled = _gen(Engine(model, cuda_graphs=True), "resa")
    finally:
        model.compiled_fns = None
    assert compiled.token_ids == plain.token_ids


def test_reused_cache_and_graphs_equal_fresh(model):
    """A second generation of the same batch bucket replays the graphs captured by the first."""
    engine = Engine(model, cuda_graphs=True)
    first = _gen(engine, "resa", "fused")
    runner = engine._pooled
    keys = set(runner.graphs.graphs)
    second = _gen(engine, "resa", "fused")
    assert engine._pooled is runner and set(runner.graphs.graphs) == keys
    fresh = _gen(Engine(model, cuda_graphs=True, reuse_buffers=False), "resa", "fused")
    assert first.token_ids == second.token_ids == fresh.token_ids


def test_public_loop_equals_eager_forward(model):
    """The public loop with graphs (default) gives the tokens of plain eager forward passes."""
    engine = Engine(model, cuda_graphs=True)
    out = _gen(engine, "resa", "fused")
    eager = _gen(Engine(model, cuda_graphs=False, reuse_buffers=False), "resa", "fused")
    assert out.token_ids == eager.token_ids and out.stats.rectifications > 0


@pytest.mark.parametrize("mode,variant", [("dense", "paper"), ("sparse", "paper"), ("resa", "paper"),
                                          ("resa", "fused")])
def test_shuffled_pool_equals_in_order_pool_on_gpu(model, mode, variant):
    """Ragged rows whose blocks come from a shuffled free list (graphs, Triton kernels) decode the
    same tokens as rows whose blocks are in order, and a shared prefix changes nothing."""
    from resa.pool import KVPool

    cfg = model.cfg
    shuffled = Engine(model)
    blocks = 400
    order = torch.randperm(blocks, generator=torch.Generator().manual_seed(7)).tolist()
    shuffled._pools[16] = KVPool(cfg.num_layers, blocks, cfg.num_kv_heads, 16, cfg.head_dim, shuffled.dtype,
                                 "cuda", max_blocks=blocks, order=order)
    plain = _gen(Engine(model), mode, variant)
    assert _gen(shuffled, mode, variant).token_ids == plain.token_ids
    # The same prompts again: every full prompt block but the last comes from the prefix cache.
    again = _gen(shuffled, mode, variant)
    assert again.token_ids == plain.token_ids and again.stats.prefix_cached_tokens == (1499 // 16 + 699 // 16) * 16


@pytest.mark.parametrize("variant", ["paper", "fused"])
def test_continuous_batch_equals_requests_alone_on_gpu(model, variant):
    """Continuous batching through masked CUDA-graph passes (rows joining, leaving, rectified on
    their own cadence) gives each request what it gets alone in the lock-step loop."""
    from resa.batching import Batcher, Request

    engine = Engine(model, cuda_graphs=True, kv_cache_gib=0.5)
    cfg = ResaConfig(mode="resa", rectify_variant=variant, rectify_every=8, **SMALL)
    prompts = random_prompts([1500, 700, 90, 1100, 300, 20], seed=7)
    want = [engine.generate_ids([p], resa=cfg, max_new_tokens=40, eos_token_ids=[]).token_ids[0] for p in prompts]
    batcher = Batcher(engine, max_num_seqs=4, max_num_batched_tokens=512, max_model_len=2048)
    requests = []
    for p in prompts:
        requests.append(batcher.submit(Request(p, max_tokens=40, resa=cfg, eos_token_ids=[])))
        for _ in range(3):
            batcher.step()
    batcher.run_until_done()
    assert [r.output_ids for r in requests] == want
    assert any(key[0] == "rows" for key in batcher.runner.graphs.graphs)  # the masked passes were graphed
    assert batcher.counters.rectifications >= 12 and batcher.blocks_in_use() == 0


@pytest.mark.parametrize("cfg", [dict(mode="verify"), dict(mode="resa", rectify_every="auto", rectify_min=4)],
                         ids=["verify", "auto"])
def test_verify_and_auto_requests_in_a_continuous_batch_on_gpu(model, cfg):
    """Verify-mode and rectify_every="auto" requests through the batcher's masked CUDA-graph
    passes (windows of several widths, rollbacks between them) give what each gets alone."""
    from resa.batching import Batcher, Request

    engine = Engine(model, cuda_graphs=True, kv_cache_gib=0.5)
    resa = ResaConfig(**{**SMALL, **cfg})
    prompts = random_prompts([1500, 700, 1100, 300], seed=9)
    want = [engine.generate_ids([p], resa=resa, max_new_tokens=60, eos_token_ids=[]).token_ids[0] for p in prompts]
    batcher = Batcher(engine, max_num_seqs=4, max_num_batched_tokens=512, max_model_len=2048)
    requests = []
    for p in prompts:
        requests.append(batcher.submit(Request(p, max_tokens=60, resa=resa, eos_token_ids=[])))
        batcher.step()
    batcher.run_until_done()
    assert [r.output_ids for r in requests] == want
    assert batcher.blocks_in_use() == 0
