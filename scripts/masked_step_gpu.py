"""GPU check of the continuous batch's masked passes: a masked decode step (every row active,
and half the rows) against the lock-step step on the same runner, Qwen2.5-7B shapes with random
weights, contexts filled synthetically. Prints ms per pass; correctness first (the masked step's
logits equal the plain step's for the active rows)."""

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere: the repository's resa

from resa.config import ResaConfig
from resa.engine import Engine
from resa.random_model import random_model


def timed(fn, n=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1000 / n


def main():
    ctx, batch = int(sys.argv[1]), int(sys.argv[2])
    model = random_model("qwen2.5-7b", device="cuda")
    model.compile_decode()
    engine = Engine(model)
    cfg = ResaConfig()
    r = engine.open(batch, ctx + 512, 16)
    r.fill_synthetic(ctx, zeros=False)
    tok = torch.randint(0, 1000, (batch,), device="cuda")
    out = {}
    # correctness: fork, plain step vs masked step with all rows / half rows
    a = r.fork()
    la = a.step(tok, cfg)
    lb = r.step(tok, cfg, active=[True] * batch)
    err = (la - lb).abs().max().item()
    half = [i % 2 == 0 for i in range(batch)]
    c = a.fork()
    c.truncate([ctx] * batch)
    lc = c.step(tok, cfg, active=half)
    rows = [i for i, h in enumerate(half) if h]
    err_half = (lc[rows] - la[rows]).abs().max().item()
    print(f"max |plain - masked all| = {err:.3g}, half rows = {err_half:.3g}; lengths {c.lengths}", flush=True)
    out["max_abs_diff"] = [err, err_half]
    for name, cfgx in (("resa", cfg), ("dense", None)):
        def plain():
            r.truncate([ctx] * batch)
            r.step(tok, cfgx)

        def masked():
            r.truncate([ctx] * batch)
            r.step(tok, cfgx, active=[True] * batch)

        def masked_half():
            r.truncate([ctx] * batch)
            r.step(tok, cfgx, active=half)

        def trunc_only():
            r.truncate([ctx] * batch)

        t0 = timed(trunc_only)
        res = {k: timed(f) - t0 for k, f in (("plain", plain), ("masked_all", masked), ("masked_half", masked_half))}
        print(f"{name} N={ctx} B={batch}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in res.items()), flush=True)
        out[name] = res
    os.makedirs(os.environ.get("OUT", "."), exist_ok=True)
    with open(os.path.join(os.environ.get("OUT", "."), f"masked_step_{ctx}_{batch}.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
