"""KV cache storage (K/V, per-block key min/max summaries, device-side row lengths) and the
descriptor of where one forward pass writes (`Span`).

The cache only stores; how K/V and summaries are written (torch reference or Triton kernels) is
chosen in `resa.attention`, and the host copy of the row lengths belongs to `resa.runner.Runner`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


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
    def on_device(cls, start_t: torch.Tensor, width: int) -> "Span":
        """A full span of `width` columns per row from device-side starts only (graph-capturable)."""
        return cls(start_t, torch.full_like(start_t, width), width, True)

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


class KVCache:
    """Preallocated K/V for every layer plus block summaries.

    k, v: [L, B, HKV, Nmax, D]; kmin, kmax: [L, B, HKV, NBmax, D] with NBmax = ceil(Nmax / BS),
    the element-wise min/max of the post-RoPE keys of each block of BS tokens (the last block of a
    row may be partial: its summary covers only the written tokens). lengths: [B] int64 tokens per
    row, on the device. Buffers are allocated uninitialised: no slot at or past a row's length is
    ever read (the test suite fills fresh buffers with NaN to prove it).
    """

    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        capacity: int,
        head_dim: int,
        block_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if capacity < 1 or batch < 1:
            raise ValueError(f"cache needs capacity >= 1 and batch >= 1, got {capacity}, {batch}")
        self.block_size = block_size
        self.capacity = capacity
        self.num_blocks = -(-capacity // block_size)
        kv_shape = (num_layers, batch, num_kv_heads, capacity, head_dim)
        sum_shape = (num_layers, batch, num_kv_heads, self.num_blocks, head_dim)
        self.k = torch.empty(kv_shape, dtype=dtype, device=device)
        self.v = torch.empty(kv_shape, dtype=dtype, device=device)
        self.kmin = torch.empty(sum_shape, dtype=dtype, device=device)
        self.kmax = torch.empty(sum_shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.int64, device=device)
        self._plans: dict[tuple[int, bool], PlanBuffers] = {}

    @staticmethod
    def bytes_needed(num_layers: int, batch: int, num_kv_heads: int, capacity: int, head_dim: int,
                     block_size: int, element_size: int) -> int:
        """Bytes a cache of these sizes allocates: K and V, plus kmin and kmax per block."""
        per_slot = 2 * num_layers * batch * num_kv_heads * head_dim * element_size
        return per_slot * (capacity + -(-capacity // block_size))

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[2]

    @property
    def device(self) -> torch.device:
        return self.k.device

    def bytes(self) -> int:
        """Bytes held by K, V and the summaries."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.kmin, self.kmax))

    def plan_buffers(self, num_slots: int, kernels: bool) -> PlanBuffers:
        """The selection buffers for tables of `num_slots` columns, allocated on first use."""
        key = (num_slots, kernels)
        if key not in self._plans:
            B, HKV, dev = self.batch, self.num_kv_heads, self.device
            workspace = None
            if kernels:
                from .kernels import SelectionWorkspace

                workspace = SelectionWorkspace.allocate(B, HKV, self.num_blocks, dev)
            self._plans[key] = PlanBuffers(torch.empty(B, HKV, num_slots, dtype=torch.int32, device=dev),
                                           torch.empty(B, dtype=torch.int32, device=dev), workspace)
        return self._plans[key]

    def copy(self) -> "KVCache":
        """An independent copy (tensors and lengths; selection buffers are not shared)."""
        L, B, HKV, cap, D = self.k.shape
        out = KVCache(L, B, HKV, cap, D, self.block_size, self.k.dtype, self.device)
        for name in ("k", "v", "kmin", "kmax", "lengths"):
            getattr(out, name).copy_(getattr(self, name))
        return out
