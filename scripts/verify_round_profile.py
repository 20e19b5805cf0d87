"""Where a verification round's time goes (mode "verify"), Qwen2.5-7B shapes with random weights on
one GPU, a synthetic context, compiled layer halves and CUDA graphs as `Engine.load` sets them up.

Times each piece of a round on its own (synchronised, medians of replays): a sparse draft step, a
dense step, the verification pass at several widths, the greedy acceptance rule and the rollback;
then runs `decode_verify` with an imposed acceptance rate under the profiler and reports the wall
time per round against the GPU's busy time (kernels summed), i.e. how long the GPU waits for the
host. Prints tables; writes JSON to $OUT (or the working directory).

    PYTHONPATH=. python3 scripts/verify_round_profile.py [--context 131072] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from resa.config import ResaConfig  # noqa: E402
from resa.engine import Engine  # noqa: E402
from resa.generate import Collector  # noqa: E402
from resa.random_model import random_model  # noqa: E402
from resa.sampling import SamplingConfig  # noqa: E402
from resa.verify import acceptance_pattern, decode_verify, greedy_accept, rollback  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, reps: int = 10) -> float:
    """Median wall time of fn() in ms, synchronised around each call (after one warm-up call)."""
    fn()
    sync()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(1000 * (time.perf_counter() - t0))
    return statistics.median(out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--alpha", type=float, default=0.97)
    p.add_argument("--widths", type=int, nargs="+", default=[4, 8], help="draft lengths (0: adaptive)")
    p.add_argument("--pieces", action=argparse.BooleanOptionalAction, default=True,
                   help="time the pieces of a round first")
    p.add_argument("--shape", default="qwen2.5-7b")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    dev = torch.device(args.device)
    model = random_model(args.shape, device=dev)
    if dev.type == "cuda":
        model.compile_decode()
    engine = Engine(model, gpu_memory_utilization=0.95)
    B, n = args.batch, args.context
    resa = ResaConfig(rectify_every=32)
    runner = engine.open(B, n + 400, resa.block_size)
    runner.fill_synthetic(n, zeros=True)
    V = model.cfg.vocab_size
    tok = torch.zeros(B, dtype=torch.int64, device=dev)
    res: dict = dict(card=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU", context=n, batch=B, pieces={}, rounds={})

    def reset() -> None:
        runner.truncate([n] * B)

    def step(sparse):
        def fn():
            reset()
            runner.step(tok, sparse)
        return fn

    widths = sorted(set(w for w in args.widths if w > 0) | {2, 16}) if args.pieces else []
    res["pieces"]["truncate (eager, not part of a round)"] = timed(reset)
    res["pieces"]["sparse step"] = timed(step(resa)) - res["pieces"]["truncate (eager, not part of a round)"]
    res["pieces"]["dense step"] = timed(step(None)) - res["pieces"]["truncate (eager, not part of a round)"]
    for w in widths:
        toks = torch.zeros(B, w + 1, dtype=torch.int64, device=dev)

        def window(w=w, toks=toks):
            reset()
            for _ in range(w):
                runner.step(tok, resa)
            return runner.window(toks, overwrite=w, every=True)

        t_steps = timed(lambda w=w: [reset()] + [runner.step(tok, resa) for _ in range(w)])
        res["pieces"][f"w={w}: verification pass (T={w + 1})"] = timed(window) - t_steps
        logits = window()
        drafts = toks[:, 1:]
        res["pieces"][f"w={w}: greedy accept"] = timed(lambda: greedy_accept(drafts, logits))
        start = torch.full((B,), n, dtype=torch.int64, device=dev)
        keep = torch.full((B,), 2, dtype=torch.int64, device=dev)
        res["pieces"][f"w={w}: rollback"] = timed(lambda: rollback(runner, start, keep))
    print("| piece | ms |\n|---|---|")
    for k, v in res["pieces"].items():
        print(f"| {k} | {v:.3f} |")

    greedy = SamplingConfig()
    logits0 = torch.zeros(B, V, device=dev)
    for w in args.widths:
        # w = 0: the adaptive draft length (2..64)
        cfg = resa.with_(mode="verify", **(dict(draft_min=w, draft_max=w) if w else {}))

        def run(new=65):
            reset()
            sink = Collector(B, [], None)
            return decode_verify(runner, logits0, resa=cfg, sampling=greedy, generator=None, sink=sink,
                                 max_new_tokens=new, accept_override=acceptance_pattern(args.alpha, seed=1))

        run()  # graphs
        acts = [torch.profiler.ProfilerActivity.CPU]
        if dev.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=acts) as prof:
            st = run()
            sync()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_ms = sum(e.time_range.elapsed_us() for e in kernels) / 1000
        st2 = run()  # the same loop without the profiler
        row = dict(wall_ms=1000 * st2.decode_seconds, windows=st2.windows, tokens_per_window=st2.tokens_per_window,
                   wall_ms_per_window=1000 * st2.decode_seconds / max(st2.windows, 1),
                   profiled_wall_ms=1000 * st.decode_seconds, profiled_gpu_busy_ms=busy_ms, kernels=len(kernels),
                   draft_widths=st2.draft_widths)
        res["rounds"][f"w={w}"] = row
        print(f"\nw={w} alpha={args.alpha}: {row}")
        print(prof.key_averages().table(sort_by="self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total",
                                        row_limit=18))
    with open(os.path.join(os.environ.get("OUT", "."), "verify_round_profile.json"), "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
