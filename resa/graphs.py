"""CUDA graphs of forward passes: captured on first use per key, replayed afterwards."""

from __future__ import annotations

import time
from typing import Callable, Hashable

import torch


class GraphSet:
    """Captured passes of one cache, by key (a decode step per ReSA setting, a window per shape).

    The first call of a key is the real pass, run eagerly on a side stream (it compiles the kernels
    and fills the cache exactly as a replay would), and is then captured: recording runs nothing,
    so the cache stays as the eager pass left it. Later calls copy the inputs into the graph's
    static buffer and replay. `fn(tokens) -> logits` must only depend on device state.
    """

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.device = device
        self.graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.capture_seconds = 0.0  # eager first passes + captures, all keys

    def clear(self) -> None:
        """Forget every captured graph (the buffers they read were reallocated)."""
        self.graphs.clear()

    def run(self, key: Hashable, fn: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        """fn(tokens) through the graph of `key`; returns a fresh logits tensor."""
        entry = self.graphs.get(key)
        if entry is not None:
            graph, static, logits = entry
            static.copy_(tokens)
            graph.replay()
            return logits.clone()
        t0 = time.perf_counter()
        current = torch.cuda.current_stream(self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            result = fn(tokens)
        current.wait_stream(stream)
        static = tokens.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # recorded, not run
            logits = fn(static)
        self.graphs[key] = (graph, static, logits)
        torch.cuda.synchronize(self.device)
        self.capture_seconds += time.perf_counter() - t0
        return result
