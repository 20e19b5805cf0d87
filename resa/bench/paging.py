"""The paged KV pool on one GPU, Qwen2.5-7B shapes with random weights:

- capacity: how many concurrent requests of one length fit in the memory the engine's pool may
  take (paged: blocks for each request's own tokens), against a contiguous cache of batch x the
  longest request in the same memory, exact and with the rounding the engine applied before the
  pool (batch to a power of two, capacity to 4096 tokens); the paged count is checked by really
  opening that many rows, filling them and decoding (and one more row being refused);
- a mixed load: one 200K request next to as many 4K requests as fit;
- prefix reuse: time to first token of ten questions about one 64K-token document, with and
  without the prefix cache (the prefill is the public `generate_ids`).

    python -m resa.bench.paging --out-dir benchmarks/paging
"""

from __future__ import annotations

import argparse
import gc

import torch

from ..blocks import CacheTooLargeError
from ..config import ResaConfig
from ..engine import Engine
from ..pool import KVPool
from ..random_model import SHAPES, random_model
from .kernels import card_name, save_results


def _contiguous_rows(allowed: int, per_token: int, capacity: int, bs: int, rounded: bool) -> int:
    """Rows of `capacity` tokens a contiguous [L, B, HKV, capacity, D] cache (plus per-block
    summaries) fits in `allowed` bytes; rounded: the capacity rounded up to 4096 and the batch to
    the largest power of two that fits, as the engine's batch buckets did."""
    if rounded:
        capacity = -(-capacity // 4096) * 4096
    rows = allowed // (per_token * (capacity + -(-capacity // bs)))
    return 1 << (rows.bit_length() - 1) if rounded and rows else rows


def capacity(engine: Engine, contexts: list[int], new_tokens: int, bs: int) -> list[dict]:
    cfg = engine.model.cfg
    per_block = KVPool.bytes_per_block(cfg.num_layers, cfg.num_kv_heads, bs, cfg.head_dim, 2)
    per_token = per_block // (bs + 1)
    allowed = engine.kv_memory_allowed()
    out = []
    for n in contexts:
        cap = n + new_tokens
        paged = (allowed // per_block) // -(-cap // bs)
        row = {"context": n, "new_tokens": new_tokens, "pool_gib": allowed / 2**30, "paged": paged,
               "contiguous_exact": _contiguous_rows(allowed, per_token, cap, bs, False),
               "contiguous_bucketed": _contiguous_rows(allowed, per_token, cap, bs, True)}
        runner = engine.open(paged, cap, bs)
        runner.fill_synthetic(n, zeros=True)
        logits = torch.zeros(paged, cfg.vocab_size, device=engine.device)
        stats = engine.decode(runner, logits, resa=ResaConfig(block_size=bs), max_new_tokens=16,
                              eos_token_ids=[]).stats
        row["decoded_tokens_per_row"] = stats.decode_steps + 1
        row["ms_per_step"] = stats.decode_seconds * 1000 / max(stats.decode_steps, 1)
        try:
            engine.open(1, cap, bs).fill_synthetic(n, zeros=True)
            row["one_more_refused"] = False
        except CacheTooLargeError as exc:
            row["one_more_refused"] = True
            row["refusal"] = str(exc)[:200]
        del runner
        gc.collect()
        engine.release_buffers()
        row["allocated_after_release_gib"] = torch.cuda.memory_allocated(engine.device) / 2**30
        print(f"capacity N={n}: paged {paged}, contiguous {row['contiguous_exact']} "
              f"(bucketed {row['contiguous_bucketed']}); decoded at batch {paged}: {row['ms_per_step']:.1f} ms/step",
              flush=True)
        out.append(row)
    return out


def mixed(engine: Engine, long: int, short: int, new_tokens: int, bs: int) -> dict:
    """One `long` request plus as many `short` ones as fit, paged vs contiguous (computed)."""
    cfg = engine.model.cfg
    per_block = KVPool.bytes_per_block(cfg.num_layers, cfg.num_kv_heads, bs, cfg.head_dim, 2)
    allowed = engine.kv_memory_allowed()
    blocks = allowed // per_block
    short_paged = (blocks - -(-(long + new_tokens) // bs)) // -(-(short + new_tokens) // bs)
    rows_contig = _contiguous_rows(allowed, per_block // (bs + 1), long + new_tokens, bs, False)
    return {"long": long, "short": short, "new_tokens": new_tokens, "short_requests_paged": int(short_paged),
            "short_requests_contiguous": max(0, rows_contig - 1)}


def prefix_ttft(engine: Engine, doc_tokens: int, questions: int, q_tokens: int, cached: bool) -> list[float]:
    """Seconds of prefill (time to first token) of each question about one document."""
    g = torch.Generator().manual_seed(0)
    vocab = engine.model.cfg.vocab_size
    doc = torch.randint(0, vocab, (doc_tokens,), generator=g).tolist()
    qs = [torch.randint(0, vocab, (q_tokens,), generator=g).tolist() for _ in range(questions)]
    engine.prefix_caching = cached
    times = []
    for i, q in enumerate(qs):
        if not cached and 0 < i < questions - 1:
            continue  # without the cache every question costs the same: time the first and the last
        r = engine.generate_ids([doc + q], max_new_tokens=1, eos_token_ids=[])
        times.append({"question": i + 1, "ttft_s": r.stats.prefill_seconds,
                      "prefix_cached_tokens": r.stats.prefix_cached_tokens})
        print(f"prefix cache {'on ' if cached else 'off'} question {i + 1}: {r.stats.prefill_seconds:.3f} s "
              f"({r.stats.prefix_cached_tokens} tokens reused)", flush=True)
    return times


def run(args: argparse.Namespace) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("resa bench paging needs a CUDA GPU")
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = random_model(args.shape, device=device)
    engine = Engine(model, gpu_memory_utilization=args.gpu_memory_utilization)
    result = {"card": card_name(device), "torch": torch.__version__, "shape": args.shape,
              "gpu_memory_utilization": args.gpu_memory_utilization,
              "gpu_memory_gib": torch.cuda.mem_get_info(device)[1] / 2**30,
              "capacity": capacity(engine, args.contexts, args.new_tokens, args.block_size),
              "mixed": mixed(engine, 200_000, 4096, args.new_tokens, args.block_size)}
    result["ttft"] = {"doc_tokens": args.doc_tokens, "question_tokens": args.question_tokens,
                      "with_cache": prefix_ttft(engine, args.doc_tokens, args.questions, args.question_tokens, True),
                      "without_cache": prefix_ttft(engine, args.doc_tokens, args.questions, args.question_tokens, False)}
    stem = f"{args.shape}-{''.join(c for c in card_name(device).lower() if c.isalnum())[:24]}"
    save_results(args.out_dir, stem, result, markdown(result))
    return result


def markdown(r: dict) -> str:
    lines = [f"# Paged KV pool, {r['shape']} (random weights), {r['card']}", "",
             f"torch {r['torch']}; the engine may use {r['gpu_memory_utilization']:.0%} of "
             f"{r['gpu_memory_gib']:.0f} GiB (weights, KV pool, 2 GiB activation reserve).", "",
             "| context + new | pool GiB | paged requests (opened, filled, decoded) | one more refused | "
             "contiguous exact | contiguous bucketed | ms/step of 16 dense steps (graph capture included) |",
             "|---|---|---|---|---|---|---|"]
    for c in r["capacity"]:
        lines.append(f"| {c['context']} + {c['new_tokens']} | {c['pool_gib']:.1f} | {c['paged']} | "
                     f"{c['one_more_refused']} | {c['contiguous_exact']} | {c['contiguous_bucketed']} | "
                     f"{c['ms_per_step']:.1f} |")
    m = r["mixed"]
    lines += ["", f"Mixed load: one {m['long']}-token request plus {m['short']}-token requests "
              f"(+{m['new_tokens']} new each): paged fits {m['short_requests_paged']} short ones, a contiguous "
              f"cache {m['short_requests_contiguous']} (every row reserves the longest).", "",
              f"Time to first token, questions of {r['ttft']['question_tokens']} tokens about one "
              f"{r['ttft']['doc_tokens']}-token document (public generate_ids, one request at a time; the "
              "first call of the run also compiles the prefill's kernels):", "",
              "| prefix cache | question | TTFT s | prompt tokens reused |", "|---|---|---|---|"]
    for name, key in (("on", "with_cache"), ("off", "without_cache")):
        for t in r["ttft"][key]:
            lines.append(f"| {name} | {t['question']} | {t['ttft_s']:.3f} | {t['prefix_cached_tokens']} |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", default="qwen2.5-7b", choices=list(SHAPES))
    parser.add_argument("--contexts", nargs="+", type=int, default=[32768, 131072])
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--doc-tokens", type=int, default=65536)
    parser.add_argument("--questions", type=int, default=10)
    parser.add_argument("--question-tokens", type=int, default=48)
    parser.add_argument("--out-dir", default="benchmarks/paging")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
