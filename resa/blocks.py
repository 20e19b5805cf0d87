"""Host-side bookkeeping of the paged KV pool's physical blocks: free list, reference counts and
the prefix cache (docs/architecture.md, "Paged KV pool").

A block is either held (reference count >= 1: some row's block table lists it) or free. Free
blocks wait in least-recently-freed order; a free block that holds a full block of prompt tokens
keeps its content hash, so a later prompt with the same prefix takes it back instead of
recomputing it. Allocation takes the oldest free block and forgets its hash (eviction), so a
block in use is never evicted.

Content hashes chain: the hash of block i covers the previous block's hash and block i's tokens,
so equal hashes mean equal whole prefixes (the K/V of a block depends on every earlier token).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Iterable, Sequence

import numpy as np

from .errors import UsageError


class CacheTooLargeError(UsageError):
    """The KV blocks a request needs do not fit the memory the pool may use."""


def block_hashes(tokens: Sequence[int], block_size: int, salt: bytes = b"") -> list[bytes]:
    """Chained content hashes of the full blocks of `tokens` (a trailing partial block has none)."""
    out, prev = [], salt
    ids = np.asarray(tokens, dtype=np.int64)
    for i in range(len(ids) // block_size):
        prev = hashlib.blake2b(prev + ids[i * block_size:(i + 1) * block_size].tobytes(), digest_size=16).digest()
        out.append(prev)
    return out


def shareable_blocks(num_tokens: int, block_size: int) -> int:
    """How many leading full blocks of a prompt of `num_tokens` may come from the prefix cache:
    all but the block of its last token, which is always computed (its logits are needed)."""
    return (num_tokens - 1) // block_size


class BlockAllocator:
    """Physical block ids 0 .. num_blocks - 1: who holds them and which hold a cached prefix."""

    def __init__(self, num_blocks: int, order: Iterable[int] | None = None) -> None:
        self.num_blocks = 0
        self.refs: list[int] = []
        self.hash_of: list[bytes | None] = []
        self._free: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[bytes, int] = {}
        self.grow(num_blocks, order)

    # ---- size ----

    def grow(self, num_blocks: int, order: Iterable[int] | None = None) -> None:
        """Add blocks num_blocks_old .. num_blocks - 1 as free (in `order` if given)."""
        new = list(range(self.num_blocks, num_blocks)) if order is None else [int(i) for i in order]
        if sorted(new) != list(range(self.num_blocks, num_blocks)):
            raise ValueError("order must list each new block id once")
        self.refs.extend([0] * (num_blocks - self.num_blocks))
        self.hash_of.extend([None] * (num_blocks - self.num_blocks))
        for i in new:
            self._free[i] = None
        self.num_blocks = num_blocks

    @property
    def num_free(self) -> int:
        """Blocks that `allocate` can hand out (cached prefixes no row holds included)."""
        return len(self._free)

    @property
    def num_held(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks holding a cached prompt prefix (held or free)."""
        return len(self._cached)

    # ---- allocation ----

    def allocate(self, n: int) -> list[int]:
        """n blocks, each with one reference; the least recently freed go first, and a cached
        prefix among them is evicted."""
        if n > len(self._free):
            raise CacheTooLargeError(
                f"the KV pool has {len(self._free)} free blocks, {n} are needed; allow the pool more "
                "memory (gpu_memory_utilization / kv_cache_gib) or run fewer or shorter sequences at once")
        out = []
        for _ in range(n):
            block, _ = self._free.popitem(last=False)
            self._forget(block)
            self.refs[block] = 1
            out.append(block)
        return out

    def share(self, blocks: Iterable[int]) -> None:
        """One more reference to each of `blocks` (all held)."""
        for b in blocks:
            if self.refs[b] < 1:
                raise ValueError(f"block {b} is not held")
            self.refs[b] += 1

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; blocks left with none become free. Pass a row's blocks
        in order: the tail is freed first, so it is evicted before the prefix it extends."""
        for b in reversed(blocks):
            if self.refs[b] < 1:
                raise ValueError(f"block {b} released more often than it was held")
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self._free[b] = None

    def blocks_saved(self, prompts: Sequence[Sequence[bytes]]) -> int:
        """Blocks that prompts with these (usable) block hashes would not allocate: the cached
        ones, and repeats of a block another of these prompts computes."""
        seen: set[bytes] = set()
        saved = 0
        for hashes in prompts:
            for h in hashes:
                if h in seen or h in self._cached:
                    saved += 1
                seen.add(h)
        return saved

    def is_shared(self, block: int) -> bool:
        """True when writing `block` would change what someone else reads: another holder, or a
        cached prefix that later prompts may take."""
        return self.refs[block] > 1 or self.hash_of[block] is not None

    # ---- prefix cache ----

    def cached_prefix(self, hashes: Sequence[bytes]) -> int:
        """How many leading blocks of a prompt with these block hashes are cached (nothing taken)."""
        n = 0
        while n < len(hashes) and hashes[n] in self._cached:
            n += 1
        return n

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """Take (one reference each) the cached blocks of the longest cached prefix of `hashes`."""
        out = []
        for h in hashes:
            block = self._cached.get(h)
            if block is None:
                break
            if self.refs[block] == 0:
                del self._free[block]
            self.refs[block] += 1
            out.append(block)
        return out

    def register(self, blocks: Sequence[int], hashes: Sequence[bytes]) -> None:
        """Offer held, fully written prompt blocks to later prompts under their hashes (a hash that
        is already cached keeps its block)."""
        for block, h in zip(blocks, hashes):
            if self.refs[block] < 1:
                raise ValueError(f"block {block} is not held")
            if h not in self._cached and self.hash_of[block] is None:
                self._cached[h] = block
                self.hash_of[block] = h

    def forget(self, block: int) -> None:
        """Withdraw a held block from the prefix cache (its owner is about to rewrite it)."""
        self._forget(block)

    def clear_cache(self) -> None:
        """Forget every cached prefix (blocks stay as they are held or free)."""
        for b in list(self._cached.values()):
            self.hash_of[b] = None
        self._cached.clear()

    def _forget(self, block: int) -> None:
        h = self.hash_of[block]
        if h is not None:
            del self._cached[h]
            self.hash_of[block] = None
