"""Kernel benchmark: ReSA's selection and sparse attention against torch SDPA dense decode.

One run on one GPU measures, side by side: the device-to-device copy bandwidth (the roofline),
SDPA dense decode (the baseline a user has), our selection (three top-n methods), our sparse
attention (a short list of launch configs), selection + attention (eager and CUDA-graph replay), and
SDPA on the rectification shape (f queries per row, bottom-right causal). Every row reports the
median time (CUDA events via triton.testing.do_bench), the bytes the op must move, the achieved
GB/s and the ratio to the copy bandwidth. Data is random (never zeros). Results go to
<out-dir>/<name>.json and <name>.md.

    python -m resa.bench.kernels --out-dir benchmarks/kernels
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

MODELS = {"qwen2.5-7b": (28, 4, 128), "llama-3.1-8b": (32, 8, 128)}
KIB = 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--contexts", nargs="+", type=int, default=[16 * KIB, 32 * KIB, 64 * KIB, 128 * KIB, 256 * KIB])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--active-ratio", type=float, default=0.1)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--min-blocks", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--max-cache-gib", type=float, default=24.0, help="skip shapes whose K+V exceed this")
    parser.add_argument("--sweep", action="store_true", help="time every config of DECODE_CONFIGS at every shape")
    parser.add_argument("--rectify-window", type=int, default=32, help="f: queries per row of the rectification pass")
    parser.add_argument("--sweep-from", type=int, default=64 * KIB, help="sweep only contexts >= this")
    parser.add_argument("--rep-ms", type=int, default=60, help="do_bench time per eager measurement")
    parser.add_argument("--graph-rep-ms", type=int, default=25, help="time per CUDA-graph measurement")
    parser.add_argument("--out-dir", default="benchmarks/kernels")
    parser.add_argument("--name", default=None, help="file stem (default: derived from the card's name)")


def _bench(fn, rep_ms: int) -> float:
    """Median time in microseconds (CUDA events; L2 flushed before each run by do_bench)."""
    import triton

    return 1000.0 * triton.testing.do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, return_mode="median")


def _bench_graph(fn, rep_ms: int) -> float:
    """Median time in microseconds of a CUDA-graph replay of fn (launch gaps removed)."""
    import triton

    with torch.cuda.stream(torch.cuda.Stream()):
        return 1000.0 * triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")


def copy_bandwidth(device: torch.device, rep_ms: int) -> float:
    """Device-to-device copy of 1 GiB, counting bytes read plus written, in GB/s."""
    n = 1 << 30
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = _bench(lambda: dst.copy_(src), rep_ms)
    del src, dst
    return 2 * n / us / 1e3


def random_kv_layer(tokens: int, batch: int, num_kv_heads: int, block_size: int, head_dim: int,
                    device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One pool layer of standard-normal bf16 K and V, [batch * tokens / block_size, HKV, BS, D]:
    `batch` rows of `tokens` tokens (the sweeps' synthetic caches)."""
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (batch * (tokens // block_size), num_kv_heads, block_size, head_dim)
    return tuple(torch.randn(shape, device=device, dtype=torch.bfloat16, generator=g) for _ in range(2))


def save_results(out_dir: str | Path, stem: str, result: dict, text: str) -> None:
    """Write a benchmark's result as `stem`.json and its table as `stem`.md under out_dir, and
    print the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(text)
    print(text)


def card_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def _stem(name: str) -> str:
    low = name.lower()
    for key in ("h100", "h200", "a100", "l40s", "b200"):
        if key in low:
            return key
    return "".join(c if c.isalnum() else "_" for c in low)


def bench_shape(model: str, n_ctx: int, batch: int, args, device, dtype, copy_bw: float) -> list[dict]:
    from resa.kernels import SelectionWorkspace, select_blocks, sparse_decode
    from resa.kernels.sparse_decode import DECODE_CONFIGS, DecodeConfig
    from resa.ref.selection import block_budget

    H, HKV, D = MODELS[model]
    bs = args.block_size
    nb = math.ceil(n_ctx / bs)
    esz = torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator(device=device).manual_seed(n_ctx + batch)
    k = torch.randn(batch, HKV, n_ctx, D, device=device, dtype=dtype, generator=gen)
    v = torch.randn(batch, HKV, n_ctx, D, device=device, dtype=dtype, generator=gen)
    kb = F.pad(k, (0, 0, 0, nb * bs - n_ctx)).view(batch, HKV, nb, bs, D) if nb * bs != n_ctx else k.view(batch, HKV, nb, bs, D)
    kmin, kmax = kb.amin(dim=3).contiguous(), kb.amax(dim=3).contiguous()
    # The kernels read the paged layout (row b's logical block j in physical block b * nb + j);
    # SDPA, the dense baseline, reads the contiguous copy.
    pages = torch.arange(batch * nb, dtype=torch.int32, device=device).view(batch, nb)
    kp, vp = (F.pad(t, (0, 0, 0, nb * bs - n_ctx)).view(batch, HKV, nb, bs, D).transpose(1, 2)
              .reshape(batch * nb, HKV, bs, D) for t in (k, v))
    pmin, pmax = (t.transpose(1, 2).reshape(batch * nb, HKV, D) for t in (kmin, kmax))
    q = torch.randn(batch, H, D, device=device, dtype=dtype, generator=gen)
    lengths = torch.full((batch,), n_ctx, dtype=torch.int64, device=device)
    slots = block_budget(nb, args.active_ratio, args.min_blocks)
    sel_kw = dict(block_size=bs, active_ratio=args.active_ratio, min_blocks=args.min_blocks, num_slots=slots)
    ws = SelectionWorkspace.allocate(batch, HKV, nb, device)
    table = torch.empty(batch, HKV, slots, dtype=torch.int32, device=device)
    nsel = torch.empty(batch, dtype=torch.int32, device=device)
    out = torch.empty(batch, H, D, dtype=dtype, device=device)
    rows: list[dict] = []
    base = dict(model=model, heads=H, kv_heads=HKV, head_dim=D, context=n_ctx, batch=batch)

    def record(op: str, variant: str, us: float, nbytes: int) -> dict:
        rec = dict(base, op=op, variant=variant, time_us=round(us, 2), bytes=nbytes,
                   gbps=round(nbytes / us / 1e3, 1), frac_copy_bw=round(nbytes / us / 1e3 / copy_bw, 3),
                   floor_us=round(nbytes / copy_bw / 1e3, 2))
        rows.append(rec)
        return rec

    kv_bytes = 2 * batch * HKV * n_ctx * D * esz
    q4 = q[:, :, None, :]
    g = args.graph_rep_ms
    sdpa = record("sdpa_dense_decode", "graph", _bench_graph(lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True), g), kv_bytes)

    sum_bytes = 2 * batch * HKV * nb * D * esz + 2 * 4 * batch * HKV * nb + 4 * batch * HKV * slots
    fn = lambda: select_blocks(q, pmin, pmax, pages, lengths, **sel_kw, workspace=ws, out=(table, nsel))  # noqa: E731
    record("selection", "default", _bench_graph(fn, g), sum_bytes)
    fn = lambda: select_blocks(q, pmin, pmax, pages, lengths, **sel_kw, group_pool="max", workspace=ws, out=(table, nsel))  # noqa: E731
    record("selection", "group_pool-max", _bench_graph(fn, g), sum_bytes)
    if args.sweep and n_ctx >= args.sweep_from:
        from resa.kernels.selection import SCORE_CONFIGS

        for sc in SCORE_CONFIGS:
            fn = lambda c=sc: select_blocks(q, pmin, pmax, pages, lengths, **sel_kw, method="scores", workspace=ws, out=(table, nsel), score_config=c)  # noqa: E731
            record("scoring", f"bpt{sc.blocks_per_tile}-t{sc.max_tiles}-w{sc.num_warps}", _bench_graph(fn, g), sum_bytes)
    for method, topn in (("fused", "interp"), ("fused", "bisect"), ("two_pass", "interp"), ("two_pass", "bisect"), ("torch", "interp"), ("scores", "interp")):
        fn = lambda m=method, t=topn: select_blocks(q, pmin, pmax, pages, lengths, **sel_kw, method=m, topn=t, workspace=ws, out=(table, nsel))  # noqa: E731
        record("selection", method if method not in ("fused", "two_pass") else f"{method}-{topn}", _bench_graph(fn, g), sum_bytes)
    select_blocks(q, pmin, pmax, pages, lengths, **sel_kw, workspace=ws, out=(table, nsel))
    sel_tokens = int((table >= 0).sum()) * bs  # one host read, outside every timed region
    attn_bytes = 2 * sel_tokens * D * esz + 2 * batch * H * D * esz
    sweep = args.sweep and n_ctx >= args.sweep_from
    configs = DECODE_CONFIGS if sweep else (DecodeConfig(),)
    best = None
    for cfg in configs:
        fn = lambda c=cfg: sparse_decode(q, kp, vp, pages, lengths, table, num_selected=nsel, config=c, out=out)  # noqa: E731
        rec = record("sparse_attention", f"bpi{cfg.blocks_per_iter}-w{cfg.num_warps}-s{cfg.num_stages}",
                     _bench_graph(fn, g), attn_bytes)
        if cfg == DecodeConfig():
            rows.append(dict(rec, variant="default"))
        if best is None or rec["time_us"] < best["time_us"]:
            best = rec
    if sweep:
        from resa.kernels.sparse_decode import choose_splits

        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        default_splits = choose_splits(batch, HKV, slots, DecodeConfig().blocks_per_iter, sms)
        for mult in (0.5, 2.0):
            ns = max(1, int(default_splits * mult))
            fn = lambda n=ns: sparse_decode(q, kp, vp, pages, lengths, table, num_selected=nsel, num_splits=n, out=out)  # noqa: E731
            rec = record("sparse_attention", f"splits-x{mult:g}", _bench_graph(fn, g), attn_bytes)
            if rec["time_us"] < best["time_us"]:
                best = rec
        rows.append(dict(best, variant="best:" + best["variant"]))

    def step():
        select_blocks(q, pmin, pmax, pages, lengths, **sel_kw, workspace=ws, out=(table, nsel))
        sparse_decode(q, kp, vp, pages, lengths, table, num_selected=nsel, out=out)

    graph = record("selection+attention", "graph", _bench_graph(step, g), sum_bytes + attn_bytes)
    both = record("selection+attention", "eager", _bench(step, args.rep_ms), sum_bytes + attn_bytes)
    sdpa_eager = record("sdpa_dense_decode", "eager", _bench(lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True), args.rep_ms), kv_bytes)
    graph["speedup_vs_sdpa"] = round(sdpa["time_us"] / graph["time_us"], 2)
    both["speedup_vs_sdpa"] = round(sdpa_eager["time_us"] / both["time_us"], 2)

    f = args.rectify_window
    if model == next(iter(MODELS)) and batch <= 4 and f > 0:
        qf = torch.randn(batch, H, f, D, device=device, dtype=dtype, generator=gen)
        mask = torch.ones(f, n_ctx, dtype=torch.bool, device=device).tril(diagonal=n_ctx - f)
        rect_bytes = kv_bytes + 2 * batch * H * f * D * esz
        try:
            from torch.nn.attention.bias import causal_lower_right

            bias = causal_lower_right(f, n_ctx)
            fn = lambda: F.scaled_dot_product_attention(qf, k, v, attn_mask=bias, enable_gqa=True)  # noqa: E731
            record("rectify_dense_chunk", "sdpa_causal_lower_right", _bench(fn, args.rep_ms), rect_bytes)
        except (RuntimeError, NotImplementedError, ImportError) as exc:
            rows.append(dict(base, op="rectify_dense_chunk", variant="sdpa_causal_lower_right", error=str(exc)[:200]))
        try:
            fn = lambda: F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, enable_gqa=True)  # noqa: E731
            record("rectify_dense_chunk", "sdpa_bool_mask", _bench(fn, args.rep_ms), rect_bytes)
        except RuntimeError as exc:
            rows.append(dict(base, op="rectify_dense_chunk", variant="sdpa_bool_mask", error=str(exc)[:200]))
        from resa.kernels import chunk_attention
        from resa.kernels.chunk_attention import CHUNK_CONFIGS, ChunkConfig

        start = torch.full((batch,), n_ctx - f, dtype=torch.int64, device=device)
        width = torch.full((batch,), f, dtype=torch.int64, device=device)
        outf = torch.empty_like(qf)
        flops = 4 * batch * H * f * n_ctx * D
        for cc in CHUNK_CONFIGS if sweep else (ChunkConfig(),):
            fn = lambda c=cc: chunk_attention(qf, kp, vp, pages, start, width, config=c, out=outf)  # noqa: E731
            rec = record("rectify_dense_chunk", f"chunk_attention-m{cc.block_m}-n{cc.block_n}-w{cc.num_warps}"
                         f"-s{cc.num_stages}" + ("-default" if cc == ChunkConfig() else ""), _bench_graph(fn, g), rect_bytes)
            rec["tflops"] = round(flops / rec["time_us"] / 1e6, 1)
    del k, v, kb, kmin, kmax, kp, vp, pmin, pmax
    return rows


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = [
        f"# Kernel benchmark on {result['card']}",
        "",
        f"`{result['command']}` — torch {result['torch']}, triton {result['triton']}, {result['dtype']}, "
        f"active ratio {result['active_ratio']}, block {result['block_size']}, min blocks {result['min_blocks']}. "
        f"Measured device-to-device copy bandwidth: **{result['copy_gbps']:.0f} GB/s** (read + write). "
        "Times are medians of CUDA-event timings in us ('eager': triton.testing.do_bench, L2 flushed before each run; "
        "'graph': do_bench_cudagraph, back-to-back replays); 'floor' is the op's bytes / copy bandwidth.",
        "",
        "Main table: device time of CUDA-graph replays (launch gaps excluded, as in an engine that captures its "
        "decode step); 'eager' adds Python/launch overhead and is shown for reference.",
        "",
        "| model | context | batch | SDPA dense | selection | sparse attn | attn GB/s (% copy) | sel+attn | floor | sel+attn / floor | speedup vs SDPA | eager sel+attn / SDPA |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    key = lambda r: (r["model"], r["context"], r["batch"])  # noqa: E731
    shapes = sorted({key(r) for r in rows}, key=lambda s: (s[0], s[1], s[2]))
    for s in shapes:
        g = {(r["op"], r["variant"]): r for r in rows if key(r) == s and "error" not in r}
        sd, sde = g.get(("sdpa_dense_decode", "graph")), g.get(("sdpa_dense_decode", "eager"))
        se = g.get(("selection", "default"))
        at = g.get(("sparse_attention", "default"))
        e, gr = g.get(("selection+attention", "eager")), g.get(("selection+attention", "graph"))
        if not (sd and sde and se and at and e and gr):
            continue
        lines.append(
            f"| {s[0]} | {s[1] // KIB}K | {s[2]} | {sd['time_us']:.1f} | {se['time_us']:.1f} | {at['time_us']:.1f} | "
            f"{at['gbps']:.0f} ({100 * at['frac_copy_bw']:.0f}%) | {gr['time_us']:.1f} | {gr['floor_us']:.1f} | "
            f"{gr['time_us'] / gr['floor_us']:.2f} | **{gr['speedup_vs_sdpa']:.2f}x** | {e['time_us']:.0f} / {sde['time_us']:.0f} us |")
    methods = ("default", "group_pool-max", "fused-interp", "fused-bisect", "two_pass-interp", "two_pass-bisect", "torch",
               "scores")
    lines += ["", "## Selection methods (us, graph replay; 'scores' = scoring pass alone, no top-n)", "",
              "| model | context | batch | " + " | ".join(methods) + " | floor |", "|---|---|---|" + "---|" * (len(methods) + 1)]
    for s in shapes:
        g = {r["variant"]: r for r in rows if key(r) == s and r["op"] == "selection"}
        if g:
            floor = next(iter(g.values()))["floor_us"]
            lines.append(f"| {s[0]} | {s[1] // KIB}K | {s[2]} | " + " | ".join(str(g[m]["time_us"]) if m in g else "" for m in methods) + f" | {floor} |")
    sweep = [r for r in rows if r["op"] == "sparse_attention" and not r["variant"].startswith("best:") and r["variant"] != "default"]
    if len({r["variant"] for r in sweep}) > 1:
        variants = sorted({r["variant"] for r in sweep})
        lines += ["", "## Sparse attention launch configs (us, graph replay; splits-xM = default config, M times the default splits)", "", "| model | context | batch | " + " | ".join(variants) + " |",
                  "|---|---|---|" + "---|" * len(variants)]
        for s in shapes:
            g = {r["variant"]: r["time_us"] for r in sweep if key(r) == s}
            if g:
                lines.append(f"| {s[0]} | {s[1] // KIB}K | {s[2]} | " + " | ".join(str(g.get(v, "")) for v in variants) + " |")
    scoring = [r for r in rows if r["op"] == "scoring"]
    if scoring:
        variants = sorted({r["variant"] for r in scoring})
        lines += ["", "## Scoring pass launch configs (us, graph replay)", "", "| model | context | batch | " + " | ".join(variants) + " | floor |",
                  "|---|---|---|" + "---|" * (len(variants) + 1)]
        for s in shapes:
            g = {r["variant"]: r for r in scoring if key(r) == s}
            if g:
                lines.append(f"| {s[0]} | {s[1] // KIB}K | {s[2]} | " + " | ".join(str(g[v]["time_us"]) if v in g else "" for v in variants)
                             + f" | {next(iter(g.values()))['floor_us']} |")
    rect = [r for r in rows if r["op"] == "rectify_dense_chunk"]
    if rect:
        lines += ["", f"## Rectification chunk (f={result['rectify_window']} queries per row: SDPA vs chunk_attention)", "",
                  "| model | context | batch | variant | time us | GB/s (% copy) | TFLOP/s | SDPA decode us |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rect:
            sd = next((x for x in rows if key(x) == key(r) and x["op"] == "sdpa_dense_decode"), None)
            if "error" in r:
                lines.append(f"| {r['model']} | {r['context'] // KIB}K | {r['batch']} | {r['variant']} | error: {r['error'][:60]} | | | |")
            else:
                lines.append(f"| {r['model']} | {r['context'] // KIB}K | {r['batch']} | {r['variant']} | {r['time_us']:.1f} | "
                             f"{r['gbps']:.0f} ({100 * r['frac_copy_bw']:.0f}%) | {r.get('tflops', '')} | {sd['time_us'] if sd else ''} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict:
    import triton

    if not torch.cuda.is_available():
        raise SystemExit("resa bench kernels needs a CUDA GPU")
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    copy_bw = copy_bandwidth(device, args.rep_ms)
    result = dict(card=card_name(device), torch=torch.__version__, triton=triton.__version__, dtype=args.dtype,
                  active_ratio=args.active_ratio, block_size=args.block_size, min_blocks=args.min_blocks,
                  rectify_window=args.rectify_window, copy_gbps=round(copy_bw, 1),
                  command=getattr(args, "command_line", "python -m resa.bench.kernels"), rows=[])
    t0 = time.time()
    for model in args.models:
        H, HKV, D = MODELS[model]
        for n_ctx in args.contexts:
            for batch in args.batches:
                cache_gib = 2 * batch * HKV * n_ctx * D * torch.empty((), dtype=dtype).element_size() / 2**30
                if cache_gib > args.max_cache_gib:
                    continue
                rows = bench_shape(model, n_ctx, batch, args, device, dtype, copy_bw)
                result["rows"].extend(rows)
                torch.cuda.empty_cache()
                both = next(r for r in rows if r["op"] == "selection+attention" and r["variant"] == "graph")
                print(f"[{time.time() - t0:6.1f}s] {model} {n_ctx // KIB}K b{batch}: "
                      + ", ".join(f"{r['op']}/{r['variant']} {r['time_us']}us" for r in rows if "time_us" in r and r["op"] != "rectify_dense_chunk")
                      + f" -> {both['speedup_vs_sdpa']}x", flush=True)
    save_results(args.out_dir, args.name or _stem(result["card"]), result, markdown(result))
    return result


def main(argv: list[str] | None = None) -> int:
    import sys

    parser = argparse.ArgumentParser(prog="python -m resa.bench.kernels", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.command_line = "python -m resa.bench.kernels " + " ".join(sys.argv[1:] if argv is None else argv)
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
