"""GSM8K: greedy chain-of-thought answers of an instruct model, dense vs ReSA, exact match.

The prompt is a few-shot chat: `shots` worked examples (the first GSM8K test items, which are then
excluded from scoring) as user/assistant turns, their reasoning written out and ending in "The
answer is N.", then the question. The examples make the context about 1K tokens: without them a
GSM8K prompt is under min_blocks * block_size = 256 tokens, where sparse attention selects every
block and ReSA is dense by construction.

The few-shot prefix is the same for every item, so it is prefilled once; each item's question is
then appended densely to a copy of it, and a batch of items is decoded together from the stacked
rows, once per condition. Rows keep their own lengths (a ragged batch: no padding tokens enter the
prompt). Items are batched in order of question length. Score: the final number of the answer
equals the reference (exact).
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass

import torch

from ..config import ResaConfig
from .data import builtin_gsm8k, gsm8k_items
from .decode import answer_conditions, eos_ids, greedy_from
from .stats import bootstrap_mean, wilson

# A number not glued to a preceding digit, "." or ":" (so "5:00" yields 5, not 00).
_NUMBER = r"(?<![\d.:])-?\d[\d,]*(?:\.\d+)?"


@dataclass(frozen=True)
class GSM8KSettings:
    """items: scored test items (after the `shots` examples); batch: items decoded together."""

    items: int = 64
    shots: int = 8
    batch: int = 16
    max_new: int = 256
    ratios: tuple[float, ...] = (0.1,)
    source: str = "test"
    block_size: int = 16
    min_blocks: int = 16
    local_blocks: int = 1
    rectify_every: int = 32
    prefill_chunk: int = 1024

    def conditions(self) -> list[tuple[str, ResaConfig]]:
        return answer_conditions(self)


def settings_dict(s: GSM8KSettings) -> dict:
    d = asdict(s)
    d["ratios"] = list(s.ratios)
    return d


def reference(answer: str) -> str:
    """The reference number after '####', without thousands separators."""
    return answer.split("####")[-1].strip().replace(",", "")


def worked(answer: str) -> str:
    """A GSM8K solution as the model should write it: calculator marks <<...>> removed and the
    '#### N' line replaced by 'The answer is N.'"""
    body, _, final = answer.partition("####")
    body = re.sub(r"<<[^>]*>>", "", body).strip()
    return f"{body}\nThe answer is {final.strip()}."


def extract(text: str) -> str | None:
    """The model's final number: the last "answer is N" or \\boxed{N}, else the last number in the
    text. Text after a new "Question:" (the model inventing the next example) is ignored."""
    text = text.split("Question:")[0]
    final = r"(?:answer is[^\d\-]{0,20}|\\boxed\{[^\d\-}]{0,8})(" + _NUMBER + ")"
    hits = re.findall(final, text, flags=re.IGNORECASE) or re.findall(_NUMBER, text)
    if not hits:
        return None
    return hits[-1].replace(",", "").rstrip(".")


def same_number(pred: str | None, ref: str) -> bool:
    if pred is None:
        return False
    try:
        return abs(float(pred) - float(ref)) < 1e-6
    except ValueError:
        return False


def load_items(s: GSM8KSettings) -> tuple[list[dict], list[dict]]:
    """(few-shot examples, scored items)."""
    items = builtin_gsm8k() if s.source == "builtin" else gsm8k_items(s.shots + s.items)
    if len(items) < s.shots + 1:
        raise ValueError(f"need more than {s.shots} GSM8K items, found {len(items)}")
    return items[:s.shots], items[s.shots:s.shots + s.items]


def prompt_ids(tokenizer, shots: list[dict], questions: list[str]) -> tuple[list[int], list[list[int]]]:
    """(shared prefix ids, per-question suffix ids): the chat rendering of the examples and the
    question, split where the last user turn's content begins so the prefix is the same for all."""
    turns = []
    for ex in shots:
        turns += [{"role": "user", "content": f"Question: {ex['question']}"},
                  {"role": "assistant", "content": worked(ex["answer"])}]
    marker = "\x00QUESTION\x00"
    full = tokenizer.apply_chat_template(turns + [{"role": "user", "content": marker}])
    head, _, tail = full.partition(marker)
    prefix = tokenizer.encode(head)
    suffixes = [tokenizer.encode(f"Question: {q}{tail}", add_bos=False) for q in questions]
    return prefix, suffixes


def run(engine, store, s: GSM8KSettings, progress: bool = True) -> None:
    """Fill `store` with one cell per batch of items (all conditions), skipping recorded ones."""
    from tqdm import tqdm

    shots, items = load_items(s)
    prefix, suffixes = prompt_ids(engine.tokenizer, shots, [it["question"] for it in items])
    store.data["timings"]["prefix_tokens"] = len(prefix)
    eos = eos_ids(engine)
    conds = s.conditions()
    batches = equal_length_batches([len(x) for x in suffixes], s.batch)
    bar = tqdm(total=len(items), desc="gsm8k", unit="item", disable=not progress)
    base = None
    for bi, idx in enumerate(batches):
        key = f"b{bi}"
        if store.done(key):
            bar.update(len(idx))
            continue
        t0 = time.perf_counter()
        capacity = len(prefix) + max(len(suffixes[i]) for i in idx) + s.max_new
        if base is None:
            longest = len(prefix) + max(len(x) for x in suffixes) + s.max_new
            base = engine.open(1, longest, s.block_size)
            base.extend([prefix], s.prefill_chunk)
        rows, first = [], []
        for i in idx:
            row = base.fork()
            first.append(row.extend([suffixes[i]], s.prefill_chunk))
            rows.append(row)
        cache = engine.open(len(rows), capacity, s.block_size)
        cache.load_rows(rows)
        del rows
        logits = torch.cat(first)
        outputs, seconds = {}, {}
        for ci, (name, cfg) in enumerate(conds):
            t1 = time.perf_counter()
            work = cache if ci == len(conds) - 1 else cache.fork()
            ids = greedy_from(engine, work, logits, cfg, s.max_new, eos)
            res = []
            for i, o in zip(idx, ids):
                text = engine.tokenizer.decode(o)
                pred = extract(text)
                res.append({"text": text, "pred": pred, "correct": int(same_number(pred, reference(items[i]["answer"]))),
                            "tokens": len(o)})
            outputs[name] = res
            seconds[name] = round(time.perf_counter() - t1, 2)
            del work
        rows_meta = [{"item": s.shots + i, "ref": reference(items[i]["answer"]),
                      "prompt_tokens": len(prefix) + len(suffixes[i])} for i in idx]
        store.put(key, {"rows": rows_meta, "outputs": outputs, "decode_seconds": seconds},
                  time.perf_counter() - t0)
        bar.update(len(idx))
    bar.close()


def equal_length_batches(lengths: list[int], batch: int) -> list[list[int]]:
    """Indices in batches of up to `batch`, in order of length (ties by index), so the rows of a
    batch end close together."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i:i + batch] for i in range(0, len(order), batch)]


def summarize(cells: dict, settings: dict) -> dict:
    """Accuracy per condition (Wilson 95%) and the paired difference to dense (bootstrap 95%),
    with the counts of items only one side got right."""
    per: dict[str, list[int]] = {}
    tokens: dict[str, list[int]] = {}
    prompt = []
    for key in sorted(cells, key=lambda k: int(k[1:])):
        cell = cells[key]
        prompt += [r["prompt_tokens"] for r in cell["rows"]]
        for cond, outs in cell["outputs"].items():
            per.setdefault(cond, []).extend(o["correct"] for o in outs)
            tokens.setdefault(cond, []).extend(o["tokens"] for o in outs)
    dense = per.get("dense", [])
    out = {"conditions": {}, "prompt_tokens_mean": round(sum(prompt) / len(prompt), 1) if prompt else 0}
    for cond, v in per.items():
        diffs = [a - b for a, b in zip(v, dense)]
        out["conditions"][cond] = {"n": len(v), "acc": wilson(sum(v), len(v)), "diff": bootstrap_mean(diffs),
                                   "only_method": sum(d > 0 for d in diffs), "only_dense": sum(d < 0 for d in diffs),
                                   "mean_tokens": round(sum(tokens[cond]) / len(tokens[cond]), 1)}
    return out
