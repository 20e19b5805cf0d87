"""Static KV cache with per-row lengths and per-block key min/max summaries."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Span:
    """Where one forward pass writes in each row of the cache.

    Row b gets `n_valid[b]` new tokens at positions start[b] .. start[b] + n_valid[b] - 1 (inputs
    are padded to T columns; columns >= n_valid[b] are ignored). After the pass row b holds exactly
    start[b] + n_valid[b] tokens: writes always end at the end of a row (append, or overwrite of the
    newest tokens during rectification).
    Host tuples drive the loops; the device tensors feed kernels without a host sync.
    """

    start: tuple[int, ...]
    n_valid: tuple[int, ...]
    width: int
    start_t: torch.Tensor
    n_valid_t: torch.Tensor

    @classmethod
    def make(cls, start: list[int], n_valid: list[int], width: int, device: torch.device | str) -> "Span":
        if len(start) != len(n_valid):
            raise ValueError("start and n_valid need one entry per row")
        if any(n < 0 or n > width for n in n_valid) or any(s < 0 for s in start):
            raise ValueError(f"invalid span: start={start}, n_valid={n_valid}, width={width}")
        return cls(
            tuple(start), tuple(n_valid), width,
            torch.tensor(start, dtype=torch.int64, device=device),
            torch.tensor(n_valid, dtype=torch.int64, device=device),
        )

    @property
    def end(self) -> tuple[int, ...]:
        """Row lengths after the pass."""
        return tuple(s + n for s, n in zip(self.start, self.n_valid))

    @property
    def end_t(self) -> torch.Tensor:
        return self.start_t + self.n_valid_t


class KVCache:
    """Preallocated K/V for every layer plus block summaries.

    k, v: [L, B, HKV, Nmax, D]; kmin, kmax: [L, B, HKV, NBmax, D] with NBmax = ceil(Nmax / BS),
    the element-wise min/max of the post-RoPE keys of each block of BS tokens (the last block of a
    row may be partial: its summary covers only the written tokens). lengths: [B] tokens per row.
    With poison=True every buffer starts as NaN, so reading an unwritten slot shows up in tests.
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
        poison: bool = False,
    ) -> None:
        if capacity < 1 or batch < 1:
            raise ValueError(f"cache needs capacity >= 1 and batch >= 1, got {capacity}, {batch}")
        self.block_size = block_size
        self.capacity = capacity
        self.num_blocks = -(-capacity // block_size)
        fill = float("nan") if poison else 0.0
        kv_shape = (num_layers, batch, num_kv_heads, capacity, head_dim)
        sum_shape = (num_layers, batch, num_kv_heads, self.num_blocks, head_dim)
        self.k = torch.full(kv_shape, fill, dtype=dtype, device=device)
        self.v = torch.full(kv_shape, fill, dtype=dtype, device=device)
        self.kmin = torch.full(sum_shape, fill, dtype=dtype, device=device)
        self.kmax = torch.full(sum_shape, fill, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.int64, device=device)
        self.host_lengths = [0] * batch

    @staticmethod
    def bytes_needed(num_layers: int, batch: int, num_kv_heads: int, capacity: int, head_dim: int,
                     block_size: int, element_size: int) -> int:
        """Bytes a cache of these sizes allocates: K and V, plus kmin and kmax per block."""
        per_slot = 2 * num_layers * batch * num_kv_heads * head_dim * element_size
        return per_slot * (capacity + -(-capacity // block_size))

    def reset(self) -> None:
        """Empty every row (buffers and their addresses stay, so captured CUDA graphs stay valid;
        stale slots past a row's length are never read)."""
        self.lengths.zero_()
        self.host_lengths = [0] * self.batch

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def bytes(self) -> int:
        """Bytes held by K, V and the summaries."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.kmin, self.kmax))

    def check_span(self, span: Span) -> None:
        """Raise if the span writes past the capacity or leaves a gap after a row's tokens."""
        for b, (s, e) in enumerate(zip(span.start, span.end)):
            if e > self.capacity:
                raise ValueError(f"row {b} needs {e} cache slots but the cache holds {self.capacity}")
            if s > self.host_lengths[b]:
                raise ValueError(f"row {b}: write at {s} would leave a gap after {self.host_lengths[b]} tokens")

    def write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, span: Span) -> None:
        """Store the span's keys/values of one layer and bring that layer's summaries up to date.

        k_new, v_new: [B, HKV, T, D] (T = span.width; columns >= n_valid[b] are not written).
        A single appended token updates its block summary incrementally; longer writes refresh
        exactly the blocks they touch.
        """
        k_l, v_l = self.k[layer], self.v[layer]
        if all(n == span.width for n in span.n_valid) and len(set(span.start)) == 1:
            s = span.start[0]
            k_l[:, :, s:s + span.width] = k_new
            v_l[:, :, s:s + span.width] = v_new
        else:
            for b, (s, n) in enumerate(zip(span.start, span.n_valid)):
                if n:
                    k_l[b, :, s:s + n] = k_new[b, :, :n]
                    v_l[b, :, s:s + n] = v_new[b, :, :n]
        if k_l.is_cuda:
            # One launch per layer instead of per-row loops of small torch ops.
            from .kernels import refresh_summaries

            refresh_summaries(k_l, self.kmin[layer], self.kmax[layer], span.start_t, span.end_t, self.block_size)
        elif span.width == 1:
            self._append_summary(layer, k_new[:, :, 0], span)
        else:
            self.refresh_summaries(layer, span.start, span.end)

    def _append_summary(self, layer: int, k_tok: torch.Tensor, span: Span) -> None:
        """Incremental update for one new token per row: min/max with the block's summary, or the
        token itself when it opens a new block. k_tok: [B, HKV, D]."""
        bs = self.block_size
        for b, (s, n) in enumerate(zip(span.start, span.n_valid)):
            if not n:
                continue
            blk = s // bs
            if s % bs == 0:
                self.kmin[layer, b, :, blk] = k_tok[b]
                self.kmax[layer, b, :, blk] = k_tok[b]
            else:
                torch.minimum(self.kmin[layer, b, :, blk], k_tok[b], out=self.kmin[layer, b, :, blk])
                torch.maximum(self.kmax[layer, b, :, blk], k_tok[b], out=self.kmax[layer, b, :, blk])

    def refresh_summaries(self, layer: int, start: tuple[int, ...], end: tuple[int, ...]) -> None:
        """Recompute the summaries of exactly the blocks that positions [start[b], end[b]) touch,
        from the keys at positions < end[b] (the row's length after the write)."""
        bs = self.block_size
        for b, (s, e) in enumerate(zip(start, end)):
            if e <= s:
                continue
            b0, b1 = s // bs, -(-e // bs)
            keys = self.k[layer, b, :, b0 * bs:e]
            pad = b1 * bs - e
            kmin = torch.nn.functional.pad(keys, (0, 0, 0, pad), value=float("inf"))
            kmax = torch.nn.functional.pad(keys, (0, 0, 0, pad), value=float("-inf"))
            hkv, d = keys.shape[0], keys.shape[-1]
            self.kmin[layer, b, :, b0:b1] = kmin.view(hkv, b1 - b0, bs, d).amin(dim=2)
            self.kmax[layer, b, :, b0:b1] = kmax.view(hkv, b1 - b0, bs, d).amax(dim=2)

    # ---- device-side writes: no host data, so a CUDA graph can replay them ----

    def write_at(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, start: torch.Tensor,
                 use_kernels: bool = False) -> None:
        """Store W new tokens per row at positions start[b] .. start[b] + W - 1 (start: [B] device
        tensor; every row writes all W columns) and update that layer's summaries: incrementally
        for W = 1, else a refresh of exactly the touched blocks. k_new, v_new: [B, HKV, W, D].
        The caller guarantees start[b] + W <= capacity and that the row ends there."""
        B, _, W, _ = k_new.shape
        rows = torch.arange(B, device=k_new.device)[:, None]
        pos = start[:, None] + torch.arange(W, device=k_new.device)[None, :]
        # Advanced indices on dims 0 and 2 put the (B, W) index dims first: values are [B, W, HKV, D].
        self.k[layer][rows, :, pos] = k_new.transpose(1, 2)
        self.v[layer][rows, :, pos] = v_new.transpose(1, 2)
        kmin, kmax = self.kmin[layer], self.kmax[layer]
        if use_kernels:
            from .kernels import refresh_summaries, update_summaries

            if W == 1:
                update_summaries(k_new[:, :, 0].contiguous(), kmin, kmax, start, self.block_size)
            else:
                refresh_summaries(self.k[layer], kmin, kmax, start, start + W, self.block_size)
            return
        if W != 1:
            self.refresh_summaries(layer, tuple(start.tolist()), tuple((start + W).tolist()))
            return
        blk = start // self.block_size
        fresh = (start % self.block_size == 0)[:, None, None]
        k_tok = k_new[:, :, 0]
        row = torch.arange(B, device=k_new.device)
        old_min, old_max = kmin[row, :, blk], kmax[row, :, blk]
        kmin[row, :, blk] = torch.where(fresh, k_tok, torch.minimum(old_min, k_tok))
        kmax[row, :, blk] = torch.where(fresh, k_tok, torch.maximum(old_max, k_tok))

    def commit(self, span: Span) -> None:
        """Record the row lengths after a forward pass over `span` (called once, after all layers)."""
        self.host_lengths = list(span.end)
        self.lengths.copy_(span.end_t)
