"""The runner: a model bound to one KV cache. It owns the cache, the only host copy of the row
lengths and the captured CUDA graphs, and decides in one place whether a pass replays a graph or
runs eagerly. Every caller (the generation loop, evaluation, benchmarks, the transformers
integration) runs its forward passes through a runner.

The model is anything with `run(tokens, cache, span, sparse, cols, observe) -> logits`: our
`resa.model.Transformer`, or the transformers adapter in `resa.hf`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from . import attention as attn
from .blocks import block_hashes, shareable_blocks
from .cache import KVCache, Span
from .config import ResaConfig
from .transfer import to_device

# progress(done, total): tokens computed so far out of a pass's total (e.g. for a progress bar).
Progress = Callable[[int, int], None]


class Runner:
    """Forward passes of `model` against `cache` (rows of a batch, each with its own length).

    cuda_graphs: replay captured graphs for decode steps and rectification windows (CUDA, Triton
    backend, models that support it); prefill chunks always run eagerly. Before each pass the
    runner makes the rows hold the blocks the pass writes (`KVCache.reserve`).
    """

    def __init__(self, model, cache: KVCache, *, cuda_graphs: bool = True) -> None:
        self.model, self.cache = model, cache
        self.lengths: list[int] = cache.lengths.tolist()
        self.prefix_hits = 0  # prompt tokens taken from the prefix cache by `prefill`
        self.window_passes = 0  # dense passes `window` ran (rectification or verification)
        self._generation = cache.pool.generation
        self._mask: torch.Tensor | None = None  # row mask of the masked passes' graphs
        use = (cuda_graphs and cache.device.type == "cuda" and getattr(model, "graph_safe", False)
               and attn.resolve_backend(model.backend, cache.device) == "triton")
        if use:
            from .graphs import GraphSet

            self.graphs: "GraphSet | None" = GraphSet(cache.device)
        else:
            self.graphs = None

    @property
    def batch(self) -> int:
        return self.cache.batch

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    @property
    def device(self) -> torch.device:
        return self.cache.device

    @property
    def capture_seconds(self) -> float:
        return self.graphs.capture_seconds if self.graphs is not None else 0.0

    # ---- passes ----

    def extend(self, rows: Sequence[Sequence[int]], chunk: int, progress: Progress | None = None) -> torch.Tensor:
        """Append each row's tokens (ragged; a row may get none, but some row must get one)
        densely, in chunks of `chunk` columns (a prefill when the rows are empty). Returns fp32
        logits [B, V] of each row's last new token (zeros for rows that got none).
        progress(done, total): called after each chunk with the tokens appended so far."""
        lens = [len(r) for r in rows]
        if len(rows) != self.batch:
            raise ValueError(f"extend needs one token list per row ({self.batch}), got {len(rows)}")
        if max(lens) < 1:
            raise ValueError("extend needs at least one token")
        self._reserve(self.lengths, [n + m for n, m in zip(self.lengths, lens)])
        longest = max(lens)
        ids = torch.zeros(self.batch, longest, dtype=torch.int64)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.as_tensor(list(r), dtype=torch.int64)
        ids = ids.to(self.device)
        base = list(self.lengths)
        last: list[torch.Tensor | None] = [None] * self.batch
        for c0 in range(0, longest, chunk):
            width = min(chunk, longest - c0)
            n_valid = [max(0, min(n - c0, width)) for n in lens]
            span = Span.make([s + min(c0, n) for s, n in zip(base, lens)], n_valid, width, self.device)
            cols = torch.tensor([max(0, min(n - 1 - c0, width - 1)) for n in lens], device=self.device)
            logits = self.model.run(ids[:, c0:c0 + width], self.cache, span, None, cols)
            for b, n in enumerate(lens):
                if c0 <= n - 1 < c0 + width:
                    last[b] = logits[b]
            self.lengths = list(span.end)
            if progress is not None:
                progress(sum(span.end) - sum(base), sum(lens))
        filler = torch.zeros_like(next(x for x in last if x is not None))
        return torch.stack([filler if x is None else x for x in last])

    def prefill(self, rows: Sequence[Sequence[int]], chunk: int, *, share: bool = True,
                progress: Progress | None = None) -> torch.Tensor:
        """`extend` of empty rows by their prompts, through the pool's prefix cache.

        With share, each prompt takes the cached blocks of its longest cached prefix (full blocks
        of an earlier prompt with the same tokens before them) and only the rest is computed; its
        own full prompt blocks are then offered to later prompts. Rows of this batch that share a
        prefix no earlier call cached are filled in waves: the first of them computes it, the
        others take it. The last token of a prompt is always computed (its logits are needed).
        Returns fp32 logits [B, V] of each row's last token; `prefix_hits` counts reused tokens.
        progress(done, total): the tokens computed so far and in all (each wave reports its own).
        """
        if any(self.lengths):
            raise ValueError("prefill needs empty rows (use extend to append)")
        if not share:
            return self.extend(rows, chunk, progress)
        bs, alloc = self.cache.block_size, self.cache.pool.allocator
        hashes = [block_hashes(r, bs) for r in rows]
        out: list[torch.Tensor | None] = [None] * self.batch
        pending = list(range(self.batch))
        while pending:
            # One row per prefix that is not cached yet computes it; rows waiting for the same
            # prefix take it in a later wave.
            wave, claimed = [], set()
            for b in pending:
                usable = hashes[b][:shareable_blocks(len(rows[b]), bs)]
                hit = alloc.cached_prefix(usable)
                key = usable[hit] if hit < len(usable) else None
                if key is None or key not in claimed:
                    wave.append((b, usable))
                    claimed.add(key)
            feed = [[] for _ in range(self.batch)]
            for b, usable in wave:
                taken = alloc.lookup(usable)
                self.cache.attach(b, taken)
                self.lengths[b] = len(taken) * bs
                self.prefix_hits += len(taken) * bs
                feed[b] = list(rows[b][len(taken) * bs:])
            self.cache.lengths.copy_(torch.tensor(self.lengths, device=self.device))
            logits = self.extend(feed, chunk, progress)
            for b, _ in wave:
                out[b] = logits[b]
                alloc.register(self.cache.blocks[b][:len(hashes[b])], hashes[b])
            done = {b for b, _ in wave}
            pending = [b for b in pending if b not in done]
        return torch.stack(out)

    def step(self, tokens: torch.Tensor, sparse: ResaConfig | None, observe: attn.QueryObserver | None = None,
             active: Sequence[bool] | None = None) -> torch.Tensor:
        """Feed one token per row (tokens [B]) at the end of each row; sparse None attends densely,
        a ReSA config block-sparsely (whatever its mode). Returns fp32 logits [B, V].
        active: only these rows take the step (a continuous batch: the others keep their cache
        and length, and their logits mean nothing); None: every row."""
        if active is not None:
            return self._rows_pass(tokens.view(self.batch, 1), 0, active, sparse, observe)
        self._reserve(self.lengths, [n + 1 for n in self.lengths])
        tokens = tokens.to(self.device).view(self.batch)
        if self.graphs is not None and observe is None:
            cache = self.cache

            def fn(tok: torch.Tensor) -> torch.Tensor:
                return self.model.run(tok[:, None], cache, Span.on_device(cache.lengths.clone(), 1), sparse, -1)

            logits = self.graphs.run(("step", sparse), fn, tokens)
        else:
            span = Span.make(self.lengths, [1] * self.batch, 1, self.device)
            logits = self.model.run(tokens[:, None], self.cache, span, sparse, -1, observe)
        self.lengths = [n + 1 for n in self.lengths]
        return logits

    def window(self, tokens: torch.Tensor, overwrite: int, active: Sequence[bool] | None = None,
               every: bool = False) -> torch.Tensor:
        """Dense pass over tokens [B, W] whose first `overwrite` entries are already the newest
        `overwrite` tokens of every row (their K/V is rewritten in every layer) and the rest are
        appended. Returns fp32 logits [B, V] of the last position (every: [B, W, V] of all W).
        active: only these rows take the pass (see `step`)."""
        self.window_passes += 1
        if active is not None:
            return self._rows_pass(tokens, overwrite, active, None, None, every)
        W = tokens.shape[1]
        cols = None if every else -1
        start = [n - overwrite for n in self.lengths]
        if min(start) < 0:
            raise ValueError(f"cannot rewrite {overwrite} tokens of a row holding {min(self.lengths)}")
        self._reserve(start, [s + W for s in start])
        tokens = tokens.to(self.device)
        if self.graphs is not None:
            cache = self.cache

            def fn(tok: torch.Tensor) -> torch.Tensor:
                return self.model.run(tok, cache, Span.on_device(cache.lengths - overwrite, W), None, cols)

            logits = self.graphs.run(("window", W, overwrite) + (("every",) if every else ()), fn, tokens)
        else:
            logits = self.model.run(tokens, self.cache, Span.make(start, [W] * self.batch, W, self.device), None, cols)
        self.lengths = [s + W for s in start]
        return logits

    def _rows_pass(self, tokens: torch.Tensor, overwrite: int, active: Sequence[bool], sparse: ResaConfig | None,
                   observe: attn.QueryObserver | None, every: bool = False) -> torch.Tensor:
        """A decode step (W = 1, overwrite 0, sparse or dense) or dense window of only the `active`
        rows: each rewrites its newest `overwrite` tokens and appends the rest of tokens [B, W];
        the other rows are untouched. Graphs replay it with a device-side row mask. Returns the
        logits [B, V] of the last position (every: [B, W, V]); the other rows' mean nothing."""
        cols = None if every else -1
        active = [bool(a) for a in active]
        if len(active) != self.batch or not any(active):
            raise ValueError(f"active needs one flag per row ({self.batch}) and at least one True, got {active}")
        W = tokens.shape[1]
        start = [n - overwrite if a else n for n, a in zip(self.lengths, active)]
        if min(start) < 0:
            raise ValueError(f"cannot rewrite {overwrite} tokens of a row holding {min(self.lengths)}")
        n_valid = [W if a else 0 for a in active]
        graphed = self.graphs is not None and observe is None
        if graphed:
            self.cache.ensure_sink()  # before _reserve: a pool that grows for it drops stale graphs
        self._reserve(start, [s + n for s, n in zip(start, n_valid)])
        tokens = tokens.to(self.device)
        if graphed:
            cache = self.cache
            mask = self._row_mask()
            mask.copy_(to_device(active, torch.int64, self.device))

            def fn(tok: torch.Tensor) -> torch.Tensor:
                span = Span.on_device(cache.lengths - overwrite * mask, W, mask * W)
                return self.model.run(tok, cache, span, sparse, cols)

            logits = self.graphs.run(("rows", W, overwrite, sparse, every), fn, tokens)
        else:
            # Eagerly only the active rows run (through a view of them): on a CPU, or wherever a
            # pass is compute-bound, rows that sit it out cost nothing.
            rows = [b for b, a in enumerate(active) if a]
            view = self.cache.rows_view(rows)
            span = Span.make([start[b] for b in rows], [W] * len(rows), W, self.device)
            part = self.model.run(tokens[rows], view, span, sparse, cols, observe)
            idx = torch.tensor(rows, device=self.device)
            self.cache.lengths[idx] = view.lengths
            logits = part.new_zeros(self.batch, *part.shape[1:])
            logits[idx] = part
        self.lengths = [s + n for s, n in zip(start, n_valid)]
        return logits

    def _row_mask(self) -> torch.Tensor:
        """The static [B] row-mask buffer the masked passes' graphs read."""
        if self._mask is None:
            self._mask = torch.zeros(self.batch, dtype=torch.int64, device=self.device)
        return self._mask

    # ---- row state ----

    def reset(self) -> None:
        """Empty every row, returning its blocks to the pool (the table and buffers stay, so
        captured graphs stay valid)."""
        self.cache.release()
        self.cache.lengths.zero_()
        self.lengths = [0] * self.batch

    def truncate(self, lengths: Sequence[int]) -> None:
        """Shorten rows to `lengths` (each at most the row's current length): later slots are
        forgotten (blocks past them return to the pool) and the summary of each row's new partial
        last block is recomputed."""
        lengths = [int(n) for n in lengths]
        if len(lengths) != self.batch or any(not 0 <= n <= m for n, m in zip(lengths, self.lengths)):
            raise ValueError(f"truncate needs one length per row within 0..current {self.lengths}, got {lengths}")
        for b, n in enumerate(lengths):
            self.cache.shrink(b, n)
        bs = self.cache.block_size
        start, end = to_device([[n // bs * bs for n in lengths], lengths], torch.int64, self.device)
        attn.refresh_all_summaries(self.cache, start, end, attn.resolve_backend(self.model.backend, self.device))
        self.cache.lengths.copy_(end)
        self.lengths = lengths

    def fork(self) -> "Runner":
        """An independent runner whose rows start as this one's (blocks are shared until either
        side writes them; graphs are not shared)."""
        other = Runner(self.model, self.cache.copy(), cuda_graphs=self.graphs is not None)
        other.lengths = list(self.lengths)
        return other

    def load_rows(self, sources: Sequence["Runner"]) -> None:
        """Make row b a copy of the single row of sources[b] (same pool; blocks are shared until
        written): rows prefilled separately (e.g. from one shared prefix) then decode together."""
        c = self.cache
        if len(sources) != self.batch:
            raise ValueError(f"load_rows needs {self.batch} single-row runners, got {len(sources)}")
        for src in sources:
            if src.batch != 1 or src.cache.pool is not c.pool:
                raise ValueError("load_rows takes single-row runners over this runner's KV pool (same engine and "
                                 "block size)")
            if src.lengths[0] > c.capacity:
                raise ValueError(f"a row holds {src.lengths[0]} tokens, more than capacity {c.capacity}")
        c.release()
        for b, src in enumerate(sources):
            c.pool.allocator.share(src.cache.blocks[0])
            c.attach(b, src.cache.blocks[0])
        self.lengths = [s.lengths[0] for s in sources]
        c.lengths.copy_(torch.tensor(self.lengths, device=self.device))

    def fill_synthetic(self, length: int, seed: int = 0, *, zeros: bool = False) -> None:
        """Make every row a context of `length` random (standard normal; or all-zero, much faster
        to write) keys and values with exact block summaries, without running the model: for
        decode benchmarks, whose speed depends on the cache's size and not on its contents."""
        self.reset()
        self._reserve([0] * self.batch, [length] * self.batch)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        c = self.cache
        zero = torch.zeros(self.batch, dtype=torch.int64, device=self.device)
        end = torch.full_like(zero, length)
        backend = attn.resolve_backend(self.model.backend, self.device)
        pool = c.pool
        shape = (c.blocks_for(length), pool.num_kv_heads, pool.block_size, pool.head_dim)
        for layer in range(c.num_layers):
            for held in c.blocks:
                ids = torch.tensor(held, device=self.device)
                for t in (pool.k, pool.v):
                    if zeros:
                        t[layer].index_fill_(0, ids, 0.0)
                    else:
                        t[layer].index_copy_(0, ids, torch.randn(shape, generator=gen, device=self.device, dtype=t.dtype))
            attn.refresh_layer_summaries(c, layer, zero, end, backend)
        c.lengths.copy_(end)
        self.lengths = [length] * self.batch

    def _reserve(self, start: Sequence[int], end: Sequence[int]) -> None:
        """Blocks for a pass writing [start[b], end[b]); captured graphs are dropped when the pool
        had to reallocate (their addresses are stale)."""
        self.cache.reserve(start, end)
        if self.cache.pool.generation != self._generation:
            self._generation = self.cache.pool.generation
            if self.graphs is not None:
                self.graphs.clear()
