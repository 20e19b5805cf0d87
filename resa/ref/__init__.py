"""Pure-PyTorch fp32 references: the executable spec of ReSA. They run on CPU and every kernel
and fast path is tested against them."""

from .attention import dense_attention_ref, sparse_decode_ref
from .selection import block_budget, block_scores_ref, group_query, ratio_ppm, score_blocks_ref, select_blocks_ref
from .summaries import block_summaries_ref

__all__ = [
    "block_budget",
    "block_scores_ref",
    "block_summaries_ref",
    "dense_attention_ref",
    "group_query",
    "ratio_ppm",
    "score_blocks_ref",
    "select_blocks_ref",
    "sparse_decode_ref",
]
