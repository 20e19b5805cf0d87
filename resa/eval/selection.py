"""Selection recall on retrieval samples: do the blocks GBSA keeps hold the attention that matters?

For each needle sample (`ruler`: single, multikey, multivalue) the prompt is prefilled densely and
the dense greedy answer is fed for a few decode steps. At each step, in every layer and KV group,
the step's real post-RoPE queries and cache give:
- the dense attention of each head (softmax over all cached keys) and its mass per block; a
  group's mass is the mean over its G heads;
- the blocks three selections keep with the same budget and the same forced local block:
  "spec" (`select_blocks_ref`: Quest-style min/max bound with the group's mean query, docs/method.md
  section 2), "head-max" (the bound of each query head separately, maxed over the group: the engine's
  `group_pool="max"`) and "oracle" (the blocks of largest true group mass: the best any block
  choice of that budget can do);
- mass kept: the share of the group's attention inside the kept blocks;
- needle: each head's attention on the needle's value tokens, and the share of the group's needle
  attention inside the kept blocks, over "retrieval groups" (some head puts >= `needle_share` of
  its attention on the needle).
Answers are never scored here (that is `retrieval`); this says why a needle is or is not read.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass

import torch

from ..ref.selection import block_budget, select_blocks_ref
from . import ruler
from .decode import eos_ids
from .retrieval import RetrievalSettings, sample_maker
from .stats import cluster_bootstrap

VARIANTS = ("spec", "head-max", "oracle")
NEEDLE_TASKS = ("single", "multikey", "multivalue")


@dataclass(frozen=True)
class SelectionSettings:
    """length: tokens per sample (as in `retrieval`); steps: dense answer steps analysed."""

    length: int = 4096
    tasks: tuple[str, ...] = ("single",)
    samples: int = 10
    ratio: float = 0.1
    steps: int = 4
    needle_share: float = 0.1
    block_size: int = 16
    min_blocks: int = 16
    local_blocks: int = 1
    prefill_chunk: int = 1024
    chat: bool = True
    haystack: str = "essays"
    words: str = "essays"
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in NEEDLE_TASKS]
        if bad:
            raise ValueError(f"selection analyses needle tasks only ({', '.join(NEEDLE_TASKS)}), got {bad}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")

    def retrieval(self) -> RetrievalSettings:
        return RetrievalSettings(length=self.length, tasks=self.tasks, samples=self.samples, batch=1,
                                 haystack=self.haystack, words=self.words, chat=self.chat,
                                 block_size=self.block_size, min_blocks=self.min_blocks, seed=self.seed)


def settings_dict(s: SelectionSettings) -> dict:
    d = asdict(s)
    d["tasks"] = list(s.tasks)
    return d


def needle_positions(tokenizer, ids: list[int], values: list[str]) -> list[int]:
    """Prompt positions of the tokens that spell any of `values` (as whole words)."""
    pieces = [tokenizer.decode([t]) for t in ids]
    ends, total = [], 0
    for p in pieces:
        total += len(p)
        ends.append(total)
    text = "".join(pieces)
    out: set[int] = set()
    for v in values:
        for m in re.finditer(r"(?<!\w)" + re.escape(v) + r"(?!\w)", text):
            first = next(i for i, e in enumerate(ends) if e > m.start())
            last = next(i for i, e in enumerate(ends) if e >= m.end())
            out.update(range(first, last + 1))
    return sorted(out)


def keep_top(scores: torch.Tensor, n: int, local_blocks: int) -> torch.Tensor:
    """Boolean mask [HKV, NB] of the n blocks of top score per row, the last `local_blocks`
    always among them (the selection rule of `select_blocks_ref`)."""
    nb = scores.shape[-1]
    s = scores.clone()
    s[:, max(0, nb - local_blocks):] = float("inf")
    mask = torch.zeros_like(s, dtype=torch.bool)
    mask.scatter_(1, torch.topk(s, n, dim=-1).indices, True)
    return mask


def layer_recall(q: torch.Tensor, k: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, n_keys: int,
                 needle: list[int], s: SelectionSettings) -> dict:
    """One layer of one decode step (batch row 0). q [H, D]; k [HKV, >= n_keys, D];
    kmin, kmax [HKV, >= NB, D]. Returns per KV group: mass kept by each variant, the largest head
    share on the needle, and the needle attention kept by each variant."""
    H, D = q.shape
    HKV = k.shape[0]
    G, bs = H // HKV, s.block_size
    nb = -(-n_keys // bs)
    keys = k[:, :n_keys].float().repeat_interleave(G, dim=0)                      # [H, N, D]
    p = torch.softmax((keys @ q.float()[:, :, None])[..., 0] * D ** -0.5, dim=-1)  # [H, N]
    group_mass = _block_sums(p, nb, bs).view(HKV, G, nb).mean(1)                  # [HKV, NB]
    n = block_budget(nb, s.ratio, s.min_blocks)

    def selected(pool: str) -> torch.Tensor:
        """The engine's reference selection with this pool, as a mask [HKV, NB]."""
        table, _ = select_blocks_ref(q[None], kmin[None, :, :nb], kmax[None, :, :nb], torch.tensor([n_keys]),
                                     block_size=bs, active_ratio=s.ratio, min_blocks=s.min_blocks,
                                     local_blocks=s.local_blocks, group_pool=pool)
        return torch.zeros(HKV, nb, dtype=torch.bool).scatter_(1, table[0, :, :n].long(), True)

    masks = {"spec": selected("mean"), "head-max": selected("max"),
             "oracle": keep_top(group_mass, n, s.local_blocks)}
    on_needle = torch.zeros(n_keys, dtype=torch.bool)
    on_needle[needle] = True
    needle_p = (p * on_needle).view(HKV, G, n_keys)                                # [HKV, G, N]
    needle_blocks = _block_sums(needle_p.sum(1), nb, bs)                          # [HKV, NB]
    needle_total = needle_blocks.sum(-1).clamp_min(1e-30)
    return {"kept": {v: (group_mass * m).sum(-1).tolist() for v, m in masks.items()},
            "needle_share": needle_p.sum(-1).amax(-1).tolist(),
            "needle_kept": {v: ((needle_blocks * m).sum(-1) / needle_total).tolist() for v, m in masks.items()}}


def _block_sums(x: torch.Tensor, nb: int, bs: int) -> torch.Tensor:
    """[R, N] per-token values -> [R, nb] sums over blocks of bs tokens (the last may be partial)."""
    return torch.nn.functional.pad(x, (0, nb * bs - x.shape[-1])).view(x.shape[0], nb, bs).sum(-1)


def analyse_sample(engine, sample: ruler.Sample, s: SelectionSettings) -> dict:
    """Prefill one sample, feed its dense answer for `s.steps` steps, and measure every layer."""
    needle = needle_positions(engine.tokenizer, sample.ids, sample.answers)
    if not needle:
        raise ValueError(f"{sample.task} sample {sample.index}: needle values not found in the prompt")
    runner = engine.open(1, len(sample.ids) + s.steps + 1, s.block_size)
    logits = runner.extend([sample.ids], s.prefill_chunk)
    cache = runner.cache
    stop = set(eos_ids(engine))
    steps, answer = [], []
    for _ in range(s.steps):
        token = int(logits.argmax(-1)[0])
        if token in stop:
            break
        answer.append(token)
        queries: list[torch.Tensor] = []
        logits = runner.step(torch.tensor([token]), None, observe=lambda layer, q: queries.append(q))
        n_keys = runner.lengths[0]
        row = cache.row(0, n_keys)
        steps.append([layer_recall(q[0, :, 0], row.k[i], row.kmin[i], row.kmax[i], n_keys, needle, s)
                      for i, q in enumerate(queries)])
    return {"task": sample.task, "index": sample.index, "prompt_tokens": len(sample.ids),
            "needle_tokens": len(needle), "answer": engine.tokenizer.decode(answer), "steps": steps}


def run(engine, store, s: SelectionSettings, progress: bool = True) -> None:
    """One cell per sample ("single/3"), skipping recorded ones."""
    from tqdm import tqdm

    maker = sample_maker(engine.tokenizer, s.retrieval())
    bar = tqdm(total=len(s.tasks) * s.samples, desc=f"selection L={s.length}", unit="sample", disable=not progress)
    for task in s.tasks:
        for i in range(s.samples):
            key = f"{task}/{i}"
            if not store.done(key):
                t0 = time.perf_counter()
                store.put(key, analyse_sample(engine, maker.sample(task, i, ruler.MAX_NEW[task]), s),
                          time.perf_counter() - t0)
            bar.update(1)
    bar.close()


def summarize(cells: dict, settings: dict) -> dict:
    """Per variant, with 95% cluster-bootstrap intervals over samples: the attention mass kept
    (all layers and groups), the needle attention kept in retrieval groups, and the share of
    retrieval groups that keep at least 90% of their needle attention."""
    kept: dict[str, list[list[float]]] = {v: [] for v in VARIANTS}
    needle: dict[str, list[list[float]]] = {v: [] for v in VARIANTS}
    whole: dict[str, list[list[float]]] = {v: [] for v in VARIANTS}
    groups = 0
    for cell in cells.values():
        per_k = {v: [] for v in VARIANTS}
        per_n = {v: [] for v in VARIANTS}
        for step in cell["steps"]:
            for layer in step:
                for v in VARIANTS:
                    per_k[v] += layer["kept"][v]
                for g, share in enumerate(layer["needle_share"]):
                    if share >= settings["needle_share"]:
                        for v in VARIANTS:
                            per_n[v].append(layer["needle_kept"][v][g])
        groups += len(per_n["spec"])
        for v in VARIANTS:
            kept[v].append(per_k[v])
            if per_n[v]:
                needle[v].append(per_n[v])
                whole[v].append([float(x >= 0.9) for x in per_n[v]])
    return {"samples": len(cells), "retrieval_groups": groups,
            "variants": {v: {"mass_kept": cluster_bootstrap(kept[v]), "needle_kept": cluster_bootstrap(needle[v]),
                             "needle_kept_90": cluster_bootstrap(whole[v])} for v in VARIANTS}}
