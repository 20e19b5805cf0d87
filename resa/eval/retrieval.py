"""Retrieval (RULER-style) accuracy: dense vs ReSA at several active ratios on the same samples.

Samples come from `ruler` (needles in Paul Graham essays, variable tracking, common words). The
prompt is prefilled densely in every mode, so each batch of samples is prefilled once and the
answer is decoded greedily from a copy of that cache per condition: dense, and ReSA (sparse
decode steps, dense rectification every f tokens) at each active ratio. A cell of the run file
is one batch of one task with all its conditions, so a killed run resumes at the next batch.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from ..config import ResaConfig
from . import ruler
from .data import documents
from .decode import answer_conditions, eos_ids, greedy_from
from .stats import bootstrap_mean, cluster_bootstrap, stratified_bootstrap, wilson


@dataclass(frozen=True)
class RetrievalSettings:
    """length: tokens of prompt + answer budget per sample; samples: per task; batch: samples
    prefilled and decoded together; ratios: ReSA active ratios (dense always runs)."""

    length: int = 4096
    tasks: tuple[str, ...] = ruler.TASKS
    samples: int = 20
    batch: int = 1
    ratios: tuple[float, ...] = (0.05, 0.1, 0.2)
    haystack: str = "essays"
    words: str = "essays"
    chat: bool = True
    block_size: int = 16
    min_blocks: int = 16
    local_blocks: int = 1
    rectify_every: int = 32
    prefill_chunk: int = 1024
    seed: int = 0
    group_pool: str = "mean"

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in ruler.TASKS]
        if bad:
            raise ValueError(f"unknown retrieval tasks {bad}; choose from {', '.join(ruler.TASKS)}")

    def conditions(self) -> list[tuple[str, ResaConfig]]:
        return answer_conditions(self)


def settings_dict(s: RetrievalSettings) -> dict:
    """The settings that identify a run. `samples` and `tasks` are left out: sample i of a task is
    the same whatever the count, and cells are keyed by task, so a run can be extended with more
    samples or tasks and keeps its finished cells."""
    d = asdict(s)
    d["ratios"] = list(s.ratios)
    del d["samples"], d["tasks"]
    if s.group_pool == "mean":  # the default stays out, so runs recorded before the option resume
        del d["group_pool"]
    return d


def sample_maker(tokenizer, s: RetrievalSettings) -> ruler.SampleMaker:
    hay_docs = documents(s.haystack)
    word_docs = hay_docs if s.words == s.haystack else documents(s.words)
    return ruler.SampleMaker(tokenizer, ruler.Haystack(tokenizer, hay_docs), ruler.vocabulary(word_docs),
                             s.length, chat=s.chat, seed=s.seed)


def run(engine, store, s: RetrievalSettings, progress: bool = True) -> None:
    """Fill `store` with one cell per (task, batch), skipping cells already recorded."""
    from tqdm import tqdm

    n_batches = -(-s.samples // s.batch)
    store.data["meta"]["samples"] = s.samples
    store.data["meta"]["tasks"] = list(s.tasks)
    if all(store.done(f"{t}/b{bi}") for t in s.tasks for bi in range(n_batches)):
        return
    maker = sample_maker(engine.tokenizer, s)
    eos = eos_ids(engine)
    conds = s.conditions()
    bar = tqdm(total=len(s.tasks) * s.samples, desc=f"retrieval L={s.length}", unit="sample",
               disable=not progress)
    for task in s.tasks:
        max_new = ruler.MAX_NEW[task]
        for bi in range(n_batches):
            idx = list(range(bi * s.batch, min(s.samples, (bi + 1) * s.batch)))
            key = f"{task}/b{bi}"
            if store.done(key):
                bar.update(len(idx))
                continue
            samples = [maker.sample(task, i, max_new) for i in idx]
            t0 = time.perf_counter()
            cache = engine.open(len(samples), max(len(x.ids) for x in samples) + max_new, s.block_size)
            logits = cache.extend([x.ids for x in samples], s.prefill_chunk)
            prefill_s = time.perf_counter() - t0
            outputs, seconds = {}, {}
            for ci, (name, cfg) in enumerate(conds):
                t1 = time.perf_counter()
                work = cache if ci == len(conds) - 1 else cache.fork()
                ids = greedy_from(engine, work, logits, cfg, max_new, eos)
                texts = [engine.tokenizer.decode(o) for o in ids]
                outputs[name] = [{"text": t, "score": ruler.recall(t, x.answers)} for t, x in zip(texts, samples)]
                seconds[name] = round(time.perf_counter() - t1, 2)
                del work
            rows = [{"index": x.index, "prompt_tokens": len(x.ids), "answers": x.answers,
                     "depths": [round(d, 4) for d in x.depths]} for x in samples]
            store.put(key, {"rows": rows, "outputs": outputs, "prefill_seconds": round(prefill_s, 2),
                            "decode_seconds": seconds}, time.perf_counter() - t0)
            bar.update(len(idx))
    bar.close()


def _accuracy(scores: list[float]) -> tuple[float, float, float]:
    """Mean score with a 95% interval: Wilson when every score is 0 or 1, else bootstrap."""
    if all(v in (0.0, 1.0) for v in scores):
        return wilson(int(sum(scores)), len(scores))
    return bootstrap_mean(scores)


def summarize(cells: dict, settings: dict) -> dict:
    """Per task and on average: accuracy per condition and the paired difference to dense."""
    per_task: dict[str, dict[str, list[float]]] = {}
    for key, cell in cells.items():
        task = key.split("/")[0]
        for cond, outs in cell["outputs"].items():
            per_task.setdefault(task, {}).setdefault(cond, []).extend(o["score"] for o in outs)
    tasks = [t for t in ruler.TASKS if t in per_task]
    conds = list(next(iter(per_task.values())).keys()) if per_task else []
    out = {"tasks": {}, "average": {}, "conditions": conds}
    for task in tasks:
        rec = {}
        dense = per_task[task].get("dense", [])
        for cond in conds:
            sc = per_task[task].get(cond, [])
            diffs = [a - b for a, b in zip(sc, dense)]
            rec[cond] = {"n": len(sc), "acc": _accuracy(sc), "diff": bootstrap_mean(diffs),
                         "better": sum(d > 0 for d in diffs), "worse": sum(d < 0 for d in diffs)}
        out["tasks"][task] = rec
    for cond in conds:
        groups = [per_task[t].get(cond, []) for t in tasks]
        diffs = [[a - b for a, b in zip(per_task[t].get(cond, []), per_task[t].get("dense", []))] for t in tasks]
        out["average"][cond] = {"n": sum(len(g) for g in groups), "acc": stratified_bootstrap(groups),
                                "diff": stratified_bootstrap(diffs)}
    # Accuracy by needle depth for the single-needle task (dense and each ratio).
    depth: dict[str, dict[str, list[float]]] = {}
    for key, cell in cells.items():
        if not key.startswith("single/"):
            continue
        for cond, outs in cell["outputs"].items():
            for row, o in zip(cell["rows"], outs):
                depth.setdefault(cond, {}).setdefault(f"{row['depths'][0]:.1f}", []).append(o["score"])
    out["single_by_depth"] = {c: {d: cluster_bootstrap([v])[0] for d, v in sorted(m.items())}
                              for c, m in depth.items()}
    return out
