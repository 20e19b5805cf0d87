"""Paged layouts for kernel and reference tests: a contiguous per-row tensor cut into blocks that
lie in a shuffled, non-contiguous order in a pool whose unused blocks are NaN (so a kernel that
ignores the block table, or reads a free block, gives a wrong result)."""

from __future__ import annotations

import torch


def page_table(lengths, block_size: int, max_blocks: int | None = None, *, seed: int = 0, spare: int = 3,
               device="cpu") -> tuple[torch.Tensor, int]:
    """A block table [B, max_blocks] int32 giving each row ceil(max(lengths) / BS) distinct
    physical blocks in shuffled order (rows' blocks interleave), plus `spare` never-used blocks.
    Entries past a row's blocks hold a valid but unrelated block id (never read). Returns
    (table, num_physical_blocks)."""
    B = len(lengths)
    nb = max(1, -(-max(max(lengths), 1) // block_size))
    width = nb if max_blocks is None else max_blocks
    if width < nb:
        raise ValueError("max_blocks is smaller than the longest row")
    total = B * nb + spare
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(total, generator=gen)[:B * nb].view(B, nb)
    table = torch.full((B, width), int(perm[0, 0]), dtype=torch.int32)
    table[:, :nb] = perm.to(torch.int32)
    return table.to(device), total


def to_pool(x: torch.Tensor, table: torch.Tensor, num_physical: int, block_size: int) -> torch.Tensor:
    """Contiguous x [B, HKV, N, D] -> pool [num_physical, HKV, BS, D]: token n of row b lands in
    block table[b, n // BS] at offset n % BS. Blocks no row uses (and slots past N) are NaN."""
    B, HKV, N, D = x.shape
    nb = -(-N // block_size)
    pool = torch.full((num_physical, HKV, block_size, D), float("nan"), dtype=x.dtype, device=x.device)
    padded = torch.nn.functional.pad(x, (0, 0, 0, nb * block_size - N), value=float("nan"))
    blocks = padded.view(B, HKV, nb, block_size, D).transpose(1, 2).reshape(B * nb, HKV, block_size, D)
    pool[table[:, :nb].to(x.device).long().reshape(-1)] = blocks
    return pool


def summaries_to_pool(s: torch.Tensor, table: torch.Tensor, num_physical: int) -> torch.Tensor:
    """Contiguous per-row block summaries s [B, HKV, NB, D] -> pool [num_physical, HKV, D]
    (logical block j of row b in physical block table[b, j]); unused blocks are NaN."""
    B, HKV, NB, D = s.shape
    pool = torch.full((num_physical, HKV, D), float("nan"), dtype=s.dtype, device=s.device)
    pool[table[:, :NB].to(s.device).long().reshape(-1)] = s.transpose(1, 2).reshape(B * NB, HKV, D)
    return pool


def from_pool(pool: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """The inverse of `to_pool` for `length` tokens: [B, HKV, length, D]."""
    nb = -(-length // pool.shape[2])
    blocks = pool[table[:, :nb].long()]                      # [B, nb, HKV, BS, D]
    B, _, HKV, BS, D = blocks.shape
    return blocks.permute(0, 2, 1, 3, 4).reshape(B, HKV, nb * BS, D)[:, :, :length]


def summaries_from_pool(pool: torch.Tensor, table: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """The inverse of `summaries_to_pool`: [B, HKV, num_blocks, D]."""
    return pool[table[:, :num_blocks].long()].transpose(1, 2)
