"""Greedy answer decoding from an already prefilled KV cache, for tasks that score short answers.

The prompt is prefilled densely in every mode (docs/method.md 3.1), so a task prefills once and
decodes the answer once per condition from a fork of that runner: only the decode steps differ
between dense and ReSA. Decoding is the engine's generation loop (`Engine.decode`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..config import ResaConfig


def answer_conditions(s) -> list[tuple[str, ResaConfig]]:
    """("dense", config) then ("resa/r<ratio>", config) for each of s.ratios, from the ReSA fields of
    a task's settings (block_size, min_blocks, local_blocks, rectify_every, prefill_chunk, and
    group_pool where the task has it)."""
    base = dict(block_size=s.block_size, min_blocks=s.min_blocks, local_blocks=s.local_blocks,
                rectify_every=s.rectify_every, prefill_chunk=s.prefill_chunk,
                group_pool=getattr(s, "group_pool", "mean"))
    return [("dense", ResaConfig(mode="dense", **base))] + \
        [(f"resa/r{r}", ResaConfig(mode="resa", active_ratio=r, **base)) for r in s.ratios]


def greedy_from(engine, runner, logits: torch.Tensor, resa: ResaConfig, max_new: int,
                eos: Sequence[int]) -> list[list[int]]:
    """Greedy continuation of every row of a prefilled runner (modified in place), through the
    engine's generation loop. logits: [B, V], the prefill logits of each row's last prompt token
    (so token 0 is the same in every mode). Rows stop at an id in `eos` (not included). Returns the
    ids per row."""
    return engine.decode(runner, logits, resa=resa, max_new_tokens=max_new, eos_token_ids=eos).token_ids


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
