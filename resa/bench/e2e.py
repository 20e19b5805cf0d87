"""End-to-end decode benchmark: tokens/s of our engine (dense / sparse / ReSA paper / ReSA fused)
against its bytes floor, and Hugging Face transformers `generate` as the peer, on one GPU.

Weights are random at real model shapes (speed does not depend on their values). The context is
filled with random K/V and exact block summaries (`Runner.fill_synthetic`) instead of a real
prefill: decode speed depends on the cache's size, not its contents, and a 256K prefill per
configuration would take most of the run. Each mode times the public generation loop
(`Engine.decode` with its defaults: CUDA-graph replay of the step and of the rectification
window, greedy sampling on the device, host checks every 16 tokens) for `--windows` windows of f
tokens, after a warm-up call that captures the graphs.

    python -m resa.bench.e2e --out-dir benchmarks/e2e
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from ..config import GROUP_POOLS, ResaConfig
from ..cost import sparse_step_reads
from ..engine import CacheTooLargeError, Engine
from ..pool import KVPool
from ..random_model import SHAPES, random_model, weight_bytes_per_step
from .kernels import _bench_graph, card_name, copy_bandwidth, save_results

MODES = ("dense", "sparse", "resa-paper", "resa-fused")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", default="qwen2.5-7b", choices=list(SHAPES))
    parser.add_argument("--contexts", nargs="+", type=int, default=[32768, 65536, 131072, 262144])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--windows", type=int, default=2, help="rectification windows of f tokens timed per mode")
    parser.add_argument("--active-ratio", type=float, default=0.1)
    parser.add_argument("-f", "--rectify-every", type=int, default=32)
    parser.add_argument("--group-pool", choices=GROUP_POOLS, default="mean",
                        help="block score of a KV group (ResaConfig.group_pool)")
    parser.add_argument("--hf-peer", nargs="*", type=int, default=[],
                        help="contexts at which to time transformers generate (batch 1)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.98,
                        help="share of the GPU's memory the engine (weights, KV pool, activations) may use")
    parser.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"],
                        help="time the decode step with plain and/or torch.compile'd layer halves")
    parser.add_argument("--no-largest-batch", dest="largest_batch", action="store_false",
                        help="do not add the largest batch that fits where a requested batch does not")
    parser.add_argument("--out-dir", default="benchmarks/e2e")


def _floors(cfg, n: int, batch: int, resa: ResaConfig, weights: int) -> dict[str, float]:
    """Bytes one generated token must move, per mode (weights + KV read + amortised rectification)."""
    kv_tok = cfg.num_layers * batch * cfg.num_kv_heads * cfg.head_dim * 2 * 2  # K and V, bf16
    sparse_kv = kv_tok * sparse_step_reads(n, resa)  # selected tokens + min/max summaries
    dense_kv = kv_tok * n
    f = resa.rectify_every
    return {
        "dense": weights + dense_kv,
        "sparse": weights + sparse_kv,
        # paper: an extra dense forward (weights + whole cache) per f tokens
        "resa-paper": weights + sparse_kv + (weights + dense_kv) / f,
        # fused: one of every f steps is the dense pass itself
        "resa-fused": weights + sparse_kv * (f - 1) / f + dense_kv / f,
    }


def _time_mode(engine: Engine, runner, n: int, mode: str, resa: ResaConfig, windows: int) -> dict:
    """Milliseconds per generated token of the public generation loop (`Engine.decode`, default
    sync_every) over `windows` windows of f tokens, from a context of n tokens per row."""
    cfg = {"dense": resa.with_(mode="dense"), "sparse": resa.with_(mode="sparse"),
           "resa-paper": resa.with_(rectify_variant="paper"),
           "resa-fused": resa.with_(rectify_variant="fused")}[mode]
    f = resa.rectify_every
    logits = torch.zeros(runner.batch, engine.model.cfg.vocab_size, device=engine.device)

    def generate(tokens: int):
        runner.truncate([n] * runner.batch)
        return engine.decode(runner, logits, resa=cfg, max_new_tokens=tokens, eos_token_ids=[]).stats

    generate(f + 2)  # warm-up: captures the graphs (step, both window kinds), compiles kernels
    stats = generate(windows * f + 1)
    runner.truncate([n] * runner.batch)
    ms = stats.decode_seconds * 1000 / stats.decode_steps
    return {"ms_per_step": ms, "tokens_per_s": runner.batch * 1000.0 / ms, "steps": stats.decode_steps,
            "rectifications": stats.rectifications, "capture_s_in_timed_run": stats.capture_seconds}


def _breakdown(engine: Engine, runner, n: int, resa: ResaConfig) -> dict:
    """Where a ReSA step goes: selection and sparse attention per layer (times layers), the dense
    rectification pass amortised over f tokens; the rest (weights, norms, MLPs) by difference."""
    import triton

    from .. import attention as attn

    cfg = engine.model.cfg
    cache = runner.cache
    B = cache.batch
    q = torch.randn(B, cfg.num_heads, cfg.head_dim, device=engine.device, dtype=engine.dtype)
    lengths = cache.lengths
    buffers = cache.plan_buffers(attn.num_slots(cache.max_blocks, resa), True)
    pages = cache.pages
    plan = attn.plan_sparse(q, cache.kmin[0], cache.kmax[0], pages, lengths, resa, "triton", buffers)
    # Graph replays, as in the decode step (eager timing would mostly measure Python launch cost).
    sel = _bench_graph(lambda: attn.plan_sparse(q, cache.kmin[0], cache.kmax[0], pages, lengths, resa, "triton",
                                                buffers), 100) / 1e3
    att = _bench_graph(lambda: attn.sparse_decode_attention(q, cache.k[0], cache.v[0], pages, lengths, plan,
                                                            "triton"), 100) / 1e3
    f = resa.rectify_every
    window = torch.randint(0, cfg.vocab_size, (B, f), device=engine.device)

    def rectify() -> None:  # what the decode loop runs: the graph of the pass (chunk_attention)
        runner.window(window, overwrite=f)

    rect = triton.testing.do_bench(rectify, warmup=1, rep=50, return_mode="median")
    return {"selection_ms": sel * cfg.num_layers, "sparse_attention_ms": att * cfg.num_layers,
            "rectification_pass_ms": rect, "rectification_amortised_ms": rect / f}


def _hf_peer(shape: str, n: int, device: torch.device) -> dict:
    """transformers generate (default dynamic cache, sdpa) on the same shape, batch 1: per-token
    decode time = (time for 1 + k new tokens - time for 1 new token) / k, medians of three."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg = SHAPES[shape]
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position_embeddings,
                  attn_implementation="sdpa")
    hf_cfg = Qwen2Config(**common) if cfg.arch == "qwen2" else LlamaConfig(**common)
    cls = Qwen2ForCausalLM if cfg.arch == "qwen2" else LlamaForCausalLM
    with torch.device("meta"):
        model = cls(hf_cfg)
    model = model.to_empty(device=device).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.eval()
    ids = torch.randint(0, cfg.vocab_size, (1, n), device=device)
    k = 32

    def timed(new: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                       pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed(2)
    # Medians of three: the prefill inside both timings varies by more than a few decode steps.
    one = sorted(timed(1) for _ in range(3))[1]
    many = sorted(timed(1 + k) for _ in range(3))[1]
    del model
    gc.collect()
    torch.cuda.empty_cache()
    ms = (many - one) * 1000 / k
    return {"peer": "transformers generate (dynamic cache, sdpa)", "context": n, "batch": 1,
            "ms_per_step": ms, "tokens_per_s": 1000.0 / ms}


def run(args: argparse.Namespace) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("resa bench e2e needs a CUDA GPU")
    device = torch.device("cuda")
    torch.manual_seed(0)
    resa = ResaConfig(active_ratio=args.active_ratio, rectify_every=args.rectify_every, group_pool=args.group_pool)
    copy_bw = copy_bandwidth(device, 200)
    model = random_model(args.shape, device=device)
    engine = Engine(model, gpu_memory_utilization=args.gpu_memory_utilization)
    cfg = model.cfg
    model.compile_decode()
    compiled_fns = model.compiled_fns
    rows, skipped = [], []
    free_total = torch.cuda.mem_get_info(device)[1]
    for n in args.contexts:
        capacity = n + (args.windows + 2) * args.rectify_every + 8
        row_bytes = KVPool.bytes_per_block(cfg.num_layers, cfg.num_kv_heads, resa.block_size, cfg.head_dim, 2) \
            * -(-capacity // resa.block_size)
        free = engine.kv_memory_allowed()  # what the engine's KV pool may take
        largest = int(free // row_bytes)
        batches = [b for b in args.batches if b <= largest]
        for b in args.batches:
            if b > largest:
                skipped.append({"context": n, "batch": b, "cache_gib": b * row_bytes / 2**30, "free_gib": free / 2**30})
                print(f"skip N={n} B={b}: cache needs {b * row_bytes / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
        if args.largest_batch and len(batches) < len(args.batches) and largest >= 1 and largest not in batches:
            batches.append(largest)  # the largest batch that fits, where a requested one did not
        for batch in batches:
            torch.cuda.reset_peak_memory_stats(device)
            try:
                runner = engine.open(batch, capacity, resa.block_size)
            except CacheTooLargeError as exc:  # the estimate fit, the device did not: keep the other shapes
                skipped.append({"context": n, "batch": batch, "cache_gib": batch * row_bytes / 2**30,
                                "free_gib": free / 2**30, "error": str(exc)})
                print(f"skip N={n} B={batch}: {exc}", flush=True)
                engine.release_buffers()
                continue
            runner.fill_synthetic(n, seed=n + batch)
            weights = weight_bytes_per_step(model, batch)
            floors = _floors(cfg, n, batch, resa, weights)
            row = {"context": n, "batch": batch, "modes": {}}
            for compiled in args.compile:
                model.compiled_fns = compiled_fns if compiled == "on" else None
                if runner.graphs is not None:
                    runner.graphs.clear()  # graphs captured with the other layer functions would replay them
                for mode in args.modes:
                    r = _time_mode(engine, runner, n, mode, resa, args.windows)
                    floor_ms = floors[mode] / copy_bw / 1e6
                    r.update(floor_ms=floor_ms, vs_floor=r["ms_per_step"] / floor_ms, bytes_per_step=floors[mode])
                    name = mode + ("+compile" if compiled == "on" else "")
                    row["modes"][name] = r
                    print(f"N={n} B={batch} {name:18s} {r['ms_per_step']:8.2f} ms/step "
                          f"{r['tokens_per_s']:8.1f} tok/s floor {floor_ms:6.2f} ms ({r['vs_floor']:.2f}x)", flush=True)
            row["breakdown"] = _breakdown(engine, runner, n, resa)
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            rows.append(row)
            del runner
            gc.collect()
            engine.release_buffers()  # the pool, now idle, goes too: the next shape allocates its own
    del engine, model
    gc.collect()
    torch.cuda.empty_cache()
    peers = []
    for n in args.hf_peer:
        try:
            peers.append(_hf_peer(args.shape, n, device))
            print(f"HF peer N={n}: {peers[-1]['ms_per_step']:.2f} ms/step", flush=True)
        except Exception as exc:  # a peer failing (OOM, API change) must not lose our results
            peers.append({"context": n, "batch": 1, "error": f"{type(exc).__name__}: {exc}"})
    result = {"card": card_name(device), "torch": torch.__version__, "shape": args.shape,
              "copy_GBps": copy_bw, "gpu_memory_gib": free_total / 2**30, "resa": resa.__dict__,
              "rows": rows, "skipped": skipped, "hf_peer": peers}
    stem = f"{args.shape}-{''.join(c for c in card_name(device).lower() if c.isalnum())[:24]}"
    stem += "" if args.group_pool == "mean" else f"-pool-{args.group_pool}"
    save_results(args.out_dir, stem, result, markdown(result))
    return result


def markdown(result: dict) -> str:
    lines = [f"# End-to-end decode, {result['shape']} (random weights), {result['card']}", "",
             f"Copy bandwidth {result['copy_GBps']:.0f} GB/s; torch {result['torch']}; "
             f"ReSA active_ratio {result['resa']['active_ratio']}, f {result['resa']['rectify_every']}, "
             f"group_pool {result['resa'].get('group_pool', 'mean')}.", "",
             "| context | batch | mode | ms/step | tokens/s | floor ms | measured/floor | vs dense |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        for mode, r in row["modes"].items():
            base = "dense+compile" if mode.endswith("+compile") else "dense"
            dense = row["modes"].get(base, {}).get("ms_per_step")
            speed = f"{dense / r['ms_per_step']:.2f}x" if dense else "-"
            lines.append(f"| {row['context']} | {row['batch']} | {mode} | {r['ms_per_step']:.2f} | "
                         f"{r['tokens_per_s']:.1f} | {r['floor_ms']:.2f} | {r['vs_floor']:.2f} | {speed} |")
    lines += ["", "Where a ReSA step goes (ms; selection and attention summed over layers):", "",
              "| context | batch | sparse step | selection | sparse attention | rectification pass "
              "| amortised /f | share of ReSA step | peak GiB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        b = row["breakdown"]
        step = row["modes"].get("sparse", row["modes"].get("sparse+compile", {})).get("ms_per_step", float("nan"))
        lines.append(f"| {row['context']} | {row['batch']} | {step:.2f} | {b['selection_ms']:.2f} | "
                     f"{b['sparse_attention_ms']:.2f} | {b['rectification_pass_ms']:.2f} | "
                     f"{b['rectification_amortised_ms']:.2f} | {_rect_share(row):.0%} | "
                     f"{row['peak_gib']:.1f} |")
    if result["skipped"]:
        lines += ["", "Skipped (cache does not fit): " + ", ".join(
            f"N={s['context']} B={s['batch']} ({s['cache_gib']:.0f} GiB)" for s in result["skipped"])]
    if result["hf_peer"]:
        lines += ["", "| peer | context | batch | ms/step | tokens/s |", "|---|---|---|---|---|"]
        for p in result["hf_peer"]:
            if "error" in p:
                lines.append(f"| transformers | {p['context']} | 1 | failed: {p['error'][:80]} | |")
            else:
                lines.append(f"| {p['peer']} | {p['context']} | 1 | {p['ms_per_step']:.2f} | {p['tokens_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def _rect_share(row: dict) -> float:
    """Amortised rectification pass over the fused-ReSA step time (compiled if timed)."""
    fused = row["modes"].get("resa-fused+compile", row["modes"].get("resa-fused", {})).get("ms_per_step")
    return row["breakdown"]["rectification_amortised_ms"] / fused if fused else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
