"""Measurements of mode "verify" (docs/method.md section 7).

    python -m resa.bench.verify acceptance [--model PATH] --lengths 1024 2048 --ratios 0.05 0.1 0.2
    python -m resa.bench.verify speed --contexts 131072 262144 --batch 4 --alphas 0.6 0.8 0.9

acceptance: a real model on real text (prompts cut from the evaluation corpora), greedy and
sampled: acceptance rate, per-token acceptance, tokens per verification pass, with 95% intervals
over prompts; every greedy run is first checked to equal dense decoding token for token.

speed: tokens/s of the public loop, dense vs ReSA vs verify, at real shapes with random weights
and a synthetic context (`Runner.fill_synthetic`, as `resa.bench.e2e`). Random weights accept
nothing like a real model would, so verify runs with an imposed acceptance pattern (each draft
accepted with probability alpha, `resa.verify.acceptance_pattern`), at the adaptive draft length
and at fixed ones; the break-even alpha below which verify loses to dense is read off both the
measurements and the cost model. A correctness check runs first: greedy verify equals dense on a
small peaked random model on the same device and kernels.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

from ..config import ResaConfig
from ..engine import Engine, compile_by_default
from ..generate import Collector
from ..sampling import SamplingConfig, make_generator
from ..verify import acceptance_pattern, break_even, decode_verify, draft_grid, step_cost


def _interval(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of a 95% normal interval over the values (0 for one value)."""
    xs = [x for x in xs if x == x]
    if not xs:
        return float("nan"), float("nan")
    if len(xs) < 2:
        return xs[0], 0.0
    return statistics.fmean(xs), 1.96 * statistics.stdev(xs) / math.sqrt(len(xs))


def acceptance(args: argparse.Namespace) -> dict:
    from ..eval.data import token_sequences

    engine = Engine.load(args.model, device=args.device)
    rows = []
    for L in args.lengths:
        seqs = token_sequences(engine.tokenizer, args.corpora, L, args.prompts, seed=0)
        prompts = [s.ids[:L] for s in seqs]
        for ratio in args.ratios:
            cfg = ResaConfig(mode="verify", active_ratio=ratio, draft_min=args.draft_min, draft_max=args.draft_max)
            for temp in args.temperatures:
                per = []
                for i, p in enumerate(prompts):
                    sampling = SamplingConfig(temperature=temp, seed=1000 + i)
                    out = engine.generate_ids([p], resa=cfg, sampling=sampling, max_new_tokens=args.new,
                                              eos_token_ids=[])
                    s = out.stats
                    same = None
                    if temp == 0:
                        dense = engine.generate_ids([p], resa=cfg.with_(mode="dense"), max_new_tokens=args.new,
                                                    eos_token_ids=[])
                        same = dense.token_ids == out.token_ids
                    per.append(dict(acceptance=s.acceptance_rate, token_acceptance=s.token_acceptance,
                                    tokens_per_window=s.tokens_per_window, windows=s.windows,
                                    mean_w=statistics.fmean(s.draft_widths) if s.draft_widths else float("nan"),
                                    identical_to_dense=same))
                row = dict(length=L, active_ratio=ratio, temperature=temp, prompts=len(per), runs=per)
                for key in ("acceptance", "token_acceptance", "tokens_per_window", "mean_w"):
                    row[key], row[key + "_ci95"] = _interval([r[key] for r in per])
                if temp == 0:
                    row["identical_to_dense"] = all(r["identical_to_dense"] for r in per)
                rows.append(row)
                print(f"L={L} active={ratio} T={temp}: acceptance {row['acceptance']:.3f}±{row['acceptance_ci95']:.3f} "
                      f"per-token {row['token_acceptance']:.3f}±{row['token_acceptance_ci95']:.3f} "
                      f"tokens/window {row['tokens_per_window']:.2f}±{row['tokens_per_window_ci95']:.2f} "
                      f"w {row['mean_w']:.1f}" + (f" identical={row['identical_to_dense']}" if temp == 0 else ""),
                      flush=True)
    device = engine.device
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return dict(kind="acceptance", model=args.model or "default (SmolLM2-135M-Instruct Q4_1)", card=card,
                torch=torch.__version__, corpora=args.corpora, new_tokens=args.new, rows=rows,
                draft=[args.draft_min, args.draft_max],
                command="python -m resa.bench.verify acceptance " + " ".join(
                    f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                    for k, v in vars(args).items() if k not in ("what", "out", "stem", "model") and v is not None))


def _check_small(device: torch.device) -> dict:
    """Greedy verify == dense on a small peaked random model through this device's kernels and
    CUDA graphs (the tests do the same on CPU)."""
    from ..config import ModelConfig, RopeConfig
    from ..model import Transformer

    cfg = ModelConfig(arch="llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=8192,
                      rope=RopeConfig(theta=10000.0))
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.3)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        engine = Engine(model.to(dtype).eval())
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (1500, 700)]
        resa = ResaConfig(mode="verify", block_size=16, min_blocks=4, active_ratio=0.6)
        dense = engine.generate_ids(prompts, resa=resa.with_(mode="dense"), max_new_tokens=64, eos_token_ids=[])
        ver = engine.generate_ids(prompts, resa=resa, max_new_tokens=64, eos_token_ids=[])
        same = sum(a == b for x, y in zip(dense.token_ids, ver.token_ids) for a, b in zip(x, y))
        first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None)
                 for x, y in zip(dense.token_ids, ver.token_ids)]
        out[str(dtype).split(".")[-1]] = dict(identical=dense.token_ids == ver.token_ids, same_tokens=same,
                                               tokens=sum(map(len, dense.token_ids)), first_difference=first,
                                               acceptance=ver.stats.acceptance_rate)
        print(f"check {dtype}: verify identical to dense: {dense.token_ids == ver.token_ids} "
              f"({same}/{sum(map(len, dense.token_ids))} tokens, first differences {first}), "
              f"acceptance {ver.stats.acceptance_rate:.2f}", flush=True)
    return out


def speed(args: argparse.Namespace) -> dict:
    from ..random_model import random_model

    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    result = dict(kind="speed", card=card, torch=torch.__version__, shape=args.shape,
                  batch=args.batch, rows=[])
    result["check"] = _check_small(device)
    model = random_model(args.shape, device=device)
    compiled = compile_by_default(args.compile, device)
    if compiled:
        model.compile_decode()
    result["compiled"] = compiled
    engine = Engine(model, gpu_memory_utilization=0.95)
    B, new = args.batch, args.new
    base = ResaConfig(active_ratio=args.active_ratio, rectify_every=32)
    greedy = SamplingConfig()
    for n in args.contexts:
        runner = engine.open(B, n + new + 160, base.block_size)
        runner.fill_synthetic(n, seed=n, zeros=args.zeros)
        logits = torch.zeros(B, model.cfg.vocab_size, device=device)
        row = dict(context=n, modes={})
        cost = step_cost(runner, base, [n] * B)
        row["step_cost_model"], row["window_slope_model"], row["pass_base_model"] = cost

        def public(cfg: ResaConfig) -> float:
            runner.truncate([n] * B)
            s = engine.decode(runner, logits, resa=cfg, max_new_tokens=new, eos_token_ids=[]).stats
            return B * (new - 1) / s.decode_seconds

        def verified(cfg: ResaConfig, alpha: float) -> tuple[float, float]:
            runner.truncate([n] * B)
            sink = Collector(B, [], None)
            s = decode_verify(runner, logits, resa=cfg, sampling=greedy, generator=None, sink=sink,
                              max_new_tokens=new, accept_override=acceptance_pattern(alpha, seed=n))
            return B * (new - 1) / s.decode_seconds, s

        for name, cfg in (("dense", base.with_(mode="dense")), ("resa", base)):
            public(cfg)  # warm-up: graphs
            tps = public(cfg)
            row["modes"][name] = dict(tokens_per_s=tps)
            print(f"N={n} B={B} {name:24s} {tps:8.1f} tok/s", flush=True)
        dense_tps = row["modes"]["dense"]["tokens_per_s"]
        for alpha in args.alphas:
            for w in [None] + args.fixed:
                cfg = base.with_(mode="verify", **({} if w is None else dict(draft_min=w, draft_max=w)))
                verified(cfg, alpha)  # warm-up: graphs of the window widths used
                tps, st = verified(cfg, alpha)
                tpw = st.tokens_per_window
                name = f"verify a={alpha} w={'auto' if w is None else w}"
                # The widths drafted and the capture time inside the timed run, to explain a slow row.
                row["modes"][name] = dict(tokens_per_s=tps, tokens_per_window=tpw, alpha=alpha,
                                          w="auto" if w is None else w, vs_dense=tps / dense_tps,
                                          draft_widths=st.draft_widths, capture_seconds=st.capture_seconds)
                print(f"N={n} B={B} {name:24s} {tps:8.1f} tok/s {tps / dense_tps:5.2f}x dense, "
                      f"tokens/window {tpw:.2f}", flush=True)
        row["break_even_alpha_model"] = break_even(cost, draft_grid(2, 64))
        result["rows"].append(row)
        del runner
        engine.release_buffers()
    return result


def markdown(result: dict) -> str:
    if result["kind"] == "acceptance":
        lines = [f"# Verify-mode acceptance, {result['model']}, {result['card']}", "",
                 f"Corpora {', '.join(result['corpora'])}; {result['new_tokens']} new tokens per prompt; "
                 f"draft length {_draft(result)}; 95% intervals over prompts (normal, over the prompts' "
                 "values). Greedy rows were checked token for token against dense decoding.", "",
                 f"`{result.get('command', '')}`", "",
                 "| prompt tokens | active | temperature | prompts | acceptance | per-token acceptance | "
                 "tokens/window | mean w | greedy identical to dense |", "|---|---|---|---|---|---|---|---|---|"]
        for r in result["rows"]:
            ident = {True: "yes", False: "NO"}.get(r.get("identical_to_dense"), "-")
            lines.append(f"| {r['length']} | {r['active_ratio']} | {r['temperature']} | {r['prompts']} | "
                         f"{r['acceptance']:.3f} ± {r['acceptance_ci95']:.3f} | "
                         f"{r['token_acceptance']:.3f} ± {r['token_acceptance_ci95']:.3f} | "
                         f"{r['tokens_per_window']:.2f} ± {r['tokens_per_window_ci95']:.2f} | "
                         f"{r['mean_w']:.1f} | {ident} |")
        return "\n".join(lines) + "\n"
    lines = [f"# Verify-mode speed, {result['shape']} (random weights), batch {result['batch']}, {result['card']}", "",
             f"Compiled layer halves: {'yes' if result.get('compiled') else 'no'}; CUDA graphs "
             f"{'on' if result['card'] != 'CPU' else 'off (CPU)'}.", "",
             "Correctness check (small peaked random model, greedy): " + "; ".join(
                 f"{k}: identical {v['identical']} ({v['same_tokens']}/{v['tokens']})"
                 for k, v in result["check"].items()), "",
             "| context | mode | tokens/s | vs dense | tokens/window |", "|---|---|---|---|---|"]
    for row in result["rows"]:
        for name, m in row["modes"].items():
            vs = f"{m['vs_dense']:.2f}x" if "vs_dense" in m else "-"
            tpw = f"{m['tokens_per_window']:.2f}" if "tokens_per_window" in m else "-"
            lines.append(f"| {row['context']} | {name} | {m['tokens_per_s']:.1f} | {vs} | {tpw} |")
        lines.append(f"| {row['context']} | cost model: sparse step / dense step {row['step_cost_model']:.3f}, "
                     f"pass slope {row['window_slope_model']:.3f}/token, break-even alpha "
                     f"{row['break_even_alpha_model']:.3f} | | | |")
    return "\n".join(lines) + "\n"


def _draft(result: dict) -> str:
    lo, hi = result.get("draft", [None, None])
    return "adaptive" if lo is None else (f"fixed at {lo}" if lo == hi else f"adaptive in {lo}..{hi}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m resa.bench.verify")
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("acceptance")
    a.add_argument("--model", default=None)
    a.add_argument("--device", default="auto")
    a.add_argument("--corpora", nargs="+", default=["code"])
    a.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048])
    a.add_argument("--ratios", nargs="+", type=float, default=[0.05, 0.1, 0.2])
    a.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 0.7])
    a.add_argument("--prompts", type=int, default=4)
    a.add_argument("--new", type=int, default=64)
    a.add_argument("--draft-min", type=int, default=2)
    a.add_argument("--draft-max", type=int, default=64)
    s = sub.add_parser("speed")
    s.add_argument("--shape", default="qwen2.5-7b")
    s.add_argument("--device", default="cuda")
    s.add_argument("--contexts", nargs="+", type=int, default=[131072, 262144])
    s.add_argument("--batch", type=int, default=4)
    s.add_argument("--new", type=int, default=129)
    s.add_argument("--active-ratio", type=float, default=0.1)
    s.add_argument("--alphas", nargs="+", type=float, default=[0.5, 0.7, 0.8, 0.9, 0.95])
    s.add_argument("--fixed", nargs="*", type=int, default=[4, 8, 16])
    s.add_argument("--zeros", action="store_true", help="all-zero synthetic context (faster to write)")
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the layer halves (default: on CUDA, as Engine.load does)")
    for q in (a, s):
        q.add_argument("--out", default="benchmarks/verify")
        q.add_argument("--stem", default=None)
    args = p.parse_args(argv)
    result = acceptance(args) if args.what == "acceptance" else speed(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or args.what
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
