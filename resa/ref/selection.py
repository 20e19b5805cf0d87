"""Reference group block selection (GBSA plan, docs/method.md 2.2-2.6)."""

from __future__ import annotations

import torch


RATIO_SCALE = 1_000_000


def ratio_ppm(active_ratio: float) -> int:
    """active_ratio as an integer number of parts per million (so budgets are exact integers:
    a float product such as 70 * 0.1 = 7.000000000000001 would otherwise round up a block)."""
    return int(round(active_ratio * RATIO_SCALE))


def block_budget(num_blocks, active_ratio: float, min_blocks: int):
    """Blocks kept for a row of `num_blocks` blocks (docs/method.md 2.4):
    max(ceil(NB * ratio), min(NB, min_blocks)), never more than NB, 0 for an empty row. The
    ceiling is taken in integer arithmetic on `ratio_ppm(active_ratio)`. num_blocks: an int, or an
    integer tensor of per-row counts (then a tensor; no host sync). The Triton top-n evaluates the
    same expression in-kernel; its tests compare its counts with this function."""
    ppm = ratio_ppm(active_ratio)
    if isinstance(num_blocks, torch.Tensor):
        nb = num_blocks.to(torch.int64)
        n = torch.maximum((nb * ppm + RATIO_SCALE - 1) // RATIO_SCALE, torch.clamp(nb, max=min_blocks))
        return torch.clamp(torch.minimum(n, nb), min=0)
    if num_blocks <= 0:
        return 0
    n = max(-(-num_blocks * ppm // RATIO_SCALE), min(num_blocks, min_blocks))
    return min(n, num_blocks)


def group_query(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Mean of the G query heads of each KV group.

    q: [B, H, D] (query head h belongs to KV head h // G). Returns [B, HKV, D] fp32.
    """
    B, H, D = q.shape
    return q.float().view(B, num_kv_heads, H // num_kv_heads, D).mean(dim=2)


def score_blocks_ref(qg: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Upper bound of q.k over each block: sum_d max(q_d * kmax_d, q_d * kmin_d), in fp32.

    qg: [B, HKV, D]; kmin, kmax: [B, HKV, NB, D]. Returns [B, HKV, NB] fp32.
    """
    q = qg.float()[:, :, None, :]
    return torch.maximum(q * kmax.float(), q * kmin.float()).sum(dim=-1)


def block_scores_ref(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, group_pool: str = "mean") -> torch.Tensor:
    """Score of every block for each KV group, fp32 [B, HKV, NB].

    group_pool "mean": the bound of the group's mean query (the paper's GBSA); "max": the bound of
    each of the G query heads separately, the largest over the group. q: [B, H, D]; kmin, kmax:
    [B, HKV, NB, D].
    """
    B, H, D = q.shape
    HKV, nb = kmin.shape[1], kmin.shape[2]
    if group_pool == "mean":
        return score_blocks_ref(group_query(q, HKV), kmin, kmax)
    if group_pool != "max":
        raise ValueError(f"group_pool must be 'mean' or 'max', got {group_pool!r}")
    G = H // HKV
    per_head = score_blocks_ref(q, kmin.repeat_interleave(G, dim=1), kmax.repeat_interleave(G, dim=1))
    return per_head.view(B, HKV, G, nb).amax(dim=2)


def select_blocks_ref(
    q: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    lengths: torch.Tensor,
    *,
    block_size: int,
    active_ratio: float,
    min_blocks: int,
    local_blocks: int = 1,
    num_slots: int | None = None,
    group_pool: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose, per (row, KV head), the blocks a decode query attends to.

    q: [B, H, D] post-RoPE queries of the current step; kmin, kmax: [B, HKV, NBmax, D] block
    summaries; lengths: [B] tokens in each row's cache (the current token included).
    Row b has NB_b = ceil(lengths[b] / block_size) valid blocks and keeps
    n_b = block_budget(NB_b, active_ratio, min_blocks) of them: its last `local_blocks` valid blocks
    always, the rest by top score (`block_scores_ref` with `group_pool`). Blocks >= NB_b are never
    chosen.
    Returns (block_table [B, HKV, S] int32, num_selected [B] int32): the chosen block indices of
    each row in ascending order, then -1 in unused slots. S = num_slots, or max_b n_b if None;
    S must be >= max_b n_b.
    """
    B, H, D = q.shape
    HKV, nbmax = kmin.shape[1], kmin.shape[2]
    lens = lengths.to(torch.int64).cpu().tolist()
    nbs = [-(-n // block_size) for n in lens]
    if max(nbs, default=0) > nbmax:
        raise ValueError(f"lengths need {max(nbs)} blocks but the summaries hold {nbmax}")
    budgets = [block_budget(nb, active_ratio, min_blocks) for nb in nbs]
    slots = max(budgets, default=0) if num_slots is None else num_slots
    if slots < max(budgets, default=0):
        raise ValueError(f"num_slots={slots} is smaller than the largest budget {max(budgets)}")
    scores = block_scores_ref(q, kmin, kmax, group_pool)
    idx = torch.arange(nbmax, device=q.device)
    table = torch.full((B, HKV, slots), -1, dtype=torch.int32, device=q.device)
    for b in range(B):
        nb, n = nbs[b], budgets[b]
        if n == 0:
            continue
        s = torch.where(idx < nb, scores[b], float("-inf"))
        s = torch.where((idx >= nb - local_blocks) & (idx < nb), float("inf"), s)
        top = torch.topk(s, n, dim=-1).indices
        table[b, :, :n] = torch.sort(top, dim=-1).values.to(torch.int32)
    num_selected = torch.tensor(budgets, dtype=torch.int32, device=q.device)
    return table, num_selected
