"""The engine: a loaded model and tokenizer, runners with their caches (kept between calls of
the same batch bucket), and the public generation API over the one loop of `resa.generate`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from . import validate
from .blocks import CacheTooLargeError, block_hashes, shareable_blocks
from .cache import KVCache
from .config import ResaConfig
from .errors import UsageError
from .generate import Collector, GenerationStats, decode, wall_clock
from .model import Transformer
from .pool import KVPool, free_gpu_bytes
from .runner import Runner
from .sampling import SamplingConfig, make_generator, sample


class PromptTooLongError(UsageError):
    """The prompt (plus the requested new tokens) does not fit the model's context."""


# Memory a forward pass needs besides weights and the KV pool (activations of a prefill chunk,
# logits, CUDA graph pools), kept out of the pool's share of the GPU.
ACTIVATION_RESERVE_BYTES = 2 << 30


def compile_by_default(compile: bool | None, device: torch.device) -> bool:
    """Whether to torch.compile the decode step's layer halves: `compile` when given, else on CUDA
    (there they fuse the norms, RoPE and gating into a few kernels: 9.09 -> 7.46 ms per ReSA step
    of Qwen2.5-7B shapes at 128K, batch 4 on an H200, README "Speed"); on CPU the plain functions
    start at once (compiling there has not been measured to pay)."""
    return device.type == "cuda" if compile is None else bool(compile)


__all__ = ["Engine", "GenerationResult", "PromptTooLongError", "CacheTooLargeError"]


@dataclass
class GenerationResult:
    token_ids: list[list[int]]
    texts: list[str]
    finish_reasons: list[str]
    stats: GenerationStats
    runner: Runner | None = None  # with keep_cache: the runner and its cache, for inspection

    @property
    def cache(self) -> KVCache | None:
        return None if self.runner is None else self.runner.cache


TextCallback = Callable[[int, str], None]


class Engine:
    """A loaded model and tokenizer: the one entry point for generation, evaluation and benchmarks.

    `generate` / `generate_ids` prefill a batch and run the generation loop; `open` gives a
    `Runner` over a fresh cache for callers that prefill or fork contexts themselves, and
    `decode` runs the same loop from such a runner.

    KV memory: every runner of a block size takes its blocks from one paged pool (`kv_pool`),
    which grows on demand up to a limit: kv_cache_gib if given (then allocated at once), else on
    CUDA gpu_memory_utilization of the GPU's memory minus what is already in use and an
    activation reserve, on CPU half the machine's memory. prefix_caching: prompts reuse the
    cached blocks of a common prefix (docs/architecture.md, "Paged KV pool").
    """

    def __init__(self, model: Transformer, tokenizer=None, cuda_graphs: bool = True,
                 reuse_buffers: bool | None = None, *, prefix_caching: bool = True,
                 gpu_memory_utilization: float = 0.9, kv_cache_gib: float | None = None) -> None:
        validate.check_pool_args(gpu_memory_utilization=gpu_memory_utilization, kv_cache_gib=kv_cache_gib)
        self.model = model
        self.tokenizer = tokenizer
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        model.fuse_projections()
        # Decode steps replay CUDA graphs on GPUs (no host work per layer); CPU runs eagerly.
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        # Keep the last generation's runner (cache and captured graphs) for the next call with the
        # same batch bucket (see `_acquire`); on by default where there are graphs to keep.
        self.reuse_buffers = self.cuda_graphs if reuse_buffers is None else reuse_buffers
        self._pooled: Runner | None = None
        self.prefix_caching = prefix_caching
        self.gpu_memory_utilization = gpu_memory_utilization
        self.kv_cache_gib = kv_cache_gib
        self._pools: dict[int, KVPool] = {}

    @classmethod
    def load(cls, path: str | None = None, device: str = "cpu", dtype: torch.dtype | None = None,
             backend: str = "auto", cuda_graphs: bool = True, progress: Callable[[int, int], None] | None = None,
             compile: bool | None = None, **engine_kwargs) -> "Engine":
        """Load a HF folder or GGUF file (default: the embedded SmolLM2-135M-Instruct).
        progress(done, total): tensors converted so far, on a GGUF file's first load (its
        conversion; later loads read the cached result). compile: torch.compile the layer halves
        of decode steps and rectification windows (`Transformer.compile_decode`); None (default):
        on CUDA, not on CPU. engine_kwargs: the KV pool settings of `Engine` (prefix_caching,
        gpu_memory_utilization, kv_cache_gib)."""
        from .default_model import default_model_path
        from .loader import load_checkpoint

        dev, dtype, backend = validate.check_load_args(device=device, dtype=dtype, backend=backend)
        unknown = set(engine_kwargs) - {"prefix_caching", "gpu_memory_utilization", "kv_cache_gib", "reuse_buffers"}
        if unknown:
            raise UsageError(f"Engine.load got unknown settings {sorted(unknown)}; the KV pool settings are "
                             "prefix_caching, gpu_memory_utilization, kv_cache_gib (and reuse_buffers)")
        validate.check_pool_args(gpu_memory_utilization=engine_kwargs.get("gpu_memory_utilization", 0.9),
                                 kv_cache_gib=engine_kwargs.get("kv_cache_gib"))
        ckpt = load_checkpoint(path if path is not None else default_model_path(), progress)
        if dtype is None:
            dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        with torch.device("meta"):
            model = Transformer(ckpt.config, backend=backend)
        model = model.to_empty(device=dev).to(dtype)
        model.load_weights(ckpt.tensors)
        model.eval()
        if compile_by_default(compile, dev):
            model.compile_decode()
        return cls(model, ckpt.tokenizer, cuda_graphs=cuda_graphs, **engine_kwargs)

    @property
    def context_length(self) -> int:
        return self.model.cfg.max_position_embeddings

    # ---- runners ----

    def kv_pool(self, block_size: int = 16, blocks_hint: int = 0) -> KVPool:
        """The KV pool of `block_size`, created on first use (at least `blocks_hint` blocks)."""
        pool = self._pools.get(block_size)
        if pool is None:
            cfg = self.model.cfg
            per_block = KVPool.bytes_per_block(cfg.num_layers, cfg.num_kv_heads, block_size, cfg.head_dim,
                                               torch.empty((), dtype=self.dtype).element_size())
            allowed = self.kv_memory_allowed()
            limit = allowed // per_block
            if limit < 1:
                raise CacheTooLargeError(
                    f"the KV pool may use {allowed / 2**20:.1f} MiB, less than one block of {block_size} tokens in "
                    f"every layer ({per_block / 2**20:.2f} MiB); allow it more memory (gpu_memory_utilization / "
                    "kv_cache_gib) or free GPU memory")
            if blocks_hint > limit:
                raise CacheTooLargeError(
                    f"the KV cache needs {blocks_hint * per_block / 2**30:.1f} GiB but the pool may use "
                    f"{limit * per_block / 2**30:.1f} GiB; use fewer prompts, shorter prompts or fewer new "
                    "tokens (or allow more: gpu_memory_utilization / kv_cache_gib)")
            start = limit if self.kv_cache_gib is not None else max(blocks_hint, min(limit, 64))
            pool = KVPool(cfg.num_layers, start, cfg.num_kv_heads, block_size, cfg.head_dim, self.dtype,
                          self.device, max_blocks=limit)
            self._pools[block_size] = pool
        return pool

    def kv_memory_allowed(self) -> int:
        """Bytes a new KV pool may take (see the class docstring)."""
        if self.kv_cache_gib is not None:
            return int(self.kv_cache_gib * 2**30)
        if self.device.type == "cuda":
            total = torch.cuda.mem_get_info(self.device)[1]
            free = free_gpu_bytes(self.device)
            return max(0, int(self.gpu_memory_utilization * total) - (total - free) - ACTIVATION_RESERVE_BYTES)
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2

    def open(self, batch: int, capacity: int, block_size: int = 16) -> Runner:
        """A runner of `batch` empty rows of up to `capacity` tokens over the engine's KV pool;
        a clear error (instead of an allocator crash) when that many full rows cannot fit."""
        need = batch * -(-capacity // block_size)
        pool = self.kv_pool(block_size, need)
        if need > pool.available():
            raise CacheTooLargeError(
                f"the KV cache for batch {batch} x {capacity} tokens needs {need * pool.block_bytes / 2**30:.1f} "
                f"GiB but the pool has {pool.available() * pool.block_bytes / 2**30:.1f} GiB free; use fewer "
                "prompts, shorter prompts or fewer new tokens")
        return self._runner(pool, batch, capacity)

    def _runner(self, pool: KVPool, batch: int, capacity: int) -> Runner:
        return Runner(self.model, KVCache(pool, batch, capacity), cuda_graphs=self.cuda_graphs)

    def release_buffers(self) -> None:
        """Free the runner kept from the last generation (its CUDA graphs) and the KV pools no
        runner holds blocks of (cached prefixes included)."""
        self._pooled = None
        for bs in [bs for bs, pool in self._pools.items() if pool.allocator.num_held == 0]:
            del self._pools[bs]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _acquire(self, batch: int, need: int, block_size: int, keep: bool) -> Runner:
        """An empty runner of at least `batch` rows of up to `need` tokens.

        With reuse_buffers, rows come in power-of-two buckets (extra rows decode a 1-token dummy
        prompt: nearly free, decoding is bound by the weights) and the capacity is rounded up to
        4096 tokens, so later calls of a similar size reuse the runner and its captured graphs
        instead of capturing new ones. Blocks are only taken as rows grow, so the rounding costs
        no KV memory.
        """
        if not self.reuse_buffers or keep:
            return self._runner(self.kv_pool(block_size), batch, need)
        rows = 1 << (batch - 1).bit_length()
        pooled = self._pooled
        if pooled is not None and pooled.batch == rows and pooled.capacity >= need \
                and pooled.cache.block_size == block_size:
            pooled.reset()
            return pooled
        self._pooled = None
        capacity = max(need, min(-(-need // 4096) * 4096, self.context_length))
        runner = self._runner(self.kv_pool(block_size), rows, capacity)
        self._pooled = runner
        return runner

    # ---- generation ----

    def encode(self, prompts: Sequence[str], chat: bool) -> list[list[int]]:
        if self.tokenizer is None:
            raise UsageError("this engine has no tokenizer; pass token ids to generate_ids")
        out = []
        for p in prompts:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": p}]) if chat else p
            out.append(self.tokenizer.encode(text))
        return out

    def generate(self, prompts: Sequence[str], *, chat: bool = False, stop: Sequence[str] = (),
                 on_text: TextCallback | None = None, **kwargs) -> GenerationResult:
        """Generate for a batch of text prompts; see `generate_ids` for the settings.
        on_text(row, piece) receives decoded text as it is produced."""
        from .stops import StopText
        from .tokenizer import StreamDecoder

        prompts = validate.check_prompts(prompts)
        stop = validate.check_stop(stop)
        prompt_ids = self.encode(prompts, chat)
        decoders = [StreamDecoder(self.tokenizer) for _ in prompt_ids]
        texts = [StopText(stop) for _ in prompt_ids]

        def show(row: int, piece: str) -> None:
            if on_text is not None and piece:
                on_text(row, piece)

        def on_token(row: int, token: int) -> bool:
            piece, stopped = texts[row].push(decoders[row].push(token))
            show(row, piece)
            return stopped

        result = self.generate_ids(prompt_ids, on_token=on_token, **kwargs)
        for row, text in enumerate(texts):
            if text.stopped:
                result.finish_reasons[row] = "stop"
                continue
            piece, stopped = text.push(decoders[row].flush())
            show(row, piece + text.flush())
            if stopped:
                result.finish_reasons[row] = "stop"
        texts = [t.text for t in texts]
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
        on_prefill: Callable[[int, int], None] | None = None,
    ) -> GenerationResult:
        """Prefill the prompts densely and generate up to max_new_tokens per row (see `decode`).
        keep_cache returns the runner and its KV cache (for inspection). on_prefill(done, total)
        is called after each prefill chunk (prompt tokens computed so far, and in all)."""
        validate.check_generation_args(resa=resa, sampling=sampling, max_new_tokens=max_new_tokens,
                                       sync_every=sync_every)
        prompt_ids = validate.check_prompt_ids(prompt_ids, self.model.cfg.vocab_size)
        lens = [len(p) for p in prompt_ids]
        need = max(lens) + max_new_tokens
        if need > self.context_length:
            raise PromptTooLongError(
                f"prompt of {max(lens)} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                f"context of {self.context_length} tokens; shorten the prompt or lower max_new_tokens"
            )
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        # Mode "verify" drafts past a row's last token: room for one longest round more.
        slack = resa.draft_max + 1 if resa.mode == "verify" else 0
        runner = self._acquire(len(lens), need + slack, resa.block_size, keep_cache)
        # Rows past the prompts (a batch bucket's spare rows) decode a 1-token dummy prompt.
        rows = list(prompt_ids) + [[0]] * (runner.batch - len(lens))
        self._check_pool_fits(runner, rows, max_new_tokens)
        capture0, hits0 = runner.capture_seconds, runner.prefix_hits
        try:
            t0 = wall_clock(self.device)
            logits = runner.prefill(rows, resa.prefill_chunk, share=self.prefix_caching, progress=on_prefill)
            prefill_seconds = wall_clock(self.device) - t0
            result = self.decode(runner, logits, resa=resa, sampling=sampling, max_new_tokens=max_new_tokens,
                                 eos_token_ids=eos_token_ids, on_token=on_token, sync_every=sync_every,
                                 rows=len(lens), keep=keep_cache)
        finally:
            if not keep_cache:
                runner.reset()  # the rows' blocks go back to the pool at once
        result.stats.prefill_seconds = prefill_seconds
        result.stats.capture_seconds = runner.capture_seconds - capture0
        result.stats.prefix_cached_tokens = runner.prefix_hits - hits0
        return result

    def _check_pool_fits(self, runner: Runner, rows: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        """A clear error before any work when the rows' blocks (prompt + new tokens, less what the
        prefix cache and shared prefixes save) cannot fit the pool."""
        cache, pool = runner.cache, runner.cache.pool
        need = sum(cache.blocks_for(len(r) + max_new_tokens) for r in rows)
        if need > pool.available() and self.prefix_caching:
            bs = cache.block_size
            need -= pool.allocator.blocks_saved([block_hashes(r, bs)[:shareable_blocks(len(r), bs)] for r in rows])
        if need > pool.available():
            gib = pool.block_bytes / 2**30
            raise CacheTooLargeError(
                f"this batch needs {need * gib:.1f} GiB of KV blocks but the pool has {pool.available() * gib:.1f} "
                "GiB free; use fewer prompts, shorter prompts or fewer new tokens (or allow the pool more "
                "memory: gpu_memory_utilization / kv_cache_gib)")
        pool.ensure_free(need)  # one growth now rather than one per row during the prefill

    def decode(
        self,
        runner: Runner,
        logits: torch.Tensor,
        *,
        resa: ResaConfig = ResaConfig(),
        sampling: SamplingConfig = SamplingConfig(),
        max_new_tokens: int = 128,
        eos_token_ids: Sequence[int] | None = None,
        on_token: Callable[[int, int], bool] | None = None,
        sync_every: int | None = None,
        rows: int | None = None,
        keep: bool = True,
    ) -> GenerationResult:
        """Generate from a prefilled runner (its rows' contexts) with the one generation loop.

        logits: [B, V] of each row's last cached token (e.g. what `Runner.extend` returned).
        Rows stop at an EOS id (default: the tokenizer's/model's); a finished row's output ends
        there while the other rows go on; on_token(row, id) may return True to stop a row.
        sync_every: sampled tokens stay on the device and reach the host (EOS and stop checks,
        on_token) in groups of this many, so the decode loop does not wait for the GPU every
        token (default 16 on CUDA, 1 on CPU). rows: only the first `rows` rows are output.
        """
        validate.check_generation_args(resa=resa, sampling=sampling, max_new_tokens=max_new_tokens,
                                       sync_every=sync_every)
        eos_token_ids = validate.check_token_ids("eos_token_ids", eos_token_ids, self.model.cfg.vocab_size)
        if not isinstance(runner, Runner):
            raise UsageError(f"runner must be a resa.Runner (from Engine.open), got {type(runner).__name__}")
        if tuple(logits.shape) != (runner.batch, self.model.cfg.vocab_size):
            raise UsageError(f"logits must be [{runner.batch}, {self.model.cfg.vocab_size}] (one row per runner "
                             f"row, e.g. what Runner.extend returned), got {list(logits.shape)}")
        if sync_every is None:
            sync_every = 16 if self.device.type == "cuda" else 1
        rows = runner.batch if rows is None else rows
        if eos_token_ids is None:
            eos_token_ids = self._default_eos()
        sink = Collector(rows, eos_token_ids, on_token)
        gen = make_generator(sampling, self.device)
        stats = decode(runner, logits, resa=resa, pick=lambda lg, t: sample(lg, sampling, gen), sink=sink,
                       max_new_tokens=max_new_tokens, rows=rows, sync_every=sync_every, sampling=sampling,
                       generator=gen)
        if self.device.type == "cuda":
            stats.peak_memory_gib = torch.cuda.max_memory_allocated(self.device) / 2**30
        stats.new_tokens = [len(o) for o in sink.outputs]
        texts = [self.tokenizer.decode(o) for o in sink.outputs] if self.tokenizer is not None else [""] * rows
        return GenerationResult(sink.outputs, texts, sink.reasons, stats, runner if keep else None)

    def _default_eos(self) -> tuple[int, ...]:
        if self.tokenizer is not None and self.tokenizer.eos_token_ids:
            return tuple(self.tokenizer.eos_token_ids)
        return tuple(self.model.cfg.eos_token_ids)

