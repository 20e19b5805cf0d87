"""Generation engine: dense chunked prefill, sparse decode steps, rectification cadence.

All rows of a batch generate in lock-step (token t of every row in the same step), so one
rectification schedule (`resa.rectify.feed_token`) serves the whole batch; prompts may differ in
length.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .cache import KVCache, Span
from .config import ResaConfig
from .model import Transformer
from .rectify import feed_token
from .ref.selection import block_budget
from .sampling import SamplingConfig, make_generator, sample


class PromptTooLongError(ValueError):
    """The prompt (plus the requested new tokens) does not fit the model's context."""


@dataclass
class GenerationStats:
    mode: str
    rectify_variant: str
    prompt_tokens: list[int]
    new_tokens: list[int] = field(default_factory=list)
    decode_steps: int = 0
    rectifications: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    kv_tokens_read: int = 0
    kv_tokens_dense: int = 0
    peak_memory_gib: float | None = None  # CUDA only: weights + cache + activations

    @property
    def kv_read_fraction(self) -> float:
        """K/V bytes the decode attention read (selected blocks + block summaries + rectification
        passes) over what dense decoding would have read."""
        return self.kv_tokens_read / self.kv_tokens_dense if self.kv_tokens_dense else 1.0

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens (all rows) per second of decoding."""
        total = sum(self.new_tokens)
        return total / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    def summary(self) -> str:
        variant = f" ({self.rectify_variant})" if self.mode == "resa" else ""
        return (
            f"mode={self.mode}{variant} prompt_tokens={sum(self.prompt_tokens)} "
            f"new_tokens={sum(self.new_tokens)} decode={self.tokens_per_second:.1f} tok/s "
            f"prefill={self.prefill_seconds:.2f}s kv_read={self.kv_read_fraction:.3f} "
            f"rectifications={self.rectifications}"
            + (f" peak_memory={self.peak_memory_gib:.1f}GiB" if self.peak_memory_gib is not None else "")
        )


@dataclass
class GenerationResult:
    token_ids: list[list[int]]
    texts: list[str]
    finish_reasons: list[str]
    stats: GenerationStats
    cache: KVCache | None = None


TextCallback = Callable[[int, str], None]


class Engine:
    """Runs a `Transformer` with a `KVCache`: the one code path for generation and evaluation."""

    def __init__(self, model: Transformer, tokenizer=None, poison_cache: bool = False,
                 cuda_graphs: bool = True, reuse_buffers: bool | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.poison_cache = poison_cache
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        model.fuse_projections()
        # Decode steps replay CUDA graphs on GPUs (no host work per layer); CPU runs eagerly.
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        # Keep the last generation's cache and captured graphs for the next call with the same
        # batch bucket (see `_acquire`); on by default where there are graphs to keep.
        self.reuse_buffers = self.cuda_graphs if reuse_buffers is None else reuse_buffers
        self._pooled: tuple[KVCache, CacheRunner] | None = None

    @classmethod
    def load(cls, path: str | None = None, device: str = "cpu", dtype: torch.dtype | None = None,
             backend: str = "auto", cuda_graphs: bool = True) -> "Engine":
        """Load a HF folder or GGUF file (default: the embedded SmolLM2-135M-Instruct)."""
        from .default_model import default_model_path
        from .loader import load_checkpoint

        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but this torch sees no CUDA GPU "
                             f"(torch {torch.__version__}); use device 'cpu' or a CUDA build of torch")

        ckpt = load_checkpoint(path if path is not None else default_model_path())
        dev = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        with torch.device("meta"):
            model = Transformer(ckpt.config, backend=backend)
        model = model.to_empty(device=dev).to(dtype)
        model.load_weights(ckpt.tensors)
        model.eval()
        return cls(model, ckpt.tokenizer, cuda_graphs=cuda_graphs)

    @property
    def context_length(self) -> int:
        return self.model.cfg.max_position_embeddings

    # ---- primitives (also used by the evaluation harness) ----

    def new_cache(self, batch: int, capacity: int, block_size: int) -> KVCache:
        """An empty cache for `batch` rows of up to `capacity` tokens; on CUDA, a clear error
        (instead of an allocator crash) when it cannot fit in the free GPU memory."""
        cfg = self.model.cfg
        if self.device.type == "cuda":
            need = KVCache.bytes_needed(cfg.num_layers, batch, cfg.num_kv_heads, capacity, cfg.head_dim,
                                        block_size, torch.empty((), dtype=self.dtype).element_size())
            free = torch.cuda.mem_get_info(self.device)[0]
            if need > free:
                raise ValueError(
                    f"the KV cache for batch {batch} x {capacity} tokens needs {need / 2**30:.1f} GiB but "
                    f"{free / 2**30:.1f} GiB of GPU memory is free; use fewer prompts, shorter prompts or "
                    "fewer new tokens"
                )
        return KVCache(cfg.num_layers, batch, cfg.num_kv_heads, capacity, cfg.head_dim, block_size,
                       dtype=self.dtype, device=self.device, poison=self.poison_cache)

    def release_buffers(self) -> None:
        """Free the cache (and CUDA graphs) kept from the last generation."""
        self._pooled = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _acquire(self, batch: int, need: int, block_size: int, keep: bool) -> tuple[KVCache, "CacheRunner"]:
        """A cache of at least `batch` rows x `need` tokens and its runner.

        With reuse_buffers, rows come in power-of-two buckets (extra rows decode a 1-token dummy
        prompt: nearly free, decoding is bound by the weights) and the capacity is rounded up to
        4096 tokens, so later calls of a similar size reuse the cache and its captured graphs
        instead of capturing new ones. A rounded cache that does not fit falls back to the exact size.
        """
        if not self.reuse_buffers or keep:
            cache = self.new_cache(batch, need, block_size)
            return cache, CacheRunner(self, cache)
        rows = 1 << (batch - 1).bit_length()
        if self._pooled is not None:
            cache, runner = self._pooled
            if cache.batch == rows and cache.capacity >= need and cache.block_size == block_size:
                cache.reset()
                return cache, runner
        self.release_buffers()
        capacity = max(need, min(-(-need // 4096) * 4096, self.context_length))
        try:
            cache = self.new_cache(rows, capacity, block_size)
        except ValueError:  # the rounded cache does not fit the free GPU memory: exact size
            rows, capacity = batch, need
            cache = self.new_cache(rows, capacity, block_size)
        self._pooled = (cache, CacheRunner(self, cache))
        return self._pooled

    def prefill(self, cache: KVCache, prompts: Sequence[Sequence[int]], chunk: int) -> torch.Tensor:
        """Dense, chunked prefill of one prompt per row into an empty cache.
        Returns the fp32 logits [B, V] of each row's last prompt token."""
        lens = [len(p) for p in prompts]
        if min(lens) < 1:
            raise ValueError("every prompt needs at least one token")
        B, longest = len(prompts), max(lens)
        ids = torch.zeros(B, longest, dtype=torch.int64)
        for b, p in enumerate(prompts):
            ids[b, :len(p)] = torch.tensor(list(p), dtype=torch.int64)
        ids = ids.to(self.device)
        last = [None] * B
        for c0 in range(0, longest, chunk):
            width = min(chunk, longest - c0)
            start = [min(c0, n) for n in lens]
            n_valid = [max(0, min(n - c0, width)) for n in lens]
            span = Span.make(start, n_valid, width, self.device)
            hidden = self.model(ids[:, c0:c0 + width], cache, span)
            for b, n in enumerate(lens):
                if c0 <= n - 1 < c0 + width:
                    last[b] = hidden[b, n - 1 - c0]
        return self.model.logits(torch.stack(last))

    def step(self, cache: KVCache, tokens: torch.Tensor, resa: ResaConfig | None) -> torch.Tensor:
        """Feed one token per row (tokens [B]) at the end of each row; resa=None (or a dense
        config) attends densely, otherwise block-sparse. Returns fp32 logits [B, V]."""
        sparse = None if resa is None or resa.is_dense else resa
        span = Span.make(list(cache.host_lengths), [1] * cache.batch, 1, self.device)
        hidden = self.model(tokens.view(-1, 1).to(self.device), cache, span, sparse=sparse)
        return self.model.logits(hidden[:, -1])

    def dense_window(self, cache: KVCache, tokens: torch.Tensor, overwrite: int) -> torch.Tensor:
        """Dense pass over tokens [B, W] whose first `overwrite` entries are already the newest
        `overwrite` tokens of every row (their K/V is rewritten) and the rest are appended.
        Returns fp32 logits [B, V] of the last position."""
        B, W = tokens.shape
        start = [n - overwrite for n in cache.host_lengths]
        if min(start) < 0:
            raise ValueError(f"cannot rewrite {overwrite} tokens of a row holding fewer")
        span = Span.make(start, [W] * B, W, self.device)
        hidden = self.model(tokens.to(self.device), cache, span)
        return self.model.logits(hidden[:, -1])

    # ---- generation ----

    def encode(self, prompts: Sequence[str], chat: bool) -> list[list[int]]:
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer; pass token ids to generate_ids")
        out = []
        for p in prompts:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": p}]) if chat else p
            out.append(self.tokenizer.encode(text))
        return out

    def generate(self, prompts: Sequence[str], *, chat: bool = False, stop: Sequence[str] = (),
                 on_text: TextCallback | None = None, **kwargs) -> GenerationResult:
        """Generate for a batch of text prompts; see `generate_ids` for the settings.
        on_text(row, piece) receives decoded text as it is produced."""
        from .tokenizer import StreamDecoder

        prompt_ids = self.encode(list(prompts), chat)
        decoders = [StreamDecoder(self.tokenizer) for _ in prompt_ids]
        texts = [""] * len(prompt_ids)
        stopped = [False] * len(prompt_ids)

        def on_token(row: int, token: int) -> bool:
            piece = decoders[row].push(token)
            before = len(texts[row])
            texts[row] += piece
            hit = _find_stop(texts[row], stop, before)
            if hit is not None:
                piece = texts[row][before:hit]
                texts[row] = texts[row][:hit]
                stopped[row] = True
            if on_text is not None and piece:
                on_text(row, piece)
            return hit is not None

        result = self.generate_ids(prompt_ids, on_token=on_token, **kwargs)
        for row, ids in enumerate(result.token_ids):
            if stopped[row]:
                result.finish_reasons[row] = "stop"
                continue
            tail = decoders[row].flush()
            if on_text is not None and tail:
                on_text(row, tail)
            texts[row] = self.tokenizer.decode(ids)
        result.texts = texts
        return result

    def generate_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        resa: ResaConfig = ResaConfig(),
        sampling: SamplingConfig = SamplingConfig(),
        max_new_tokens: int = 128,
        eos_token_ids: Sequence[int] | None = None,
        on_token: Callable[[int, int], bool] | None = None,
        keep_cache: bool = False,
        sync_every: int | None = None,
    ) -> GenerationResult:
        """Generate up to max_new_tokens per row. on_token(row, id) may return True to stop a row.
        Rows stop at an EOS id (default: the tokenizer's/model's); a finished row's output ends
        there while the other rows go on. keep_cache returns the KV cache (for inspection).
        sync_every: sampled tokens stay on the device and reach the host (EOS and stop checks,
        on_token) in groups of this many, so the decode loop does not wait for the GPU every
        token (default 16 on CUDA, 1 on CPU). A row that stopped inside a group has its output
        cut at the stop; the steps after it in that group are wasted work, not output."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if sync_every is None:
            sync_every = 16 if self.device.type == "cuda" else 1
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        lens = [len(p) for p in prompt_ids]
        if not lens:
            raise ValueError("no prompts given")
        need = max(lens) + max_new_tokens
        if need > self.context_length:
            raise PromptTooLongError(
                f"prompt of {max(lens)} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                f"context of {self.context_length} tokens; shorten the prompt or lower max_new_tokens"
            )
        if eos_token_ids is None:
            eos_token_ids = self._default_eos()
        eos = set(eos_token_ids)
        B = len(prompt_ids)
        stats = GenerationStats(resa.mode if not resa.is_dense else "dense", resa.rectify_variant, lens)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        cache, runner = self._acquire(B, need, resa.block_size, keep_cache)
        gen = make_generator(sampling, self.device)
        # Rows past B (a batch bucket's spare rows) decode a 1-token dummy prompt; never output.
        rows = list(prompt_ids) + [[0]] * (cache.batch - B)

        t0 = _now(self.device)
        logits = self.prefill(cache, rows, resa.prefill_chunk)
        t1 = _now(self.device)
        stats.prefill_seconds = t1 - t0

        history = torch.empty(cache.batch, max_new_tokens, dtype=torch.int64, device=self.device)
        outputs: list[list[int]] = [[] for _ in range(B)]
        reasons = ["length"] * B
        done = [False] * B
        sparse_cfg = None if resa.is_dense else resa
        checked = 0  # tokens of `history` already handed to the host

        def drain(upto: int) -> None:
            """Bring tokens checked..upto-1 to the host (one sync), apply EOS and on_token."""
            nonlocal checked
            for b, toks in enumerate(history[:B, checked:upto].tolist()):
                for tok in toks:
                    if done[b]:
                        break
                    if tok in eos:
                        done[b], reasons[b] = True, "eos"
                        break
                    outputs[b].append(tok)
                    if on_token is not None and on_token(b, tok):
                        done[b], reasons[b] = True, "stop"
            checked = upto

        for t in range(max_new_tokens):
            history[:, t] = sample(logits, sampling, gen)
            last = t == max_new_tokens - 1
            if last or (t + 1) % sync_every == 0:
                drain(t + 1)
            if all(done) or last:
                break
            real = cache.host_lengths[:B]
            cached = sum(real)
            fed = feed_token(runner, history, t, resa, max_length=max(real))
            logits = fed.logits
            stats.rectifications += fed.rectified
            if fed.sparse:
                stats.kv_tokens_read += self._step_reads(cache.host_lengths[:B], sparse_cfg)
                stats.kv_tokens_read += cached if fed.rectified else 0
            else:
                stats.kv_tokens_read += cached + B
            stats.kv_tokens_dense += cached + B
            stats.decode_steps += 1
        stats.decode_seconds = _now(self.device) - t1
        if self.device.type == "cuda":
            stats.peak_memory_gib = torch.cuda.max_memory_allocated(self.device) / 2**30
        stats.new_tokens = [len(o) for o in outputs]
        texts = [self.tokenizer.decode(o) for o in outputs] if self.tokenizer is not None else [""] * B
        return GenerationResult(outputs, texts, reasons, stats, cache if keep_cache else None)

    def _default_eos(self) -> tuple[int, ...]:
        if self.tokenizer is not None and self.tokenizer.eos_token_ids:
            return tuple(self.tokenizer.eos_token_ids)
        return tuple(self.model.cfg.eos_token_ids)

    @staticmethod
    def _step_reads(lengths: Sequence[int], resa: ResaConfig | None) -> int:
        """K/V tokens one decode step reads, counting a block summary (min+max of K) as one token
        of K+V."""
        if resa is None:
            return sum(lengths)
        total = 0
        for n in lengths:
            nb = -(-n // resa.block_size)
            kept = block_budget(nb, resa.active_ratio, resa.min_blocks)
            total += min(kept * resa.block_size, n) + (nb if kept < nb else 0)
        return total


class CacheRunner:
    """An engine bound to one cache: the `resa.rectify.Runner` the rectification schedule drives.
    With CUDA graphs on, decode steps replay a graph captured on first use per setting."""

    def __init__(self, engine: Engine, cache: KVCache) -> None:
        self.engine, self.cache = engine, cache
        self.graphs: dict[ResaConfig | None, object] = {}
        self.window = None

    def step(self, tokens: torch.Tensor, resa: ResaConfig | None) -> torch.Tensor:
        if not self.engine.cuda_graphs:
            return self.engine.step(self.cache, tokens, resa)
        key = None if resa is None or resa.is_dense else resa
        if key not in self.graphs:
            from .graphs import GraphedDecode

            self.graphs[key] = GraphedDecode(self.engine.model, self.cache, key)
        return self.graphs[key](tokens).clone()

    def dense_window(self, tokens: torch.Tensor, overwrite: int) -> torch.Tensor:
        if not self.engine.cuda_graphs:
            return self.engine.dense_window(self.cache, tokens, overwrite)
        cache = self.cache
        W = tokens.shape[1]
        start = [n - overwrite for n in cache.host_lengths]
        if min(start) < 0 or max(start) + W > cache.capacity:
            raise ValueError(f"a window of {W} tokens rewriting {overwrite} does not fit rows of "
                             f"{cache.host_lengths} tokens in a cache of {cache.capacity}")
        if self.window is None:
            from .graphs import GraphedWindow

            self.window = GraphedWindow(self.engine.model, cache)
        logits = self.window(tokens.to(self.engine.device), overwrite).clone()
        cache.host_lengths = [s + W for s in start]
        return logits


def _find_stop(text: str, stops: Sequence[str], new_from: int) -> int | None:
    """Index where the first stop string that overlaps the new text begins, or None."""
    best = None
    for s in stops:
        if not s:
            continue
        i = text.find(s, max(0, new_from - len(s) + 1))
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
