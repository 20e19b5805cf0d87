"""The cost model of a decode step (docs/method.md section 4): K/V tokens read, counting the
block summaries of a row (min + max of K per block) as one token of K+V per block."""

from __future__ import annotations

from .config import ResaConfig
from .ref.selection import block_budget


def sparse_step_reads(n: int, resa: ResaConfig) -> int:
    """K/V tokens a block-sparse decode step over a row of n cached tokens (the current one
    included) reads: its selected blocks' tokens plus every block's summary (the scoring pass
    reads them all)."""
    nb = -(-n // resa.block_size)
    kept = block_budget(nb, resa.active_ratio, resa.min_blocks)
    return min(kept * resa.block_size, n) + nb


def dense_reads(n: int, k: int) -> int:
    """K/V tokens dense decoding of k more tokens reads from a row of n: (n + 1) + ... + (n + k)."""
    return k * n + k * (k + 1) // 2


def feed_reads(feed, before: int, after: int, resa: ResaConfig) -> int:
    """K/V tokens the passes feeding one token to a row read (`resa.rectify.Feed`), the row
    holding `before` tokens before and `after` after: dense passes read the whole row, a sparse
    step its selection, and a paper-variant rewrite first re-reads the whole row once."""
    if feed.window or not feed.sparse:
        return after
    return sparse_step_reads(after, resa) + (before if feed.rewrite_before else 0)
