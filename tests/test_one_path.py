"""The GPU's step path on CPU: the same forward through the Triton kernels (under Triton's
interpreter) equals the torch reference backend token for token, with sparsity and rectification
really active; device-only spans (what CUDA graphs capture) equal eager host spans."""

import pytest
import torch

from resa.cache import Span
from resa.config import ResaConfig
from resa.engine import Engine
from tests.tiny import random_prompts, tiny_model

# CPU tests of the kernels under Triton's interpreter; on CUDA machines tests/test_engine_gpu.py
# runs the same path on the GPU.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="Triton interpreter test (CPU tensors)")

# head_dim 64: the smallest the kernels take. Block 16 with min_blocks 2 makes ~100-token rows sparse;
# prefill chunks wider than the chunk kernel's limit run through SDPA (the interpreter is slow).
CFG = ResaConfig(mode="resa", block_size=16, min_blocks=2, active_ratio=0.3, rectify_every=4, prefill_chunk=256)


def _engine(backend: str) -> Engine:
    model = tiny_model(seed=3, hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=64, num_layers=2)
    model.backend = backend
    return Engine(model)


@pytest.mark.parametrize("variant", ["paper", "fused"])
def test_triton_kernels_equal_torch_reference_token_for_token(variant):
    prompts = random_prompts([150, 97], seed=4)
    cfg = CFG.with_(rectify_variant=variant)
    outs = {b: _engine(b).generate_ids(prompts, resa=cfg, max_new_tokens=10, eos_token_ids=[], keep_cache=True)
            for b in ("torch", "triton")}
    ref, tri = outs["torch"], outs["triton"]
    assert tri.token_ids == ref.token_ids
    assert tri.stats.rectifications == ref.stats.rectifications >= 2
    assert tri.stats.kv_read_fraction < 0.9  # sparsity really active
    dense = _engine("torch").generate_ids(prompts, resa=cfg.with_(mode="dense"), max_new_tokens=10, eos_token_ids=[])
    assert dense.token_ids != ref.token_ids  # ... and it changes the output
    for b, n in enumerate(ref.runner.lengths):
        got, want = tri.cache.row(b, n), ref.cache.row(b, n)
        torch.testing.assert_close(got.k, want.k, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(got.kmax, want.kmax, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend,sparse", [("torch", False), ("torch", True), ("triton", True)])
def test_device_only_spans_equal_host_spans(backend, sparse):
    """The passes a CUDA graph captures (device-side starts, no host mirror) give the logits and
    K/V of the eager passes with host mirrors: decode steps and rectification windows."""
    engine = _engine(backend)
    prompts = random_prompts([120, 75], seed=6)
    host, dev = engine.open(2, 200, 16), engine.open(2, 200, 16)
    logits = host.extend(prompts, 256)
    dev.extend(prompts, 256)
    model, cfg = engine.model, (CFG if sparse else None)
    tok = logits.argmax(-1)
    for step in range(2):
        for r in (host, dev):  # the blocks the step writes (the runner does this before its passes)
            r.cache.reserve(r.lengths, [n + 1 for n in r.lengths])
        a = model.run(tok[:, None], host.cache, Span.make(host.lengths, [1, 1], 1, "cpu"), cfg)
        b = model.run(tok[:, None], dev.cache, Span.on_device(dev.cache.lengths.clone(), 1), cfg)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        host.lengths = dev.lengths = [n + 1 for n in host.lengths]
        tok = a.argmax(-1)
    window = torch.stack([tok, tok], 1)
    for r in (host, dev):
        r.cache.reserve([n - 1 for n in r.lengths], [n + 1 for n in r.lengths])
    a = model.run(window, host.cache, Span.make([n - 1 for n in host.lengths], [2, 2], 2, "cpu"), None)
    b = model.run(window, dev.cache, Span.on_device(dev.cache.lengths - 1, 2), None)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert host.cache.lengths.tolist() == dev.cache.lengths.tolist() == [123, 78]
    for r, n in enumerate([123, 78]):
        torch.testing.assert_close(dev.cache.row(r, n).k, host.cache.row(r, n).k, rtol=1e-4, atol=1e-4)
