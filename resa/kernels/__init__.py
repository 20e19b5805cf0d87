"""Triton kernels of a ReSA decode step, each behind one validating wrapper.

- `select_blocks`: the GBSA plan (scores, budget, local blocks, top-n) -> fixed-shape block table.
- `sparse_decode`: split-K flash-decoding over the selected blocks, all G heads of a group per tile.
- `update_summaries` / `refresh_summaries`: block min/max maintenance on append and rectification.
- `chunk_attention`: split-K causal attention of a short chunk of queries per row over the whole
  cache (the rectification pass; capturable in a CUDA graph).
Importing this package touches no GPU.
"""

from .chunk_attention import chunk_attention
from .selection import SelectionWorkspace, select_blocks
from .sparse_decode import DecodeConfig, sparse_decode
from .summaries import refresh_summaries, update_summaries

__all__ = [
    "chunk_attention",
    "DecodeConfig",
    "SelectionWorkspace",
    "refresh_summaries",
    "select_blocks",
    "sparse_decode",
    "update_summaries",
]
