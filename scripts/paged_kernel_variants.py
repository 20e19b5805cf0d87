"""Experiment: paged kernel variants vs the contiguous kernels of the previous layout, 128K b4, Qwen2.5-7B shapes."""
import sys, torch, triton
sys.path.insert(0, "/tmp/o")
import resa_old.kernels as old
from resa.kernels import sparse_decode, chunk_attention
from resa.kernels.sparse_decode import DecodeConfig
from resa.kernels.chunk_attention import ChunkConfig
from resa.ref import select_blocks_ref
dev = "cuda"
B, H, HKV, D, N, BS = 4, 28, 4, 128, 131072, 16
nb = N // BS
g = torch.Generator(device=dev).manual_seed(0)
k = torch.randn(B, HKV, N, D, device=dev, dtype=torch.bfloat16, generator=g)
v = torch.randn(B, HKV, N, D, device=dev, dtype=torch.bfloat16, generator=g)
for order in ("consecutive", "shuffled"):
    perm = torch.arange(B * nb, device=dev) if order == "consecutive" else torch.randperm(B * nb, device=dev, generator=g)
    pages = perm.view(B, nb).to(torch.int32)
    kp = torch.empty(B * nb, HKV, BS, D, device=dev, dtype=torch.bfloat16)
    vp = torch.empty_like(kp)
    kp[pages.long().view(-1)] = k.view(B, HKV, nb, BS, D).transpose(1, 2).reshape(B * nb, HKV, BS, D)
    vp[pages.long().view(-1)] = v.view(B, HKV, nb, BS, D).transpose(1, 2).reshape(B * nb, HKV, BS, D)
    lens = torch.full((B,), N, device=dev)
    q = torch.randn(B, H, D, device=dev, dtype=torch.bfloat16, generator=g)
    S = 820
    table = torch.sort(torch.randperm(nb, device=dev, generator=g)[:S].view(1, 1, S).expand(B, HKV, S).to(torch.int32), -1).values.contiguous()
    full = torch.arange(nb, device=dev, dtype=torch.int32).view(1, 1, nb).expand(B, HKV, nb)
    ref = old.sparse_decode(q, k, v, lens, table, BS)
    res = {}
    for name, tb in (("sparse", table), ("dense", full)):
        res[f"old {name}"] = triton.testing.do_bench_cudagraph(lambda: old.sparse_decode(q, k, v, lens, tb, BS), rep=30)
        for cfg in (DecodeConfig(), DecodeConfig(per_token_pages=True), DecodeConfig(4, 4, 3), DecodeConfig(4, 4, 3, True), DecodeConfig(8, 4, 3, True)):
            out = sparse_decode(q, kp, vp, pages, lens, tb, config=cfg)
            want = old.sparse_decode(q, k, v, lens, tb, BS)
            err = (out.float() - want.float()).abs().max().item()
            res[f"new {name} {cfg}"] = (triton.testing.do_bench_cudagraph(lambda: sparse_decode(q, kp, vp, pages, lens, tb, config=cfg), rep=30), err)
    f = 32
    qf = torch.randn(B, H, f, D, device=dev, dtype=torch.bfloat16, generator=g)
    start = torch.full((B,), N - f, device=dev); nv = torch.full((B,), f, device=dev)
    res["old chunk"] = triton.testing.do_bench_cudagraph(lambda: old.chunk_attention(qf, k, v, start, nv), rep=30)
    want = old.chunk_attention(qf, k, v, start, nv)
    for cfg in (ChunkConfig(), ChunkConfig(per_token_pages=True), ChunkConfig(128, 64, 8, 4, True), ChunkConfig(256, 64, 8, 2), ChunkConfig(256, 64, 8, 2, True), ChunkConfig(128, 128, 8, 2, True), ChunkConfig(128, 128, 8, 3, True)):
        out = chunk_attention(qf, kp, vp, pages, start, nv, config=cfg)
        err = (out.float() - want.float()).abs().max().item()
        res[f"new chunk {cfg}"] = (triton.testing.do_bench_cudagraph(lambda: chunk_attention(qf, kp, vp, pages, start, nv, config=cfg), rep=30), err)
    for kk, vv in res.items():
        print(order, kk, vv)
