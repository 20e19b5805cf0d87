"""The device-side decode step (what CUDA graphs capture) equals the host-driven step."""

import pytest
import torch

from resa.config import ResaConfig
from tests.tiny import random_prompts, tiny_engine


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_decode_static_matches_step(mode):
    engine = tiny_engine(seed=3)
    engine.poison_cache = False  # both paths must see the same cache contents
    resa = ResaConfig(mode=mode, block_size=4, min_blocks=4, active_ratio=0.2)
    prompts = random_prompts([150, 67], seed=4)
    caches = []
    for _ in range(2):
        cache = engine.new_cache(2, 200, 4)
        engine.prefill(cache, prompts, chunk=64)
        caches.append(cache)
    tokens = torch.tensor([[5, 6], [7, 8], [9, 10], [11, 12], [13, 14], [15, 16], [17, 18]])
    for tok in tokens:
        ref = engine.step(caches[0], tok, resa)
        out = engine.model.decode_static(tok, caches[1], None if mode == "dense" else resa)
        caches[1].host_lengths = [n + 1 for n in caches[1].host_lengths]
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert caches[1].lengths.tolist() == caches[0].lengths.tolist() == [157, 74]
    for row, n in enumerate((157, 74)):
        nb = -(-n // 4)
        torch.testing.assert_close(caches[1].k[:, row, :, :n], caches[0].k[:, row, :, :n], rtol=1e-5, atol=1e-5)
        for name in ("kmin", "kmax"):
            a, b = getattr(caches[1], name), getattr(caches[0], name)
            torch.testing.assert_close(a[:, row, :, :nb], b[:, row, :, :nb], rtol=1e-5, atol=1e-5)
