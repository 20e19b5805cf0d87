"""CUDA graphs of the decode step (one capture per cache and ReSA setting) and of the dense
rectification pass (one per cache and window shape), replayed instead of launching kernels."""

from __future__ import annotations

import torch

from .cache import KVCache
from .config import ResaConfig
from .model import Transformer


class GraphedDecode:
    """`Transformer.decode_static` captured once and replayed.

    The graph reads the token ids from a static buffer and writes the fp32 logits [B, V] into
    another; the cache (K/V, summaries, lengths) is updated in place by the replay, exactly as an
    eager `decode_static` call would. The caller advances `cache.host_lengths`.
    """

    def __init__(self, model: Transformer, cache: KVCache, sparse: ResaConfig | None) -> None:
        device = cache.k.device
        if device.type != "cuda":
            raise ValueError("CUDA graphs need the cache on a CUDA device")
        self.model, self.cache, self.sparse = model, cache, sparse
        self.tokens = torch.zeros(cache.batch, dtype=torch.int64, device=device)
        self.graph = torch.cuda.CUDAGraph()
        # One eager warm-up compiles the Triton kernels; it writes one token per row, so the
        # lengths and the summary block it touches are restored afterwards (the K/V slot it wrote
        # lies past each row's end and is overwritten by the next real step).
        snapshot = self._snapshot()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            model.decode_static(self.tokens, cache, sparse)
        torch.cuda.current_stream(device).wait_stream(stream)
        self._restore(snapshot)
        with torch.cuda.graph(self.graph):
            self.logits = model.decode_static(self.tokens, cache, sparse)
        self._restore(snapshot)

    def _snapshot(self):
        c = self.cache
        rows = torch.arange(c.batch, device=c.lengths.device)
        blk = torch.clamp(c.lengths // c.block_size, max=c.num_blocks - 1)
        return c.lengths.clone(), rows, blk, c.kmin[:, rows, :, blk].clone(), c.kmax[:, rows, :, blk].clone()

    def _restore(self, snapshot) -> None:
        lengths, rows, blk, kmin, kmax = snapshot
        self.cache.lengths.copy_(lengths)
        self.cache.kmin[:, rows, :, blk] = kmin
        self.cache.kmax[:, rows, :, blk] = kmax

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed tokens [B] at the end of each row; returns the logits buffer [B, V] (overwritten by
        the next replay: copy it to keep it)."""
        self.tokens.copy_(tokens)
        self.graph.replay()
        self.cache.host_lengths = [n + 1 for n in self.cache.host_lengths]
        return self.logits


class GraphedWindow:
    """`Transformer.window_static` captured once per (window width, overwrite) and replayed.

    The first call of a shape runs eagerly (on a side stream: it compiles the kernels and is the
    real pass, so nothing has to be undone) and then captures the graph; later calls replay it.
    The caller advances `cache.host_lengths`.
    """

    def __init__(self, model: Transformer, cache: KVCache) -> None:
        if cache.k.device.type != "cuda":
            raise ValueError("CUDA graphs need the cache on a CUDA device")
        self.model, self.cache = model, cache
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def __call__(self, tokens: torch.Tensor, overwrite: int) -> torch.Tensor:
        """tokens [B, W]; returns the logits [B, V] of the last position (a buffer the next replay
        of this shape overwrites: copy it to keep it)."""
        key = (tokens.shape[1], overwrite)
        if key in self.graphs:
            graph, static_tokens, logits = self.graphs[key]
            static_tokens.copy_(tokens)
            graph.replay()
            return logits
        device = self.cache.k.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            result = self.model.window_static(tokens, self.cache, overwrite)
        torch.cuda.current_stream(device).wait_stream(stream)
        static_tokens = tokens.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # recorded, not run: the cache stays as the eager pass left it
            logits = self.model.window_static(static_tokens, self.cache, overwrite)
        self.graphs[key] = (graph, static_tokens, logits)
        return result
