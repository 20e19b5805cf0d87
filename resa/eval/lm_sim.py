"""Language-modelling simulation of KV misalignment (the paper's design, docs/method.md section 6).

For a text of L + 1 tokens: positions 0 .. L-x-1 are encoded densely (prefill), the last x
positions by sparse decode steps (so their K/V is sparse-made, as between two rectifications of
ReSA when x = f, or in sparse-only decoding when x = L), and the next-token predictions of the
last P = 32 positions are scored (top-1, top-3, NLL). Reference cells on the same texts:
- dense: every position dense;
- upper bound ("ub"): all K/V dense, only each prediction made with sparse attention (after the
  sparse step, the same token is re-encoded densely, so later steps see dense K/V).
Everything goes through the engine's runner (extend, step, window): the same forward pass as
generation. Rows of a batch are different texts of the same length.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from ..config import ResaConfig
from .data import token_sequences
from .stats import cluster_bootstrap


@dataclass(frozen=True)
class LMSimSettings:
    """length: L; xs: sparse suffix lengths (0 stands for L: sparse only); ratios: active ratios;
    sequences: texts per cell; batch: texts run together; eval_tokens: P."""

    length: int = 8192
    xs: tuple[int, ...] = (32, 64, 128, 256, 1024, 0)
    ratios: tuple[float, ...] = (0.05, 0.1, 0.2)
    sequences: int = 8
    batch: int = 8
    corpora: tuple[str, ...] = ("essays", "bible", "shakespeare", "code")
    eval_tokens: int = 32
    block_size: int = 16
    min_blocks: int = 16
    local_blocks: int = 1
    prefill_chunk: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if self.eval_tokens > min(self.x_eff(x) for x in self.xs):
            raise ValueError(f"every x must be >= eval_tokens={self.eval_tokens}")

    def x_eff(self, x: int) -> int:
        """Sparse suffix length; x = 0 or x >= L means all but the first token (sparse only)."""
        return self.length - 1 if x == 0 or x >= self.length else x

    def resa(self, ratio: float) -> ResaConfig:
        return ResaConfig(mode="sparse", block_size=self.block_size, active_ratio=ratio,
                          min_blocks=self.min_blocks, local_blocks=self.local_blocks,
                          rectify_every=0, prefill_chunk=self.prefill_chunk)


def cell_key(batch: int, kind: str, x: int | None = None, ratio: float | None = None) -> str:
    """'b0/dense', 'b0/ub/r0.1', 'b0/x32/r0.1' (x = 0: sparse only)."""
    if kind == "dense":
        return f"b{batch}/dense"
    if kind == "ub":
        return f"b{batch}/ub/r{ratio}"
    return f"b{batch}/x{x}/r{ratio}"


def score(logits: torch.Tensor, targets: torch.Tensor) -> list[dict]:
    """Per row: top-1 / top-3 hits, NLL and argmax of each scored position.
    logits [B, P, V] fp32, targets [B, P]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, targets[..., None])[..., 0]
    top3 = logits.topk(3, dim=-1).indices
    hit3 = (top3 == targets[..., None]).any(-1)
    arg = top3[..., 0]
    return [{"top1": (arg[b] == targets[b]).int().tolist(), "top3": hit3[b].int().tolist(),
             "nll": [round(v, 5) for v in nll[b].tolist()], "argmax": arg[b].tolist()}
            for b in range(logits.shape[0])]


def _extend_dense(runner, ids: torch.Tensor, start: int, end: int, chunk: int) -> None:
    """Append positions start .. end-1 of every row densely (chunked like a prefill)."""
    if end > start:
        runner.extend(ids[:, start:end].tolist(), chunk)


def run(engine, store, s: LMSimSettings, progress: bool = True) -> None:
    """Fill `store` with every cell of the simulation, skipping cells already recorded."""
    from tqdm import tqdm

    seqs = token_sequences(engine.tokenizer, s.corpora, s.length, s.sequences, s.seed)
    L, P = s.length, s.eval_tokens
    xs = sorted({s.x_eff(x) for x in s.xs}, reverse=True)
    x_name = {s.x_eff(x): (0 if s.x_eff(x) == L - 1 else x) for x in s.xs}
    batches = [seqs[i:i + s.batch] for i in range(0, len(seqs), s.batch)]
    per_batch = sum(xs) * len(s.ratios) + 2 * P * len(s.ratios) + P
    bar = tqdm(total=per_batch * len(batches), desc=f"lm-sim L={L}", unit="step", disable=not progress)
    for bi, rows in enumerate(batches):
        keys = [cell_key(bi, "dense")] + [cell_key(bi, "ub", ratio=r) for r in s.ratios] + \
               [cell_key(bi, "x", x_name[x], r) for x in xs for r in s.ratios]
        if all(store.done(k) for k in keys):
            bar.update(per_batch)
            continue
        ids = torch.tensor([r.ids for r in rows], dtype=torch.int64)
        targets = ids[:, L - P + 1:L + 1]
        meta = [{"corpus": r.corpus, "doc": r.doc, "offset": r.offset} for r in rows]
        t0 = time.perf_counter()
        runner = engine.open(len(rows), L, s.block_size)
        first = L - xs[0]
        runner.extend([r.ids[:first] for r in rows], s.prefill_chunk)
        store.data["timings"].setdefault("prefill_seconds", {})[f"b{bi}"] = round(time.perf_counter() - t0, 2)
        cur = first
        for x in xs:
            _extend_dense(runner, ids, cur, L - x, s.prefill_chunk)
            cur = L - x
            for r in s.ratios:
                key = cell_key(bi, "x", x_name[x], r)
                if store.done(key):
                    bar.update(x)
                    continue
                t0 = time.perf_counter()
                work, cfg, out = runner.fork(), s.resa(r), []
                for p in range(L - x, L):
                    logits = work.step(ids[:, p], cfg)
                    if p >= L - P:
                        out.append(logits)
                    bar.update(1)
                del work
                store.put(key, {"rows": _rows(meta, score(torch.stack(out, 1), targets))},
                          time.perf_counter() - t0)
        _extend_dense(runner, ids, cur, L - P, s.prefill_chunk)
        if not store.done(cell_key(bi, "dense")):
            t0 = time.perf_counter()
            work, out = runner.fork(), []
            for p in range(L - P, L):
                out.append(work.step(ids[:, p], None))
                bar.update(1)
            store.put(cell_key(bi, "dense"), {"rows": _rows(meta, score(torch.stack(out, 1), targets))},
                      time.perf_counter() - t0)
        for r in s.ratios:
            key = cell_key(bi, "ub", ratio=r)
            if store.done(key):
                bar.update(2 * P)
                continue
            t0 = time.perf_counter()
            work, cfg, out = runner.fork(), s.resa(r), []
            for p in range(L - P, L):
                out.append(work.step(ids[:, p], cfg))
                # Re-encode the token densely: later predictions see only dense K/V.
                work.window(ids[:, p:p + 1], overwrite=1)
                bar.update(2)
            store.put(key, {"rows": _rows(meta, score(torch.stack(out, 1), targets))}, time.perf_counter() - t0)
        del runner
    bar.close()


def _rows(meta: list[dict], scores: list[dict]) -> list[dict]:
    return [{**m, **sc} for m, sc in zip(meta, scores)]


def summarize(cells: dict, settings: dict) -> list[dict]:
    """One row per condition (dense, ub@r, x@r): means with 95% cluster-bootstrap intervals over
    texts, the paired gap to dense, and top-1 agreement with dense's prediction."""
    groups: dict[str, list[dict]] = {}
    for key, cell in cells.items():
        cond = key.split("/", 1)[1]
        groups.setdefault(cond, []).extend(cell["rows"])
    dense = _rows_by_text(cells, "dense")
    out = []
    for cond in sorted(groups, key=_cond_order):
        rows = groups[cond]
        rec = {"condition": cond, "texts": len(rows), "tokens": sum(len(r["top1"]) for r in rows)}
        for m in ("top1", "top3", "nll"):
            rec[m] = cluster_bootstrap([r[m] for r in rows])
            pairs = [(r, dense.get((r["corpus"], r["doc"], r["offset"]))) for r in rows]
            rec[m + "_gap"] = cluster_bootstrap([[a - b for a, b in zip(r[m], d[m])] for r, d in pairs if d])
        rec["agree_dense"] = cluster_bootstrap(
            [[int(a == b) for a, b in zip(r["argmax"], d["argmax"])] for r, d in
             ((r, dense.get((r["corpus"], r["doc"], r["offset"]))) for r in rows) if d])
        out.append(rec)
    return out


def _rows_by_text(cells: dict, cond: str) -> dict:
    return {(r["corpus"], r["doc"], r["offset"]): r for key, cell in cells.items()
            if key.split("/", 1)[1] == cond for r in cell["rows"]}


def paired_gap(cells_a: dict, cond_a: str, cells_b: dict, cond_b: str) -> dict:
    """Condition a minus condition b on the texts both runs scored (they may come from two run
    files of the same length, e.g. a separate sparse-only run): top-1 / top-3 / NLL gaps with
    95% cluster-bootstrap intervals over texts. cond: "dense", "ub/r0.1", "x32/r0.1", "x0/r0.1"."""
    a, b = _rows_by_text(cells_a, cond_a), _rows_by_text(cells_b, cond_b)
    shared = sorted(set(a) & set(b))
    out = {"texts": len(shared)}
    for m in ("top1", "top3", "nll"):
        out[m] = cluster_bootstrap([[x - y for x, y in zip(a[t][m], b[t][m])] for t in shared])
    return out


def _cond_order(cond: str) -> tuple:
    if cond == "dense":
        return (0, 0, 0)
    parts = cond.split("/")
    ratio = float(parts[-1][1:])
    if parts[0] == "ub":
        return (1, ratio, 0)
    x = int(parts[0][1:])
    return (2, ratio, x if x else 1 << 30)


def settings_dict(s: LMSimSettings) -> dict:
    d = asdict(s)
    d["xs"], d["ratios"], d["corpora"] = list(s.xs), list(s.ratios), list(s.corpora)
    return d
