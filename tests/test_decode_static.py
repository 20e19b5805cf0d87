"""The device-side decode step (what CUDA graphs capture) equals the host-driven step."""

import pytest
import torch

from resa.cache import KVCache
from resa.config import ResaConfig
from tests.tiny import random_prompts, tiny_engine


def two_prefilled(seed, lengths, capacity, chunk):
    """An engine (unpoisoned: both paths must see the same contents) and two identical prefilled caches."""
    engine = tiny_engine(seed=seed)
    engine.poison_cache = False
    prompts = random_prompts(lengths, seed=seed + 1)
    caches = []
    for _ in range(2):
        cache = engine.new_cache(len(lengths), capacity, 4)
        engine.prefill(cache, prompts, chunk=chunk)
        caches.append(cache)
    return engine, caches


def assert_rows_equal(a, b, ends, with_v=False):
    """K (and V), and the block summaries, of every row up to its length agree."""
    for row, n in enumerate(ends):
        nb = -(-n // a.block_size)
        names = ("k", "v") if with_v else ("k",)
        for name in names:
            torch.testing.assert_close(getattr(a, name)[:, row, :, :n], getattr(b, name)[:, row, :, :n],
                                       rtol=1e-5, atol=1e-5)
        for name in ("kmin", "kmax"):
            torch.testing.assert_close(getattr(a, name)[:, row, :, :nb], getattr(b, name)[:, row, :, :nb],
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_decode_static_matches_step(mode):
    engine, caches = two_prefilled(3, [150, 67], 200, 64)
    resa = ResaConfig(mode=mode, block_size=4, min_blocks=4, active_ratio=0.2)
    tokens = torch.tensor([[5, 6], [7, 8], [9, 10], [11, 12], [13, 14], [15, 16], [17, 18]])
    for tok in tokens:
        ref = engine.step(caches[0], tok, resa)
        out = engine.model.decode_static(tok, caches[1], None if mode == "dense" else resa)
        caches[1].host_lengths = [n + 1 for n in caches[1].host_lengths]
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert caches[1].lengths.tolist() == caches[0].lengths.tolist() == [157, 74]
    assert_rows_equal(caches[1], caches[0], (157, 74))


@pytest.mark.parametrize("overwrite", [8, 7, 0])
def test_window_static_matches_dense_window(overwrite):
    """The device-side rectification pass (what a CUDA graph captures) equals the host-driven one:
    same logits, same rewritten K/V and summaries, same lengths."""
    engine, caches = two_prefilled(5, [90, 45], 128, 32)
    window = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(7))
    ref = engine.dense_window(caches[0], window, overwrite=overwrite)
    out = engine.model.window_static(window, caches[1], overwrite=overwrite)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    ends = [90 - overwrite + 8, 45 - overwrite + 8]
    assert caches[1].lengths.tolist() == ends == list(caches[0].host_lengths)
    assert_rows_equal(caches[1], caches[0], ends, with_v=True)


def test_fused_projections_are_views_and_follow_loads():
    """Fusing stacks q/k/v and gate/up without copying the parameters; the decode step gives the
    same logits fused or not, weights loaded later land in the fused matrices, and a model cast
    after fusing falls back to (correct) fresh concatenations."""
    from tests.tiny import tiny_model

    model = tiny_model(seed=9, attention_bias=True)
    tokens = torch.tensor([3, 4])

    def step(m):
        cache = KVCache(m.cfg.num_layers, 2, m.cfg.num_kv_heads, 16, m.cfg.head_dim, 4)
        return m.decode_static(tokens, cache, None)

    before = step(model)
    n_params = sum(p.numel() for p in model.parameters())
    model.fuse_projections()
    sa, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    wqkv, bqkv = sa.qkv_weights()
    assert wqkv is sa._qkv[0] and bqkv is sa._qkv[1]
    assert sa.k_proj.weight.data_ptr() == wqkv[sa.q_proj.weight.shape[0]].data_ptr()
    assert mlp.gate_up_weight() is mlp._gate_up[0]
    assert sum(p.numel() for p in model.parameters()) == n_params
    torch.testing.assert_close(step(model), before, rtol=0, atol=0)

    state = {k: v.clone() * 0.5 for k, v in model.state_dict().items()}
    model.load_weights(state)
    assert sa.qkv_weights()[0] is sa._qkv[0]
    torch.testing.assert_close(sa._qkv[0][-1], state["model.layers.0.self_attn.v_proj.weight"][-1])
    halved = step(model)
    assert not torch.allclose(halved, before)

    model.double()
    assert sa.qkv_weights()[0] is not sa._qkv[0]
    torch.testing.assert_close(step(model).float(), halved, rtol=1e-4, atol=1e-4)
