"""Drift in free generation: greedy continuations of long prompts, dense vs sparse vs ReSA.

Every mode generates from the same prompts with `Engine.generate_ids` (EOS ignored, so all rows
run the full length). Each continuation is then scored teacher-forced by the dense model
(`forward_full`): its NLL says how plausible the text is to dense decoding, whatever the tokens.
Also recorded per position: equality with the dense continuation and 4-gram repetition.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..config import ResaConfig
from ..sampling import SamplingConfig
from .data import token_sequences
from .stats import cluster_bootstrap

MODES = ("dense", "sparse", "resa-paper", "resa-fused")
# Also accepted, on request (--modes): rectify_every="auto" and mode "verify".
EXTRA_MODES = ("resa-auto", "verify")


@dataclass(frozen=True)
class DriftSettings:
    prompt_tokens: int = 2048
    new_tokens: int = 1024
    prompts: int = 4
    ratio: float = 0.1
    rectify_every: int = 32
    modes: tuple[str, ...] = MODES
    corpora: tuple[str, ...] = ("essays", "bible", "shakespeare", "code")
    block_size: int = 16
    min_blocks: int = 16
    buckets: int = 8
    seed: int = 1

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in MODES + EXTRA_MODES]
        if bad:
            raise ValueError(f"unknown drift modes {bad}; choose from {', '.join(MODES + EXTRA_MODES)}")

    def resa(self, mode: str) -> ResaConfig:
        base = dict(block_size=self.block_size, active_ratio=self.ratio, min_blocks=self.min_blocks,
                    rectify_every=self.rectify_every)
        if mode == "dense":
            return ResaConfig(mode="dense", **base)
        if mode == "sparse":
            return ResaConfig(mode="sparse", **{**base, "rectify_every": 0})
        if mode == "resa-auto":  # paper variant, f from the measured agreement (docs/method.md 8)
            return ResaConfig(mode="resa", **{**base, "rectify_every": "auto"})
        if mode == "verify":  # docs/method.md 7: the output should equal dense
            return ResaConfig(mode="verify", **base)
        return ResaConfig(mode="resa", rectify_variant=mode.split("-")[1], **base)


def settings_dict(s: DriftSettings) -> dict:
    d = asdict(s)
    d["modes"], d["corpora"] = list(s.modes), list(s.corpora)
    return d


def repeated_4grams(tokens: list[int]) -> list[int]:
    """1 at position i when the 4-gram ending at i already occurred earlier in `tokens`."""
    seen, out = set(), []
    for i in range(len(tokens)):
        if i < 3:
            out.append(0)
            continue
        g = tuple(tokens[i - 3:i + 1])
        out.append(int(g in seen))
        seen.add(g)
    return out


def dense_nll(engine, prompt: list[int], continuation: list[int]) -> list[float]:
    """NLL (nats) of each continuation token under the dense model, teacher-forced."""
    ids = torch.tensor([prompt + continuation[:-1]], dtype=torch.int64)
    logits = engine.model.forward_full(ids)[0, len(prompt) - 1:]
    logp = torch.log_softmax(logits, dim=-1)
    return (-logp.gather(-1, torch.tensor(continuation)[:, None])[:, 0]).tolist()


def run(engine, store, s: DriftSettings, progress: bool = True) -> None:
    """Generate and score every mode (one cell per mode), skipping modes already recorded."""
    from tqdm import tqdm

    seqs = token_sequences(engine.tokenizer, s.corpora, s.prompt_tokens - 1, s.prompts, s.seed)
    prompts = [q.ids for q in seqs]
    for mode in tqdm(s.modes, desc="drift modes", disable=not progress):
        if store.done(mode):
            continue
        t0 = time.perf_counter()
        res = engine.generate_ids(prompts, resa=s.resa(mode), sampling=SamplingConfig(),
                                  max_new_tokens=s.new_tokens, eos_token_ids=[])
        gen_s = time.perf_counter() - t0
        rows = []
        for q, toks in zip(seqs, res.token_ids):
            rows.append({"corpus": q.corpus, "doc": q.doc, "tokens": toks,
                         "nll": [round(v, 4) for v in dense_nll(engine, q.ids, toks)],
                         "repeat4": repeated_4grams(toks)})
        store.put(mode, {"rows": rows, "generate_seconds": round(gen_s, 2),
                         "rectifications": res.stats.rectifications,
                         "kv_read_fraction": round(res.stats.kv_read_fraction, 4)}, time.perf_counter() - t0)


def _ratio_ci(num: list[list[float]], den: list[list[float]], reps: int = 2000) -> tuple[float, float, float]:
    """Ratio of mean NLLs (method / dense) with a paired cluster-bootstrap interval over prompts."""
    a = np.array([sum(x) for x in num]); b = np.array([sum(x) for x in den])
    n = len(a)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, n, size=(reps, n))
    boot = a[idx].sum(1) / b[idx].sum(1)
    lo, hi = np.percentile(boot, [2.5, 97.5]) if n > 1 else (float("nan"), float("nan"))
    return float(a.sum() / b.sum()), float(lo), float(hi)


def summarize(cells: dict, settings: dict) -> dict:
    """Per mode: overall and per-bucket NLL / agreement / repetition with intervals."""
    G, nb = settings["new_tokens"], settings["buckets"]
    edges = [round(G * i / nb) for i in range(nb + 1)]
    dense = cells.get("dense")
    out = {"modes": {}}
    for mode, cell in cells.items():
        rows = cell["rows"]
        drows = dense["rows"] if dense else None
        agree = [[int(a == b) for a, b in zip(r["tokens"], d["tokens"])] for r, d in zip(rows, drows)] if drows else []
        first = [next((i for i, v in enumerate(a) if not v), len(a)) for a in agree]
        rec = {"nll": cluster_bootstrap([r["nll"] for r in rows]),
               "nll_ratio": _ratio_ci([r["nll"] for r in rows], [d["nll"] for d in drows]) if drows else (float("nan"),) * 3,
               "agree": cluster_bootstrap(agree), "first_divergence": int(np.median(first)) if first else -1,
               "repeat4": cluster_bootstrap([r["repeat4"] for r in rows]),
               "rectifications": cell.get("rectifications"), "kv_read_fraction": cell.get("kv_read_fraction"),
               "buckets": []}
        for lo, hi in zip(edges[:-1], edges[1:]):
            rec["buckets"].append({
                "start": lo, "end": hi,
                "nll": cluster_bootstrap([r["nll"][lo:hi] for r in rows]),
                "agree": cluster_bootstrap([a[lo:hi] for a in agree]) if agree else (float("nan"),) * 3,
                "repeat4": cluster_bootstrap([r["repeat4"][lo:hi] for r in rows])})
        out["modes"][mode] = rec
    return out
