"""A batch's view of the paged KV pool (`resa.pool.KVPool`) through block tables, with device-side
row lengths (`KVCache`), and the descriptor of where one forward pass writes (`Span`).

The cache stores and keeps the books of which blocks each row holds; how K/V and summaries are
written (torch reference or Triton kernels) is chosen in `resa.attention`, and the host copy of
the row lengths belongs to `resa.runner.Runner`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import torch

from .pool import KVPool
from .transfer import to_device


@dataclass(frozen=True)
class Span:
    """Where one forward pass writes in each row of the cache (the attention-batch descriptor).

    Row b gets `n_valid[b]` new tokens at positions start[b] .. start[b] + n_valid[b] - 1 (inputs
    are padded to `width` columns; columns >= n_valid[b] are ignored). After the pass row b holds
    exactly start[b] + n_valid[b] tokens: writes always end at the end of a row (append, or
    overwrite of the newest tokens during rectification).

    start_t, n_valid_t: [B] int64 device tensors (what kernels read, no host sync). `start` and
    `n_valid` are their host mirrors, present on eager passes and None on passes a CUDA graph
    captures (device-only spans, built by `Span.on_device`). `full`: every row writes all
    `width` columns (decode steps and rectification windows). end_t = start_t + n_valid_t is
    computed once per pass, like everything `derived` holds (e.g. the dense decode plan that every
    layer shares), so a captured graph does not repeat those kernels in every layer.
    """

    start_t: torch.Tensor
    n_valid_t: torch.Tensor
    width: int
    full: bool
    start: tuple[int, ...] | None = None
    n_valid: tuple[int, ...] | None = None
    end_t: torch.Tensor = field(init=False, repr=False, compare=False)
    derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "end_t", self.start_t + self.n_valid_t)

    def once(self, key: str, make: Callable[[], object]):
        """`make()` computed on the first call per key for this pass, then reused."""
        if key not in self.derived:
            self.derived[key] = make()
        return self.derived[key]

    @classmethod
    def make(cls, start, n_valid, width: int, device: torch.device | str) -> "Span":
        """A span with host mirrors (eager passes)."""
        start, n_valid = tuple(int(s) for s in start), tuple(int(n) for n in n_valid)
        if len(start) != len(n_valid):
            raise ValueError("start and n_valid need one entry per row")
        if any(n < 0 or n > width for n in n_valid) or any(s < 0 for s in start):
            raise ValueError(f"invalid span: start={start}, n_valid={n_valid}, width={width}")
        return cls(
            torch.tensor(start, dtype=torch.int64, device=device),
            torch.tensor(n_valid, dtype=torch.int64, device=device),
            width, all(n == width for n in n_valid), start, n_valid,
        )

    @classmethod
    def on_device(cls, start_t: torch.Tensor, width: int, n_valid_t: torch.Tensor | None = None) -> "Span":
        """A span from device-side starts only (graph-capturable): full (`width` columns per row),
        or ragged with device-side n_valid_t (rows of a continuous batch that sit a pass out get 0;
        their writes go to the cache's sink block, see `KVCache.sink`)."""
        if n_valid_t is None:
            return cls(start_t, torch.full_like(start_t, width), width, True)
        return cls(start_t, n_valid_t, width, False)

    @property
    def on_host(self) -> bool:
        return self.start is not None

    @property
    def end(self) -> tuple[int, ...]:
        """Row lengths after the pass (host; eager spans only)."""
        if self.start is None:
            raise ValueError("a device-only span has no host row lengths")
        return tuple(s + n for s, n in zip(self.start, self.n_valid))


@dataclass(frozen=True)
class PlanBuffers:
    """Preallocated outputs and scratch of the block selection of one decode step, reused by every
    layer (each layer's plan is consumed before the next layer plans) and captured by CUDA graphs.

    block_table: [B, HKV, S] int32; num_selected: [B] int32; workspace: the Triton selection's
    scratch (None on the torch backend).
    """

    block_table: torch.Tensor
    num_selected: torch.Tensor
    workspace: object | None


class RowView(NamedTuple):
    """One row of a cache in logical order (copies): see `KVCache.row`."""

    k: torch.Tensor
    v: torch.Tensor
    kmin: torch.Tensor
    kmax: torch.Tensor


class KVCache:
    """The cache of a batch of rows: a view of a `KVPool` through per-row block tables.

    pages: [B, max_blocks] int32 on the device: logical block j of row b (tokens j*BS .. j*BS+BS-1)
    is physical block pages[b, j]; entries past a row's held blocks are 0 and never read. `blocks`
    is the host copy of the table (the blocks each row holds). lengths: [B] int64 tokens per row
    on the device (the host copy belongs to `resa.runner.Runner`). capacity: the most tokens a
    row may hold.

    Blocks come from the pool as rows grow (`reserve`) and go back when rows shrink or are
    released. Rows may share blocks (a cached prompt prefix, a fork): before a pass writes a
    shared block, the row gets a private copy (copy-on-write), so a shared block is never written.
    """

    def __init__(self, pool: KVPool, batch: int, capacity: int) -> None:
        if capacity < 1 or batch < 1:
            raise ValueError(f"cache needs capacity >= 1 and batch >= 1, got {capacity}, {batch}")
        self.pool = pool
        self.block_size = pool.block_size
        self.capacity = capacity
        self.max_blocks = -(-capacity // pool.block_size)
        self.blocks: list[list[int]] = [[] for _ in range(batch)]
        self.pages = torch.zeros(batch, self.max_blocks, dtype=torch.int32, device=pool.device)
        self.lengths = torch.zeros(batch, dtype=torch.int64, device=pool.device)
        self._plans: dict[tuple[int, bool], PlanBuffers] = {}
        self.sink: int | None = None  # see `ensure_sink`
        self._is_view = False  # see `rows_view`

    @classmethod
    def create(cls, num_layers: int, batch: int, num_kv_heads: int, capacity: int, head_dim: int, block_size: int,
               dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "KVCache":
        """A cache over its own pool, sized for `batch` full rows (the pool grows if rows share
        blocks that are later copied)."""
        blocks = batch * -(-capacity // block_size)
        return cls(KVPool(num_layers, blocks, num_kv_heads, block_size, head_dim, dtype, device), batch, capacity)

    # The pool's tensors, read at call time (a pool that grew has new ones).
    @property
    def k(self) -> torch.Tensor:
        return self.pool.k

    @property
    def v(self) -> torch.Tensor:
        return self.pool.v

    @property
    def kmin(self) -> torch.Tensor:
        return self.pool.kmin

    @property
    def kmax(self) -> torch.Tensor:
        return self.pool.kmax

    @property
    def num_layers(self) -> int:
        return self.pool.num_layers

    @property
    def batch(self) -> int:
        return len(self.blocks)

    @property
    def num_kv_heads(self) -> int:
        return self.pool.num_kv_heads

    @property
    def device(self) -> torch.device:
        return self.pool.device

    # ---- blocks ----

    def blocks_for(self, length: int) -> int:
        return -(-length // self.block_size)

    def reserve(self, start: Sequence[int], end: Sequence[int]) -> None:
        """Make every row able to take a pass that writes positions [start[b], end[b]): the blocks
        those positions touch become private to the row (copied if shared), and new blocks are
        allocated up to ceil(end[b] / BS). Rows with end[b] <= start[b] are left as they are."""
        if max(end) > self.capacity:
            raise ValueError(f"a row would need {max(end)} cache slots but the cache holds {self.capacity} "
                             "per row; allocate a larger cache (or generate fewer tokens)")
        alloc = self.pool.allocator
        updates: dict[tuple[int, int], int] = {}
        for b, (s, e) in enumerate(zip(start, end)):
            if e <= s:
                continue
            held = self.blocks[b]
            for j in range(s // self.block_size, min(self.blocks_for(e), len(held))):
                if alloc.is_shared(held[j]):
                    updates[b, j] = self._make_private(b, j)
            grow = self.blocks_for(e) - len(held)
            if grow > 0:
                fresh = self.pool.allocate(grow)
                for j, blk in enumerate(fresh, start=len(held)):
                    updates[b, j] = blk
                held.extend(fresh)
        self._write_pages(updates)

    def _make_private(self, b: int, j: int) -> int:
        """Row b's block j, made safe to write: withdrawn from the prefix cache if the row is its
        only holder, else replaced by a copy. Returns the block the row now holds."""
        alloc, blk = self.pool.allocator, self.blocks[b][j]
        if alloc.refs[blk] == 1:
            alloc.forget(blk)
            return blk
        new = self.pool.allocate(1)[0]
        self.pool.copy_blocks([blk], [new])
        alloc.release([blk])
        self.blocks[b][j] = new
        return new

    def attach(self, row: int, blocks: Sequence[int]) -> None:
        """Give row `blocks` (already referenced for it, e.g. by a prefix-cache lookup) after the
        blocks it holds, which must all be full."""
        held = self.blocks[row]
        if len(held) + len(blocks) > self.max_blocks:
            raise ValueError(f"{len(held) + len(blocks)} blocks exceed the row's {self.max_blocks}")
        self._write_pages({(row, j): blk for j, blk in enumerate(blocks, start=len(held))})
        held.extend(blocks)

    def shrink(self, row: int, length: int) -> None:
        """Keep only the blocks row `row` needs for `length` tokens; the block holding a partial
        last one becomes private (its summary will be rewritten)."""
        keep = self.blocks_for(length)
        held = self.blocks[row]
        self.pool.allocator.release(held[keep:])
        del held[keep:]
        if length % self.block_size and self.pool.allocator.is_shared(held[-1]):
            self._write_pages({(row, keep - 1): self._make_private(row, keep - 1)})

    def release(self, rows: Sequence[int] | None = None) -> None:
        """Return every block of `rows` (default all) to the pool."""
        for b in range(self.batch) if rows is None else rows:
            self.pool.allocator.release(self.blocks[b])
            self.blocks[b] = []

    def copy(self) -> "KVCache":
        """A cache over the same pool whose rows share this one's blocks (copied on first write)."""
        out = KVCache(self.pool, self.batch, self.capacity)
        for b, held in enumerate(self.blocks):
            self.pool.allocator.share(held)
            out.blocks[b] = list(held)
        out.pages.copy_(self.pages)
        out.lengths.copy_(self.lengths)
        return out

    def widen(self, capacity: int) -> None:
        """Let rows hold up to `capacity` tokens (a wider block table; held blocks stay)."""
        if capacity <= self.capacity:
            return
        self.capacity = capacity
        self.max_blocks = self.blocks_for(capacity)
        pages = torch.zeros(self.batch, self.max_blocks, dtype=torch.int32, device=self.device)
        pages[:, :self.pages.shape[1]] = self.pages
        self.pages = pages
        self._plans.clear()

    def rows_view(self, rows: Sequence[int]) -> "KVCache":
        """A cache of just `rows` (in that order) over the same pool and blocks, for an eager pass
        of a few rows of a large batch: the view's table and lengths are copies (copy its lengths
        back after the pass); its blocks stay this cache's (the view never allocates or releases
        any, so reserve on this cache first)."""
        view = KVCache.__new__(KVCache)
        idx = torch.tensor(list(rows), dtype=torch.int64, device=self.device)
        view.pool, view.block_size = self.pool, self.block_size
        view.capacity, view.max_blocks = self.capacity, self.max_blocks
        view.blocks = [self.blocks[b] for b in rows]
        view.pages, view.lengths = self.pages[idx], self.lengths[idx]
        view._plans, view.sink, view._is_view = {}, None, True
        return view

    def ensure_sink(self) -> int:
        """A block of the pool this cache holds for the writes of ragged device-only passes
        (`Span.on_device` with n_valid_t): columns past a row's n_valid, which a CUDA graph cannot
        skip, are written there and never read. Allocated on first use, returned with the cache."""
        if self.sink is None:
            self.sink = self.pool.allocate(1)[0]
        return self.sink

    def _write_pages(self, updates: dict[tuple[int, int], int]) -> None:
        if updates:
            # One asynchronous copy of (rows, columns, blocks): a pass queued before keeps the GPU busy.
            idx = to_device([[b for b, _ in updates], [j for _, j in updates], list(updates.values())],
                            torch.int64, self.device)
            self.pages[idx[0], idx[1]] = idx[2].to(self.pages.dtype)

    def __del__(self) -> None:
        if getattr(self, "_is_view", True):
            return  # a rows_view holds nothing of its own
        try:
            self.release()
            if self.sink is not None:
                self.pool.allocator.release([self.sink])
                self.sink = None
        except Exception:  # interpreter shutdown: the pool may already be gone
            pass

    def row(self, b: int, n: int | None = None) -> "RowView":
        """Copies of row b's first n tokens (default: all its blocks hold) in logical order, for
        inspection: k, v [L, HKV, n, D] and kmin, kmax [L, HKV, ceil(n / BS), D]."""
        held = self.blocks[b]
        n = len(held) * self.block_size if n is None else n
        nb = self.blocks_for(n)
        if nb > len(held):
            raise ValueError(f"row {b} holds {len(held)} blocks, fewer than {n} tokens need")
        ids = torch.tensor(held[:nb], dtype=torch.int64, device=self.device)
        L, HKV, D = self.num_layers, self.num_kv_heads, self.pool.head_dim

        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t[:, ids].permute(0, 2, 1, 3, 4).reshape(L, HKV, nb * self.block_size, D)[:, :, :n]

        return RowView(tokens(self.k), tokens(self.v), self.kmin[:, ids].transpose(1, 2), self.kmax[:, ids].transpose(1, 2))

    # ---- selection buffers ----

    def plan_buffers(self, num_slots: int, kernels: bool) -> PlanBuffers:
        """The selection buffers for tables of `num_slots` columns, allocated on first use."""
        key = (num_slots, kernels)
        if key not in self._plans:
            B, HKV, dev = self.batch, self.num_kv_heads, self.device
            workspace = None
            if kernels:
                from .kernels import SelectionWorkspace

                workspace = SelectionWorkspace.allocate(B, HKV, self.max_blocks, dev)
            self._plans[key] = PlanBuffers(torch.empty(B, HKV, num_slots, dtype=torch.int32, device=dev),
                                           torch.empty(B, dtype=torch.int32, device=dev), workspace)
        return self._plans[key]
