"""Split-K sweep of the decode-time attention kernels on one GPU: `sparse_decode` (a ReSA step,
active 0.1) and `chunk_attention` (T queries per row over the whole cache: the rectification
window, T = f = 32, and a verify window, T = w + 1 = 9) at Qwen2.5-7B shapes, for several split
counts against the default `choose_splits` / `choose_chunk_splits`. Checks each variant's output
against the default's first, then times CUDA-graph replays. Prints one table, writes JSON to
$OUT (or the working directory).

    PYTHONPATH=. python3 scripts/splits_sweep.py
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from resa.bench.kernels import _bench_graph, copy_bandwidth, random_kv_layer  # noqa: E402
from resa.kernels import chunk_attention, select_blocks, sparse_decode  # noqa: E402
from resa.kernels.chunk_attention import choose_chunk_splits, default_config, query_tiles  # noqa: E402
from resa.kernels.sparse_decode import DecodeConfig, choose_splits  # noqa: E402
from resa.ref.selection import block_budget  # noqa: E402

H, HKV, D, BS = 28, 4, 128, 16
SHAPES = [(131072, 1), (131072, 4), (131072, 8), (262144, 1), (262144, 4)]
SPARSE_SPLITS = [2, 4, 6, 8, 11, 16, 22, 32, 33, 48, 64, 66, 128]
CHUNK_SPLITS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 33, 64]


def main() -> None:
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    bw = copy_bandwidth(dev, 100)
    rows = []
    for n, b in SHAPES:
        nb = n // BS
        kp, vp = random_kv_layer(n, b, HKV, BS, D, dev, seed=n + b)
        g = torch.Generator(device=dev).manual_seed(n + b + 1)
        pmin, pmax = kp.amin(2).contiguous(), kp.amax(2).contiguous()
        pages = torch.arange(b * nb, dtype=torch.int32, device=dev).view(b, nb)
        lengths = torch.full((b,), n, dtype=torch.int64, device=dev)
        q = torch.randn(b, H, D, device=dev, dtype=torch.bfloat16, generator=g)
        slots = block_budget(nb, 0.1, 16)
        table, nsel = select_blocks(q, pmin, pmax, pages, lengths, block_size=BS, active_ratio=0.1, min_blocks=16,
                                    num_slots=slots)
        sel_tokens = int((table >= 0).sum()) * BS
        attn_bytes = 2 * sel_tokens * D * 2
        out = torch.empty(b, H, D, dtype=torch.bfloat16, device=dev)
        default = choose_splits(b, HKV, slots, DecodeConfig().blocks_per_iter, sms)
        ref = sparse_decode(q, kp, vp, pages, lengths, table, num_selected=nsel).float()
        for s in sorted(set(SPARSE_SPLITS + [default])):
            got = sparse_decode(q, kp, vp, pages, lengths, table, num_selected=nsel, num_splits=s).float()
            err = (got - ref).abs().max().item()
            us = _bench_graph(lambda s=s: sparse_decode(q, kp, vp, pages, lengths, table, num_selected=nsel,
                                                        num_splits=s, out=out), 25)
            rows.append(dict(op="sparse_decode", context=n, batch=b, splits=s, default=s == default,
                             programs=b * HKV * s, waves=b * HKV * s / sms, us=round(us, 2),
                             frac_bw=round(attn_bytes / us / 1e3 / bw, 3), max_err=err))
            print(rows[-1], flush=True)
        kv_bytes = 2 * b * HKV * n * D * 2
        for T in (32, 9):
            qf = torch.randn(b, H, T, D, device=dev, dtype=torch.bfloat16, generator=g)
            start = torch.full((b,), n - T, dtype=torch.int64, device=dev)
            width = torch.full((b,), T, dtype=torch.int64, device=dev)
            outf = torch.empty_like(qf)
            cfg = default_config(H // HKV * T)
            _, m_tiles = query_tiles(H // HKV * T, cfg)
            default = choose_chunk_splits(b * HKV, m_tiles, n, cfg.block_n, sms)
            ref = chunk_attention(qf, kp, vp, pages, start, width).float()
            for s in sorted(set(CHUNK_SPLITS + [default])):
                got = chunk_attention(qf, kp, vp, pages, start, width, num_splits=s).float()
                err = (got - ref).abs().max().item()
                us = _bench_graph(lambda s=s: chunk_attention(qf, kp, vp, pages, start, width, num_splits=s,
                                                              out=outf), 25)
                rows.append(dict(op=f"chunk_T{T}", context=n, batch=b, splits=s, default=s == default,
                                 programs=m_tiles * b * HKV * s, waves=m_tiles * b * HKV * s / sms,
                                 us=round(us, 2), frac_bw=round(kv_bytes / us / 1e3 / bw, 3), max_err=err))
                print(rows[-1], flush=True)
        del kp, vp, pmin, pmax
        torch.cuda.empty_cache()
    print(f"\ncopy bandwidth {bw:.0f} GB/s, {sms} SMs; best split per op and shape:")
    print("| op | context | batch | default splits | default us | best splits | best us | gain |")
    print("|---|---|---|---|---|---|---|---|")
    keys = sorted({(r["op"], r["context"], r["batch"]) for r in rows}, key=lambda k: (k[0], k[1], k[2]))
    for key in keys:
        rs = [r for r in rows if (r["op"], r["context"], r["batch"]) == key]
        d = next(r for r in rs if r["default"])
        best = min(rs, key=lambda r: r["us"])
        print(f"| {key[0]} | {key[1]} | {key[2]} | {d['splits']} | {d['us']} | {best['splits']} | {best['us']} | "
              f"{d['us'] / best['us']:.2f}x |")
    out_dir = os.environ.get("OUT", ".")
    with open(os.path.join(out_dir, "splits_sweep.json"), "w") as fh:
        json.dump({"copy_GBps": bw, "sms": sms, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
