"""Adaptive rectification interval (`rectify_every="auto"`, docs/method.md section 8).

The rectification pass already computes the dense model's logits at every position of its window;
with them it measures how often the tokens the sparse steps produced equal the dense argmax (the
agreement). `Cadence` moves f between `rectify_min` and `rectify_max` from that measurement:
doubled after a window whose agreement reached RAISE, halved after one below LOWER, kept
otherwise. Powers of two times the start keep the number of distinct window widths (and so of
captured graphs) small.

The windows follow `resa.rectify.schedule`'s rules (same variants, no rectification of windows
decoded at full budget), counted from the end of the last window instead of from token 0, so a
changed f takes effect at once. f is one value for the batch: rows of the lockstep loop share
their windows, and the agreement is that of the batch's rows.
"""

from __future__ import annotations

import torch

from .config import ResaConfig
from .rectify import Feed, window_was_sparse

# Agreement thresholds (fraction of the window's sparse-made tokens equal to the dense argmax).
RAISE = 0.95
LOWER = 0.80


class Cadence:
    """The rectification schedule of one generation under rectify_auto."""

    def __init__(self, resa: ResaConfig) -> None:
        self.resa = resa
        self.f = min(max(resa.rectify_every, resa.rectify_min), resa.rectify_max)
        self.base = 0  # token index the current window's count starts from
        self.history: list[tuple[int, float]] = []  # (f used, agreement) of each window

    def feed(self, t: int, max_length: int) -> Feed:
        """How token t is fed (the rules of `resa.rectify.schedule`, counted from `base`)."""
        resa, f = self.resa, self.f
        if resa.is_dense or not window_was_sparse(resa, max_length + 1):
            return Feed()
        k = t - self.base
        if resa.rectify_variant == "paper" and k > 0 and k % f == 0:
            return Feed(rewrite_before=f, sparse=True)
        if resa.rectify_variant == "fused" and k % f == f - 1:
            return Feed(window=f)
        return Feed(sparse=True)

    def observe(self, t: int, feed: Feed, dense_logits: torch.Tensor, history: torch.Tensor, rows: int) -> None:
        """Fold the window of token t's feed in: dense_logits [B, W, V] of the window pass,
        history [B, >= t + 1] the generated tokens. Paper windows (tokens t-f .. t-1) check
        tokens t-f+1 .. t, fused windows (t-f+1 .. t) check t-f+2 .. t. Reads one number back
        to the host."""
        W = dense_logits.shape[1]
        if feed.rewrite_before:
            pred, made = dense_logits[:rows].argmax(-1), history[:rows, t - W + 1:t + 1]
            self.base = t
        else:
            pred, made = dense_logits[:rows, :-1].argmax(-1), history[:rows, t - W + 2:t + 1]
            self.base = t + 1
        agree = float((pred == made).float().mean()) if made.numel() else 1.0
        self.history.append((W, agree))
        if agree >= RAISE:
            self.f = min(self.f * 2, self.resa.rectify_max)
        elif agree < LOWER:
            self.f = max(self.f // 2, self.resa.rectify_min)
