"""Rectification policy: when generated tokens are re-encoded densely (DESIGN.md 1.3).

Generated tokens are numbered from 0 (the first token sampled from the prefill logits); token t is
fed to the model at step t, which yields the logits of token t + 1. With f = rectify_every:
- paper: before feeding token t (t > 0, t % f == 0), tokens t-f .. t-1 (the newest f cached
  tokens, written by sparse steps) are re-run through the whole model densely and their K/V
  overwritten; token t is then fed by a sparse step.
- fused: when t % f == f - 1, token t is fed by one dense pass over tokens t-f+1 .. t, which
  rewrites the f-1 sparse-made entries and gives the next logits; other tokens are fed sparsely.
Both rectify the same windows of f tokens; fused saves one forward (one read of all weights) per
window. Every engine (ours, the transformers loop) calls `feed_token`, so the schedule lives here only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .config import ResaConfig
from .ref.selection import block_budget


class Runner(Protocol):
    def step(self, tokens: torch.Tensor, resa: ResaConfig | None) -> torch.Tensor: ...

    def dense_window(self, tokens: torch.Tensor, overwrite: int) -> torch.Tensor: ...


@dataclass(frozen=True)
class FeedResult:
    """logits: [B, V] of the next token; rectified: a dense rectification pass ran (paper: before
    the step; fused: as the step); sparse: the token itself was fed by a sparse step."""

    logits: torch.Tensor
    rectified: bool
    sparse: bool


def window_was_sparse(resa: ResaConfig, max_length: int | None) -> bool:
    """Whether a decode step at `max_length` cached tokens (the longest row) kept fewer blocks than
    it had. If not, that step and every earlier one of the window attended densely, so their K/V
    is already exact and rectifying would only repeat work. None means unknown (assume sparse)."""
    if max_length is None:
        return True
    nb = -(-max_length // resa.block_size)
    return block_budget(nb, resa.active_ratio, resa.min_blocks) < nb


def feed_token(runner: Runner, history: torch.Tensor, t: int, resa: ResaConfig,
               max_length: int | None = None) -> FeedResult:
    """Feed generated token t (history[:, t]; history [B, >= t+1] holds tokens 0..t) following
    the rectification schedule of `resa`. max_length: tokens in the longest row's cache before
    feeding; when given, windows decoded entirely at full budget (short contexts) are not rectified."""
    f = resa.rectify_every
    sparse = None if resa.is_dense else resa
    rectified = False
    if not window_was_sparse(resa, None if max_length is None else max_length + 1):
        return FeedResult(runner.step(history[:, t], sparse), False, sparse is not None)
    if resa.rectifies and resa.rectify_variant == "paper" and t > 0 and t % f == 0:
        runner.dense_window(history[:, t - f:t], overwrite=f)
        rectified = True
    if resa.rectifies and resa.rectify_variant == "fused" and t % f == f - 1:
        logits = runner.dense_window(history[:, t - f + 1:t + 1], overwrite=f - 1)
        return FeedResult(logits, True, False)
    return FeedResult(runner.step(history[:, t], sparse), rectified, sparse is not None)
