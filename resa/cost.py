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


def step_reads(n: int, resa: ResaConfig | None) -> int:
    """K/V tokens a decode step over a row of n cached tokens reads (resa None: dense)."""
    return n if resa is None else sparse_step_reads(n, resa)
