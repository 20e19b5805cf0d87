"""The runner: a model bound to one KV cache. It owns the cache, the only host copy of the row
lengths and the captured CUDA graphs, and decides in one place whether a pass replays a graph or
runs eagerly. Every caller (the generation loop, evaluation, benchmarks, the transformers
integration) runs its forward passes through a runner.

The model is anything with `run(tokens, cache, span, sparse, cols, observe) -> logits`: our
`resa.model.Transformer`, or the transformers adapter in `resa.hf`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import attention as attn
from .cache import KVCache, Span
from .config import ResaConfig


class Runner:
    """Forward passes of `model` against `cache` (rows of a batch, each with its own length).

    cuda_graphs: replay captured graphs for decode steps and rectification windows (CUDA, Triton
    backend, models that support it); prefill chunks always run eagerly.
    """

    def __init__(self, model, cache: KVCache, *, cuda_graphs: bool = True) -> None:
        self.model, self.cache = model, cache
        self.lengths: list[int] = cache.lengths.tolist()
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

    def extend(self, rows: Sequence[Sequence[int]], chunk: int) -> torch.Tensor:
        """Append each row's tokens (ragged, at least one per row) densely, in chunks of `chunk`
        columns (a prefill when the rows are empty). Returns fp32 logits [B, V] of each row's last
        new token."""
        lens = [len(r) for r in rows]
        if len(rows) != self.batch:
            raise ValueError(f"extend needs one token list per row ({self.batch}), got {len(rows)}")
        if min(lens) < 1:
            raise ValueError("every row needs at least one token")
        self._check_fit([n + m for n, m in zip(self.lengths, lens)])
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
        return torch.stack(last)

    def step(self, tokens: torch.Tensor, sparse: ResaConfig | None, observe: attn.QueryObserver | None = None) -> torch.Tensor:
        """Feed one token per row (tokens [B]) at the end of each row; sparse None attends densely,
        a ReSA config block-sparsely (whatever its mode). Returns fp32 logits [B, V]."""
        self._check_fit([n + 1 for n in self.lengths])
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

    def window(self, tokens: torch.Tensor, overwrite: int) -> torch.Tensor:
        """Dense pass over tokens [B, W] whose first `overwrite` entries are already the newest
        `overwrite` tokens of every row (their K/V is rewritten in every layer) and the rest are
        appended. Returns fp32 logits [B, V] of the last position."""
        W = tokens.shape[1]
        start = [n - overwrite for n in self.lengths]
        if min(start) < 0:
            raise ValueError(f"cannot rewrite {overwrite} tokens of a row holding {min(self.lengths)}")
        self._check_fit([s + W for s in start])
        tokens = tokens.to(self.device)
        if self.graphs is not None:
            cache = self.cache

            def fn(tok: torch.Tensor) -> torch.Tensor:
                return self.model.run(tok, cache, Span.on_device(cache.lengths - overwrite, W), None, -1)

            logits = self.graphs.run(("window", W, overwrite), fn, tokens)
        else:
            logits = self.model.run(tokens, self.cache, Span.make(start, [W] * self.batch, W, self.device), None, -1)
        self.lengths = [s + W for s in start]
        return logits

    # ---- row state ----

    def reset(self) -> None:
        """Empty every row (buffers and their addresses stay, so captured graphs stay valid)."""
        self.cache.lengths.zero_()
        self.lengths = [0] * self.batch

    def truncate(self, lengths: Sequence[int]) -> None:
        """Shorten rows to `lengths` (each at most the row's current length): later slots are
        forgotten and the summary of each row's new partial last block is recomputed."""
        lengths = [int(n) for n in lengths]
        if len(lengths) != self.batch or any(not 0 <= n <= m for n, m in zip(lengths, self.lengths)):
            raise ValueError(f"truncate needs one length per row within 0..current {self.lengths}, got {lengths}")
        bs = self.cache.block_size
        start = torch.tensor([n // bs * bs for n in lengths], device=self.device)
        end = torch.tensor(lengths, device=self.device)
        backend = attn.resolve_backend(self.model.backend, self.device)
        for layer in range(self.cache.k.shape[0]):
            attn.refresh_layer_summaries(self.cache, layer, start, end, backend)
        self.cache.lengths.copy_(end)
        self.lengths = lengths

    def fork(self) -> "Runner":
        """An independent runner over a copy of this cache (graphs are not shared)."""
        other = Runner(self.model, self.cache.copy(), cuda_graphs=self.graphs is not None)
        other.lengths = list(self.lengths)
        return other

    def load_rows(self, sources: Sequence["Runner"]) -> None:
        """Fill row b with the single row of sources[b] (same block size, each keeping its own
        length): rows prefilled separately (e.g. from one shared prefix) then decode together."""
        c, bs = self.cache, self.cache.block_size
        if len(sources) != self.batch:
            raise ValueError(f"load_rows needs {self.batch} single-row runners, got {len(sources)}")
        for b, src in enumerate(sources):
            if src.batch != 1 or src.cache.block_size != bs:
                raise ValueError("load_rows takes single-row runners of this cache's block size")
            n = src.lengths[0]
            if n > c.capacity:
                raise ValueError(f"row {b} holds {n} tokens, more than capacity {c.capacity}")
            nb = -(-n // bs)
            for name, count in (("k", n), ("v", n), ("kmin", nb), ("kmax", nb)):
                getattr(c, name)[:, b, :, :count] = getattr(src.cache, name)[:, 0, :, :count]
        self.lengths = [s.lengths[0] for s in sources]
        c.lengths.copy_(torch.tensor(self.lengths, device=self.device))

    def fill_synthetic(self, length: int, seed: int = 0) -> None:
        """Make every row a context of `length` random (standard normal) keys and values with
        exact block summaries, without running the model: for decode benchmarks, whose speed
        depends on the cache's size and not on its contents."""
        self._check_fit([length] * self.batch)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        c = self.cache
        zero = torch.zeros(self.batch, dtype=torch.int64, device=self.device)
        end = torch.full_like(zero, length)
        backend = attn.resolve_backend(self.model.backend, self.device)
        for layer in range(c.k.shape[0]):
            c.k[layer, :, :, :length].normal_(0.0, 1.0, generator=gen)
            c.v[layer, :, :, :length].normal_(0.0, 1.0, generator=gen)
            attn.refresh_layer_summaries(c, layer, zero, end, backend)
        c.lengths.copy_(end)
        self.lengths = [length] * self.batch

    def _check_fit(self, needed: Sequence[int]) -> None:
        if max(needed) > self.capacity:
            raise ValueError(f"a row would need {max(needed)} cache slots but the cache holds {self.capacity} "
                             "per row; allocate a larger cache (or generate fewer tokens)")
