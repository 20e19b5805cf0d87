"""`resa bench serve`: an open-loop load generator against a running `resa serve`.

Requests arrive as a Poisson process at `--rate` requests/s (whatever the server's progress: open
loop), each with a prompt of random token ids whose length is drawn from `--prompt-lens` and
`--output-len` tokens to generate (EOS ignored, so every request costs the same). Each is a
streaming completion; the client times every token's chunk. Reported per run: request and output
token throughput, time to first token (TTFT) and inter-token latency (ITL: gaps between a
request's consecutive tokens) percentiles, overall and per prompt length, plus the server's KV
read fraction and rectifications from the responses' `resa` stats. `--mode` sends a per-request
`resa.mode` override, so one server measures dense and ReSA side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field


@dataclass
class RequestTiming:
    prompt_len: int
    output_len: int
    sent: float = 0.0
    token_times: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    kv_read_fraction: float | None = None
    rectifications: int | None = None
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.sent if self.token_times else None

    @property
    def gaps(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL (default %(default)s)")
    p.add_argument("--api-key", default=None, help="Bearer key, if the server was started with --api-key")
    p.add_argument("--model", default=None, help="model name to request (default: the server's first)")
    p.add_argument("--num-requests", type=int, default=32, help="requests in the run (default %(default)s)")
    p.add_argument("--rate", type=float, default=1.0,
                   help="mean arrival rate, requests/s (Poisson); inf sends all at once (default %(default)s)")
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[4096, 16384],
                   help="prompt lengths in tokens; each request draws one at random (default %(default)s)")
    p.add_argument("--output-len", type=int, default=128, help="tokens generated per request (default %(default)s)")
    p.add_argument("--mode", choices=["dense", "sparse", "resa", "server"], default="server",
                   help="per-request ReSA mode override (default: the server's setting)")
    p.add_argument("--vocab", type=int, default=32000,
                   help="prompt token ids are drawn below this (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of arrivals, lengths and prompts (default %(default)s)")
    p.add_argument("--timeout", type=float, default=3600.0, help="per-request timeout, seconds")
    p.add_argument("--out", default=None, help="write the report here (.json; a .md table next to it)")


def plan(args: argparse.Namespace) -> list[tuple[float, list[int], int]]:
    """(arrival offset in seconds, prompt ids, output length) of every request."""
    rng = random.Random(args.seed)
    t, out = 0.0, []
    for _ in range(args.num_requests):
        n = rng.choice(args.prompt_lens)
        out.append((t, [rng.randrange(args.vocab) for _ in range(n)], args.output_len))
        if math.isfinite(args.rate):
            t += rng.expovariate(args.rate)
    return out


async def _one(client, url: str, headers: dict, body: dict, timing: RequestTiming, timeout: float) -> None:
    timing.sent = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body, headers=headers, timeout=timeout) as resp:
            if resp.status_code != 200:
                timing.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                choices = chunk.get("choices")
                if choices and choices[0].get("finish_reason") is None:  # one chunk per token
                    timing.token_times.append(time.perf_counter())
                if chunk.get("usage"):
                    timing.completion_tokens = chunk["usage"]["completion_tokens"]
                stats = chunk.get("resa")
                if stats:
                    timing.kv_read_fraction = stats.get("kv_read_fraction")
                    timing.rectifications = stats.get("rectifications")
    except Exception as exc:  # noqa: BLE001 -- a failed request is reported, the run goes on
        timing.error = f"{type(exc).__name__}: {exc}"


async def _run(args: argparse.Namespace) -> tuple[list[RequestTiming], float]:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=None)) as client:
        model = args.model
        if model is None:
            resp = await client.get(f"{args.url}/v1/models", headers=headers)
            resp.raise_for_status()
            model = resp.json()["data"][0]["id"]
        timings, tasks = [], []
        t0 = time.perf_counter()
        for offset, prompt, out_len in plan(args):
            delay = t0 + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            body = {"model": model, "prompt": prompt, "max_tokens": out_len, "temperature": 0, "stream": True,
                    "ignore_eos": True, "stream_options": {"include_usage": True}}
            if args.mode != "server":
                body["resa"] = {"mode": args.mode}
            timing = RequestTiming(len(prompt), out_len)
            timings.append(timing)
            tasks.append(asyncio.create_task(_one(client, f"{args.url}/v1/completions", headers, body, timing,
                                                  args.timeout)))
        await asyncio.gather(*tasks)
        return timings, time.perf_counter() - t0


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    v = sorted(values)

    def q(p: float) -> float:
        return v[min(len(v) - 1, int(round(p * (len(v) - 1))))]

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "mean": statistics.fmean(v)}


def report(args: argparse.Namespace, timings: list[RequestTiming], wall: float) -> dict:
    ok = [t for t in timings if t.error is None]
    out = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("func", "api_key")},
        "requests": len(timings), "failed": len(timings) - len(ok), "wall_s": wall,
        "request_throughput": len(ok) / wall if wall else None,
        "output_tokens_per_s": sum(len(t.token_times) for t in ok) / wall if wall else None,
        "ttft_s": percentiles([t.ttft for t in ok if t.ttft is not None]),
        "itl_s": percentiles([g for t in ok for g in t.gaps]),
        "by_prompt_len": {},
        "kv_read_fraction": statistics.fmean([t.kv_read_fraction for t in ok if t.kv_read_fraction is not None])
        if any(t.kv_read_fraction is not None for t in ok) else None,
        "errors": sorted({t.error for t in timings if t.error})[:5],
        "per_request": [asdict(t) | {"ttft": t.ttft} for t in timings],
    }
    for n in sorted(set(t.prompt_len for t in ok)):
        group = [t for t in ok if t.prompt_len == n]
        out["by_prompt_len"][n] = {"requests": len(group),
                                   "ttft_s": percentiles([t.ttft for t in group if t.ttft is not None]),
                                   "itl_s": percentiles([g for t in group for g in t.gaps])}
    return out


def table(rep: dict) -> str:
    def ms(d: dict, k: str) -> str:
        return "-" if d.get(k) is None else f"{1000 * d[k]:.1f}"

    s = rep["settings"]
    lines = [f"mode={s['mode']} rate={s['rate']}/s requests={rep['requests']} failed={rep['failed']} "
             f"wall={rep['wall_s']:.1f}s throughput={rep['request_throughput']:.3f} req/s, "
             f"{rep['output_tokens_per_s']:.1f} tok/s, kv_read={rep['kv_read_fraction']}",
             "| prompt | requests | TTFT p50 ms | TTFT p90 ms | ITL p50 ms | ITL p90 ms | ITL p99 ms |",
             "|---|---|---|---|---|---|---|"]
    rows = [("all", {"requests": rep["requests"] - rep["failed"], "ttft_s": rep["ttft_s"], "itl_s": rep["itl_s"]})]
    rows += list(rep["by_prompt_len"].items())
    for name, g in rows:
        lines.append(f"| {name} | {g['requests']} | {ms(g['ttft_s'], 'p50')} | {ms(g['ttft_s'], 'p90')} | "
                     f"{ms(g['itl_s'], 'p50')} | {ms(g['itl_s'], 'p90')} | {ms(g['itl_s'], 'p99')} |")
    if rep["errors"]:
        lines.append("errors: " + "; ".join(rep["errors"]))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    if args.num_requests < 1 or args.output_len < 1 or min(args.prompt_lens) < 1 or not args.rate > 0:
        from ..errors import UsageError

        raise UsageError("--num-requests, --output-len, --prompt-lens and --rate must be positive")
    timings, wall = asyncio.run(_run(args))
    rep = report(args, timings, wall)
    print(table(rep), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rep, f, indent=1)
        with open(args.out.rsplit(".", 1)[0] + ".md", "w") as f:
            f.write(table(rep) + "\n")
    return rep


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m resa.bench.serve", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
