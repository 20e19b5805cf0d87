"""Experiment (GPU): the paged sparse decode and chunk kernels against the contiguous kernels of
the layout before the paged pool (commit ad2383e), Qwen2.5-7B shapes, 128K tokens, batch 4.

The contiguous kernels are imported as the package `resa_old`:
    mkdir -p /tmp/o && git archive ad2383e resa | tar -x -C /tmp/o && mv /tmp/o/resa /tmp/o/resa_old
    PYTHONPATH=. python scripts/paged_kernel_variants.py
Prints each variant's time in ms (CUDA-graph replays) and its largest difference from the
contiguous kernel's output.
"""
import sys, torch, triton
sys.path.insert(0, "/tmp/o")
import resa_old.kernels as old
from resa.kernels import sparse_decode, chunk_attention
from resa.kernels.sparse_decode import DecodeConfig
from resa.kernels.chunk_attention import ChunkConfig
from resa.ref import select_blocks_ref
dev = "cuda"
ORDERS = sys.argv[1:] or ["consecutive", "shuffled"]
B, H, HKV, D, N, BS = 4, 28, 4, 128, 131072, 16
nb = N // BS
g = torch.Generator(device=dev).manual_seed(0)
k = torch.randn(B, HKV, N, D, device=dev, dtype=torch.bfloat16, generator=g)
v = torch.randn(B, HKV, N, D, device=dev, dtype=torch.bfloat16, generator=g)
for order in ORDERS:
    perm = torch.arange(B * nb) if order == "consecutive" else torch.randperm(B * nb, generator=torch.Generator().manual_seed(1))
    perm = perm.to(dev)
    pages = perm.view(B, nb).to(torch.int32)
    kp = torch.empty(B * nb, HKV, BS, D, device=dev, dtype=torch.bfloat16)
    vp = torch.empty_like(kp)
    kp[pages.long().view(-1)] = k.view(B, HKV, nb, BS, D).transpose(1, 2).reshape(B * nb, HKV, BS, D)
    vp[pages.long().view(-1)] = v.view(B, HKV, nb, BS, D).transpose(1, 2).reshape(B * nb, HKV, BS, D)
    lens = torch.full((B,), N, device=dev)
    q = torch.randn(B, H, D, device=dev, dtype=torch.bfloat16, generator=g)
    S = 820
    chosen = torch.randperm(nb, generator=torch.Generator().manual_seed(2))[:S].sort().values
    table = chosen.to(torch.int32).view(1, 1, S).expand(B, HKV, S).contiguous().to(dev)
    full = torch.arange(nb, device=dev, dtype=torch.int32).view(1, 1, nb).expand(B, HKV, nb)
    ref = old.sparse_decode(q, k, v, lens, table, BS)
    res = {}
    for name, tb in (("sparse", table), ("dense", full)):
        res[f"old {name}"] = triton.testing.do_bench_cudagraph(lambda: old.sparse_decode(q, k, v, lens, tb, BS), rep=30)
        for cfg in (DecodeConfig(), DecodeConfig(4, 4, 3), DecodeConfig(8, 4, 3)):
            out = sparse_decode(q, kp, vp, pages, lens, tb, config=cfg)
            want = old.sparse_decode(q, k, v, lens, tb, BS)
            err = (out.float() - want.float()).abs().max().item()
            res[f"new {name} {cfg}"] = (triton.testing.do_bench_cudagraph(lambda: sparse_decode(q, kp, vp, pages, lens, tb, config=cfg), rep=30), err)
    f = 32
    qf = torch.randn(B, H, f, D, device=dev, dtype=torch.bfloat16, generator=g)
    start = torch.full((B,), N - f, device=dev); nv = torch.full((B,), f, device=dev)
    res["old chunk"] = triton.testing.do_bench_cudagraph(lambda: old.chunk_attention(qf, k, v, start, nv), rep=30)
    want = old.chunk_attention(qf, k, v, start, nv)
    for cfg in (ChunkConfig(), ChunkConfig(128, 64, 8, 3), ChunkConfig(256, 64, 8, 2)):
        out = chunk_attention(qf, kp, vp, pages, start, nv, config=cfg)
        err = (out.float() - want.float()).abs().max().item()
        res[f"new chunk {cfg}"] = (triton.testing.do_bench_cudagraph(lambda: chunk_attention(qf, kp, vp, pages, start, nv, config=cfg), rep=30), err)
    for kk, vv in res.items():
        print(order, kk, vv)
