"""Greedy answer decoding from an already prefilled KV cache, for tasks that score short answers.

The prompt is prefilled densely in every mode (DESIGN.md 1.3), so a task prefills once and decodes
the answer once per condition from a copy of that cache: only the decode steps differ between
dense and ReSA. Decoding follows the engine's rectification schedule (`resa.rectify.feed_token`)
through the engine's `CacheRunner`, the runner `Engine.generate_ids` uses.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch

from ..cache import KVCache
from ..config import ResaConfig
from ..engine import CacheRunner
from ..rectify import feed_token


def answer_conditions(s) -> list[tuple[str, ResaConfig]]:
    """("dense", config) then ("resa/r<ratio>", config) for each of s.ratios, from the ReSA fields of
    a task's settings (block_size, min_blocks, local_blocks, rectify_every, prefill_chunk, and
    group_pool where the task has it)."""
    base = dict(block_size=s.block_size, min_blocks=s.min_blocks, local_blocks=s.local_blocks,
                rectify_every=s.rectify_every, prefill_chunk=s.prefill_chunk,
                group_pool=getattr(s, "group_pool", "mean"))
    return [("dense", ResaConfig(mode="dense", **base))] + \
        [(f"resa/r{r}", ResaConfig(mode="resa", active_ratio=r, **base)) for r in s.ratios]


def clone_cache(cache: KVCache) -> KVCache:
    """An independent copy of a cache (tensors and row lengths)."""
    return copy.deepcopy(cache)


def greedy_from_cache(engine, cache: KVCache, logits: torch.Tensor, resa: ResaConfig, max_new: int,
                      eos: Sequence[int]) -> list[list[int]]:
    """Greedy continuation of every row of a prefilled `cache` (modified in place).

    logits: [B, V], the prefill logits of each row's last prompt token (so token 0 is the same in
    every mode). Token t >= 1 comes from feeding token t-1 under `resa` (dense, sparse or ReSA with
    its rectification cadence). Rows stop at an id in `eos` (not included in the output); decoding
    ends when every row has stopped or `max_new` tokens were produced. Returns the ids per row.
    """
    B = cache.batch
    history = torch.empty(B, max_new, dtype=torch.int64, device=logits.device)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    stop = set(eos)
    runner = CacheRunner(engine, cache)
    for t in range(max_new):
        token = logits.argmax(-1)
        history[:, t] = token
        for b, tok in enumerate(token.tolist()):
            if done[b]:
                continue
            if tok in stop:
                done[b] = True
                continue
            out[b].append(tok)
        if all(done) or t == max_new - 1:
            break
        logits = feed_token(runner, history, t, resa, max_length=max(cache.host_lengths)).logits
    return out


def stack_rows(engine, rows: Sequence[KVCache], capacity: int) -> KVCache:
    """One cache of len(rows) rows from single-row caches (same block size), each row keeping its
    own length. Lets rows that share a prefilled prefix be extended separately and decoded together."""
    bs = rows[0].block_size
    out = engine.new_cache(len(rows), capacity, bs)
    for b, r in enumerate(rows):
        if r.batch != 1 or r.block_size != bs:
            raise ValueError("stack_rows takes single-row caches of one block size")
        n = r.host_lengths[0]
        if n > capacity:
            raise ValueError(f"row {b} holds {n} tokens, more than capacity {capacity}")
        nb = -(-n // bs)
        out.k[:, b, :, :n] = r.k[:, 0, :, :n]
        out.v[:, b, :, :n] = r.v[:, 0, :, :n]
        out.kmin[:, b, :, :nb] = r.kmin[:, 0, :, :nb]
        out.kmax[:, b, :, :nb] = r.kmax[:, 0, :, :nb]
    lengths = [r.host_lengths[0] for r in rows]
    out.host_lengths = lengths
    out.lengths.copy_(torch.tensor(lengths, dtype=torch.int64, device=out.lengths.device))
    return out


END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>")


def eos_ids(engine) -> tuple[int, ...]:
    """The ids that end an answer: the tokenizer's EOS ids plus the end-of-turn markers of common
    chat templates that the tokenizer knows as single special tokens (some GGUF files name only
    <|endoftext|> as EOS although the chat template ends each turn with <|im_end|>)."""
    tok = engine.tokenizer
    ids = set(tok.eos_token_ids) if tok is not None and tok.eos_token_ids else set(engine.model.cfg.eos_token_ids)
    if tok is not None and hasattr(tok, "apply_chat_template"):
        for marker in END_OF_TURN:
            enc = tok.encode(marker, add_bos=False)
            if len(enc) == 1 and tok.decode(enc) == "":
                ids.add(enc[0])
    return tuple(sorted(ids))
