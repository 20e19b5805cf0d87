"""Launch-shape sweep of `chunk_attention` by window width on one GPU: T queries per row over the
whole paged cache (T = w + 1 = 3, 5, 9, 17 for verify windows, T = f + 1 = 33 for a fused
rectification window) at Qwen2.5-7B shapes, for every config of `CONFIGS`, each with the split
count `choose_chunk_splits` gives it. Checks each config's output against the default config's
first, then times CUDA-graph replays. Prints one table (best config per shape and width against
the default), writes JSON to $OUT (or the working directory).

    PYTHONPATH=. python3 scripts/chunk_configs_sweep.py
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from resa.bench.kernels import _bench_graph, copy_bandwidth, random_kv_layer  # noqa: E402
from resa.kernels import chunk_attention  # noqa: E402
from resa.kernels.chunk_attention import ChunkConfig, choose_chunk_splits, default_config, query_tiles  # noqa: E402

H, HKV, D, BS = 28, 4, 128, 16
SHAPES = [(131072, 1), (131072, 4), (262144, 4)]
WIDTHS = [3, 5, 9, 17, 33]
CONFIGS = [
    ChunkConfig(64, 32, 4, 3), ChunkConfig(64, 64, 4, 2), ChunkConfig(64, 64, 4, 3), ChunkConfig(64, 64, 4, 4),
    ChunkConfig(64, 128, 4, 2), ChunkConfig(64, 128, 4, 3), ChunkConfig(64, 64, 8, 3), ChunkConfig(64, 128, 8, 3),
    ChunkConfig(128, 32, 4, 3), ChunkConfig(128, 64, 4, 3), ChunkConfig(128, 64, 8, 2), ChunkConfig(128, 64, 8, 3),
    ChunkConfig(128, 64, 8, 4), ChunkConfig(128, 128, 8, 2), ChunkConfig(128, 128, 8, 3),
    ChunkConfig(256, 64, 8, 2), ChunkConfig(256, 32, 8, 3),
]


def name(c: ChunkConfig) -> str:
    return f"m{c.block_m}-n{c.block_n}-w{c.num_warps}-s{c.num_stages}"


def main() -> None:
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    bw = copy_bandwidth(dev, 100)
    rows = []
    for n, b in SHAPES:
        nb = n // BS
        kp, vp = random_kv_layer(n, b, HKV, BS, D, dev, seed=n + b)
        g = torch.Generator(device=dev).manual_seed(n + b + 1)
        pages = torch.randperm(b * nb, device=dev, generator=g).to(torch.int32).view(b, nb)
        kv_bytes = 2 * b * HKV * n * D * 2
        for T in WIDTHS:
            qf = torch.randn(b, H, T, D, device=dev, dtype=torch.bfloat16, generator=g)
            start = torch.full((b,), n - T, dtype=torch.int64, device=dev)
            width = torch.full((b,), T, dtype=torch.int64, device=dev)
            outf = torch.empty_like(qf)
            ref = chunk_attention(qf, kp, vp, pages, start, width).float()
            flops = 4 * b * H * T * n * D
            for cfg in CONFIGS:
                _, m_tiles = query_tiles(H // HKV * T, cfg)
                splits = choose_chunk_splits(b * HKV, m_tiles, n, cfg.block_n, sms)
                got = chunk_attention(qf, kp, vp, pages, start, width, config=cfg).float()
                err = (got - ref).abs().max().item()
                us = _bench_graph(lambda cfg=cfg: chunk_attention(qf, kp, vp, pages, start, width, config=cfg,
                                                                  out=outf), 25)
                rows.append(dict(context=n, batch=b, T=T, config=name(cfg), default=cfg == default_config(H // HKV * T),
                                 splits=splits, programs=m_tiles * b * HKV * splits, us=round(us, 2),
                                 frac_bw=round(kv_bytes / us / 1e3 / bw, 3), tflops=round(flops / us / 1e6, 1),
                                 max_err=err))
                print(rows[-1], flush=True)
        del kp, vp
        torch.cuda.empty_cache()
    print(f"\ncopy bandwidth {bw:.0f} GB/s, {sms} SMs; best config per shape and window width:")
    print("| context | batch | T | default us | best config | best us | gain | best % copy BW | best TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key in sorted({(r["context"], r["batch"], r["T"]) for r in rows}):
        rs = [r for r in rows if (r["context"], r["batch"], r["T"]) == key]
        d = next(r for r in rs if r["default"])
        best = min(rs, key=lambda r: r["us"])
        print(f"| {key[0]} | {key[1]} | {key[2]} | {d['us']} | {best['config']} | {best['us']} | "
              f"{d['us'] / best['us']:.2f}x | {100 * best['frac_bw']:.0f}% | {best['tflops']} |")
    print("\nconfig | " + " | ".join(f"{n // 1024}K b{b} T{T}" for n, b in SHAPES for T in WIDTHS))
    for cfg in CONFIGS:
        cells = []
        for n, b in SHAPES:
            for T in WIDTHS:
                r = next(r for r in rows if (r["context"], r["batch"], r["T"], r["config"]) == (n, b, T, name(cfg)))
                cells.append(f"{r['us']:.0f}")
        print(f"{name(cfg)} | " + " | ".join(cells))
    out_dir = os.environ.get("OUT", ".")
    with open(os.path.join(out_dir, "chunk_configs_sweep.json"), "w") as fh:
        json.dump({"copy_GBps": bw, "sms": sms, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
