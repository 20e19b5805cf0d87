"""The paged KV pool: K/V blocks of every layer, their key summaries, and the allocator that
hands blocks to rows (docs/architecture.md, "Paged KV pool")."""

from __future__ import annotations

import sys

import torch

from .blocks import BlockAllocator, CacheTooLargeError


def free_gpu_bytes(device: torch.device) -> int:
    """GPU memory a new allocation can take: free on the device plus what torch's allocator holds
    but no tensor uses."""
    return (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
            - torch.cuda.memory_allocated(device))


class KVPool:
    """The paged K/V storage of every layer: physical blocks of `block_size` tokens, their key
    summaries, and the allocator that hands them to rows (`resa.blocks.BlockAllocator`).

    k, v: [L, num_blocks, HKV, BS, D] (a block's BS tokens of one KV head are contiguous rows);
    kmin, kmax: [L, num_blocks, HKV, D], the element-wise min/max of the post-RoPE keys written in
    each block. A block id names the same block in every layer. Buffers are allocated
    uninitialised: no block a row does not hold, and no slot past a row's length, is ever read
    (the test suite fills fresh buffers with NaN to prove it).

    Size: `num_blocks` now, growing on demand up to `max_blocks` (None: no limit). Growing keeps
    block ids and content (copied; when no block is held the old storage is freed first and the
    prefix cache is dropped). `generation` counts reallocations, so holders of captured CUDA
    graphs know when to capture again. order: the initial free order of the block ids (tests
    shuffle it so that rows get non-contiguous blocks).
    """

    def __init__(self, num_layers: int, num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", *,
                 max_blocks: int | None = None, order: "list[int] | None" = None) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV pool needs at least one block of at least one token, got {num_blocks} x {block_size}")
        if max_blocks is not None and max_blocks < num_blocks:
            raise ValueError(f"max_blocks {max_blocks} is below the initial {num_blocks} blocks")
        self.num_layers, self.num_kv_heads, self.block_size, self.head_dim = num_layers, num_kv_heads, block_size, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.max_blocks = max_blocks
        self.generation = 0
        self.k, self.v, self.kmin, self.kmax = self._alloc(num_blocks)
        self.allocator = BlockAllocator(num_blocks, order)

    def _alloc(self, num_blocks: int) -> tuple[torch.Tensor, ...]:
        L, HKV, BS, D = self.num_layers, self.num_kv_heads, self.block_size, self.head_dim
        try:
            return (torch.empty(L, num_blocks, HKV, BS, D, dtype=self.dtype, device=self.device),
                    torch.empty(L, num_blocks, HKV, BS, D, dtype=self.dtype, device=self.device),
                    torch.empty(L, num_blocks, HKV, D, dtype=self.dtype, device=self.device),
                    torch.empty(L, num_blocks, HKV, D, dtype=self.dtype, device=self.device))
        except torch.OutOfMemoryError:
            size = num_blocks * self.bytes_per_block(L, HKV, BS, D, self.dtype.itemsize)
            free = f", {free_gpu_bytes(self.device) / 2**30:.2f} GiB free" if self.device.type == "cuda" else ""
            raise CacheTooLargeError(
                f"out of memory allocating a KV pool of {num_blocks} blocks ({size / 2**30:.2f} GiB{free}); use "
                "fewer or shorter sequences, or a smaller gpu_memory_utilization / kv_cache_gib so the pool is "
                "sized before other allocations") from None

    @staticmethod
    def bytes_per_block(num_layers: int, num_kv_heads: int, block_size: int, head_dim: int, element_size: int) -> int:
        """Bytes one block takes in every layer: K and V of its tokens plus kmin and kmax."""
        return 2 * num_layers * num_kv_heads * head_dim * element_size * (block_size + 1)

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def block_bytes(self) -> int:
        return self.bytes_per_block(self.num_layers, self.num_kv_heads, self.block_size, self.head_dim,
                                    self.k.element_size())

    def available(self) -> int:
        """Blocks `allocate` can still hand out: free now plus what growth may add."""
        if self.max_blocks is None:
            return sys.maxsize
        return self.allocator.num_free + self.max_blocks - self.num_blocks

    # ---- allocation ----

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks (one reference each), growing the pool if it has too few free."""
        self.ensure_free(n)
        return self.allocator.allocate(n)

    def ensure_free(self, n: int) -> None:
        """Grow the pool, if needed, so that n blocks are free (one growth for a whole batch
        instead of one per row)."""
        short = n - self.allocator.num_free
        if short > 0:
            limit = self.max_blocks if self.max_blocks is not None else sys.maxsize
            if self.num_blocks + short > limit:
                raise CacheTooLargeError(
                    f"the KV pool needs {short} more blocks of {self.block_size} tokens but is at its limit of "
                    f"{limit} blocks ({limit * self.block_bytes / 2**30:.2f} GiB); allow it more memory "
                    "(gpu_memory_utilization / kv_cache_gib) or run fewer or shorter sequences at once")
            self.grow(self._growth(limit, self.num_blocks + short))

    def _growth(self, limit: int, need: int) -> int:
        """The size to grow to: double (at least `need`, at most `limit`), or just `need` when the
        doubled pool and the old one it is copied from do not both fit the free GPU memory."""
        size = min(limit, max(need, 2 * self.num_blocks))
        if self.device.type != "cuda" or self.allocator.num_held == 0:
            return size
        free = free_gpu_bytes(self.device)
        if size * self.block_bytes > free:
            size = need
        if size * self.block_bytes > free:
            raise CacheTooLargeError(
                f"the KV pool ({self.num_blocks} blocks, in use) cannot grow to {size} blocks: the copy needs "
                f"{size * self.block_bytes / 2**30:.1f} GiB and {free / 2**30:.1f} GiB of GPU memory is free; run "
                "fewer or shorter sequences at once, or size the pool up front (kv_cache_gib)")
        return size

    def grow(self, num_blocks: int) -> None:
        """Enlarge the pool to `num_blocks`, keeping the held blocks' ids and content."""
        n = self.num_blocks
        if num_blocks <= n:
            return
        if self.allocator.num_held == 0:
            # Nothing to keep but cached prefixes: drop them and free the old storage first, so
            # the peak is the new size alone.
            self.allocator.clear_cache()
            self.k = self.v = self.kmin = self.kmax = None
            try:
                self.k, self.v, self.kmin, self.kmax = self._alloc(num_blocks)
            except CacheTooLargeError:
                self.k, self.v, self.kmin, self.kmax = self._alloc(n)  # back to the old size
                self.generation += 1
                raise
        else:
            new = self._alloc(num_blocks)
            for t, prev in zip(new, (self.k, self.v, self.kmin, self.kmax)):
                t[:, :n] = prev
            self.k, self.v, self.kmin, self.kmax = new
        self.allocator.grow(num_blocks)
        self.generation += 1

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy blocks src[i] -> dst[i] in every layer (K, V and summaries)."""
        s = torch.tensor(src, dtype=torch.int64, device=self.device)
        d = torch.tensor(dst, dtype=torch.int64, device=self.device)
        for t in (self.k, self.v, self.kmin, self.kmax):
            t[:, d] = t[:, s]
