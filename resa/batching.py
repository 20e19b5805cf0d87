"""Continuous batching: requests join and leave a running batch between decode steps
(docs/architecture.md, "Continuous batching").

A `Batcher` owns one runner of `max_num_seqs` rows (slots) over the engine's KV pool. Each
iteration (`step`):

1. cancelled requests give their slot and blocks back;
2. waiting requests are admitted in arrival order into free slots while the pool can hold every
   admitted request's worst case (prompt + max_tokens, less the cached prefix blocks it takes);
3. prefill: admitted prompts get up to `max_num_batched_tokens` prompt tokens in all, oldest
   first, each in a pass of its own over a one-row runner of the same pool (no padding to the
   longest prompt); a prompt whose last chunk ran samples its first token, and its blocks move
   into its slot of the decode runner (no copy);
4. decode: every other request feeds its newest token as its own rectification schedule says
   (`resa.rectify.schedule` of its own token index and length): the requests due for a
   rectification are rectified together in one dense window pass, the rest take one decode step
   together (one pass per distinct sparse setting); rows that sit a pass out are masked, so a
   pass has static shapes and replays one CUDA graph whatever the mix;
5. sampled tokens are checked (EOS, stop strings, max_tokens) and handed to the request's
   `on_output`; a finished request's blocks return to the pool at once.

Token for token this is what `Engine.generate` gives each prompt alone (the tests hold it to
that); only the time each token takes changes. `step` is not thread-safe; `submit` and `cancel`
are, and `start` runs the loop on a background thread (what the server uses).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from . import validate
from .blocks import CacheTooLargeError, block_hashes, shareable_blocks
from .config import ResaConfig
from .cost import feed_reads
from .errors import UsageError
from .generate import feed_rows
from .rectify import schedule
from .runner import Runner
from .sampling import SamplingConfig, make_generator, sample

__all__ = ["Batcher", "Request", "RequestStats", "QueueFullError", "BatcherCounters"]


class QueueFullError(UsageError):
    """The batcher's waiting queue is full: retry later."""


@dataclass
class RequestStats:
    """What one request cost and when its tokens came (time.monotonic() seconds)."""

    prompt_tokens: int
    arrival: float
    cached_tokens: int = 0          # prompt tokens taken from the prefix cache
    completion_tokens: int = 0
    decode_steps: int = 0
    rectifications: int = 0
    kv_tokens_read: int = 0
    kv_tokens_dense: int = 0
    first_token: float | None = None
    finished: float | None = None

    @property
    def kv_read_fraction(self) -> float:
        """K/V the request's decode attention read over what dense decoding would have read."""
        return self.kv_tokens_read / self.kv_tokens_dense if self.kv_tokens_dense else 1.0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival


# on_output(request, new_token_ids, new_text): called on the batcher's thread after every token a
# request produces, and once more (maybe with nothing new) when it finishes.
OutputCallback = Callable[["Request", list, str], None]

_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One generation request. The batcher fills in output_ids, text, finish_reason ("eos",
    "stop", "length", "cancelled" or "error", with `error` saying why) and stats."""

    prompt_ids: Sequence[int]
    max_tokens: int = 128
    sampling: SamplingConfig = SamplingConfig()
    resa: ResaConfig = ResaConfig()
    stop: Sequence[str] = ()
    eos_token_ids: Sequence[int] | None = None
    on_output: OutputCallback | None = None
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    stats: RequestStats | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class BatcherCounters:
    """Running totals (what the server's /metrics exports)."""

    requests_finished: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    rectification_passes: int = 0   # dense window passes (each may rectify several requests)
    rectifications: int = 0         # request windows rectified
    kv_tokens_read: int = 0
    kv_tokens_dense: int = 0
    iterations: int = 0


class _Live:
    """The batcher's state of one admitted request."""

    def __init__(self, req: Request, device: torch.device, tokenizer, eos: set[int]) -> None:
        from .stops import StopText
        from .tokenizer import StreamDecoder

        self.req = req
        self.slot = -1
        self.prefill: Runner | None = None   # the one-row runner its prompt is computed in
        self.hashes: list[bytes] = []
        self.computed = 0                    # prompt tokens in the cache
        self.generated: list[int] = []       # sampled tokens (EOS included), fed one per step
        self.gen = make_generator(req.sampling, device)
        self.decoder = StreamDecoder(tokenizer) if tokenizer is not None else None
        self.text = StopText(req.stop)  # the released text (stop strings held back and cut)
        self.eos = eos
        self.last_token_time = 0.0

    @property
    def decoding(self) -> bool:
        return self.prefill is None

    def outstanding(self, block_size: int, held: int) -> int:
        """Blocks it may still allocate: its worst case less what it holds."""
        return -(-(len(self.req.prompt_ids) + self.req.max_tokens) // block_size) - held


class Batcher:
    """Continuous batching of `Request`s over one engine (see the module docstring).

    max_num_seqs: requests decoding at once (rows of the decode runner). max_model_len: the
    most tokens (prompt + max_tokens) one request may hold (default: the model's context).
    max_num_batched_tokens: prompt tokens prefilled per iteration, across requests: smaller keeps
    the running streams' inter-token latency low while a long prompt is prefilled, larger gives a
    shorter time to first token. max_waiting: requests queued beyond the running ones before
    `submit` refuses (QueueFullError). block_size: the KV block size of every request (its
    `resa.block_size` must match).
    """

    def __init__(self, engine, *, max_num_seqs: int = 16, max_model_len: int | None = None,
                 max_num_batched_tokens: int = 2048, max_waiting: int = 1024, block_size: int = 16) -> None:
        for name, value in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens),
                            ("max_waiting", max_waiting), ("block_size", block_size)):
            validate._positive_int(name, value)
        if max_model_len is None:
            max_model_len = engine.context_length
        validate._positive_int("max_model_len", max_model_len)
        if max_model_len > engine.context_length:
            raise UsageError(f"max_model_len {max_model_len} exceeds the model's context of {engine.context_length} "
                             "tokens")
        self.engine = engine
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        self.max_num_batched_tokens, self.max_waiting = max_num_batched_tokens, max_waiting
        self.block_size = block_size
        self.pool = engine.kv_pool(block_size)
        if engine.device.type == "cuda" and self.pool.max_blocks is not None:
            # Serving: take the whole pool now rather than copying it while requests run.
            self.pool.grow(self.pool.max_blocks)
        self.runner = engine._runner(self.pool, max_num_seqs, max_model_len)
        self.slots: list[_Live | None] = [None] * max_num_seqs
        self.waiting: deque[_Live] = deque()
        self.counters = BatcherCounters()
        self._lock = threading.Condition()
        self._incoming: deque[Request] = deque()
        self._cancelled: set[str] = set()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._draining = False
        # observe(name, seconds): "ttft" and "itl" samples, e.g. for latency histograms.
        self.observe: Callable[[str, float], None] | None = None

    # ---- thread-safe API ----

    def submit(self, request: Request) -> Request:
        """Queue a request (checked now: a request that can never run is refused with a clear
        error, a full queue with QueueFullError). Returns it; its on_output reports progress."""
        self.check(request)
        with self._lock:
            if self._draining:
                raise QueueFullError("the server is shutting down and takes no new requests")
            if len(self._incoming) + len(self.waiting) >= self.max_waiting:
                raise QueueFullError(f"{self.max_waiting} requests are already waiting; retry later")
            request.stats = RequestStats(len(request.prompt_ids), time.monotonic())
            self._incoming.append(request)
            self._lock.notify_all()
        return request

    def cancel(self, request_id: str) -> None:
        """Stop a request (waiting or running): its blocks are freed at the next iteration and it
        finishes with finish_reason "cancelled"."""
        with self._lock:
            self._cancelled.add(request_id)
            self._lock.notify_all()

    def check(self, request: Request) -> None:
        """The errors `submit` raises for a request that can never run."""
        from .engine import PromptTooLongError

        if not isinstance(request, Request):
            raise UsageError(f"submit takes a resa.batching.Request, got {type(request).__name__}")
        validate.check_generation_args(resa=request.resa, sampling=request.sampling, max_new_tokens=request.max_tokens)
        (ids,) = validate.check_prompt_ids([request.prompt_ids], self.engine.model.cfg.vocab_size)
        request.prompt_ids = ids
        request.stop = validate.check_stop(request.stop)
        request.eos_token_ids = validate.check_token_ids("eos_token_ids", request.eos_token_ids,
                                                         self.engine.model.cfg.vocab_size)
        self.check_resa(request.resa)
        total = len(ids) + request.max_tokens
        if total > self.max_model_len:
            raise PromptTooLongError(
                f"the prompt ({len(ids)} tokens) + max_tokens ({request.max_tokens}) = {total} tokens exceeds the "
                f"maximum of {self.max_model_len}; shorten the prompt or lower max_tokens")
        need = -(-total // self.block_size)
        limit = self.pool.max_blocks
        if limit is not None and need > limit - 1:  # one block may be the decode runner's sink
            raise CacheTooLargeError(
                f"the request needs {need * self.pool.block_bytes / 2**30:.2f} GiB of KV blocks, more than the whole "
                f"pool ({limit * self.pool.block_bytes / 2**30:.2f} GiB); shorten the prompt or lower max_tokens")

    def check_resa(self, resa: ResaConfig) -> None:
        """The ReSA settings a continuous batch runs: its block size, and a fixed cadence (mode
        "verify" and rectify_every="auto" run through `Engine.generate` for now)."""
        if resa.block_size != self.block_size:
            raise UsageError(f"this batcher's KV blocks hold {self.block_size} tokens; a request's block_size must "
                             f"match (got {resa.block_size})")
        if resa.mode == "verify" or resa.rectify_auto:
            raise UsageError('continuous batching runs modes dense, sparse and resa with a fixed rectify_every; '
                             'mode="verify" and rectify_every="auto" run through Engine.generate (resa generate)')

    def start(self) -> None:
        """Run the batching loop on a background thread until `shutdown`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="resa-batcher", daemon=True)
            self._thread.start()

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the loop: with drain, admit nothing new and finish what is queued and running;
        else cancel it all. Waits for the loop thread (at most `timeout` seconds)."""
        with self._lock:
            self._draining = True
            if not drain:
                for r in list(self._incoming) + [a.req for a in self.waiting] + [a.req for a in self.slots if a]:
                    self._cancelled.add(r.id)
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- state ----

    @property
    def alive(self) -> bool:
        """The background loop (`start`) is running."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_running(self) -> int:
        return sum(a is not None for a in self.slots)

    @property
    def num_waiting(self) -> int:
        with self._lock:
            return len(self.waiting) + len(self._incoming)

    def has_work(self) -> bool:
        with self._lock:
            return self._pending()

    def _pending(self) -> bool:
        """Anything queued, cancelled or running (the caller holds the lock)."""
        return bool(self._incoming or self.waiting or self._cancelled) or self.num_running > 0

    def blocks_in_use(self) -> int:
        """Pool blocks held by requests (the decode runner's sink block excluded)."""
        sink = self.runner.cache.sink is not None
        return self.pool.allocator.num_held - sink

    # ---- the loop ----

    def run_until_done(self) -> None:
        """Iterate until nothing is queued or running (synchronous use, tests)."""
        while self.has_work():
            self.step()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._pending() or self._stopping):
                    self._lock.wait()
                if self._stopping and not self._pending():
                    return
            try:
                self.step()
            except Exception as exc:  # a failed pass: fail what ran, keep serving
                self._fail_all(f"{type(exc).__name__}: {exc}")

    def step(self) -> None:
        """One iteration: cancellations, admissions, a prefill budget, one decode token per
        running request."""
        with self._lock:
            incoming, self._incoming = self._incoming, deque()
            cancelled, self._cancelled = self._cancelled, set()
        tokenizer = self.engine.tokenizer
        for req in incoming:
            eos = set(req.eos_token_ids if req.eos_token_ids is not None else self.engine._default_eos())
            self.waiting.append(_Live(req, self.engine.device, tokenizer, eos))
        if cancelled:
            for a in [a for a in self.waiting if a.req.id in cancelled]:
                self.waiting.remove(a)
                self._finish(a, "cancelled")
            for a in [a for a in self.slots if a is not None and a.req.id in cancelled]:
                self._finish(a, "cancelled")
        self._admit()
        self._prefill()
        self._decode()
        self.counters.iterations += 1

    def _admit(self) -> None:
        bs = self.block_size
        while self.waiting and None in self.slots:
            a = self.waiting[0]
            prompt = a.req.prompt_ids
            a.prefill = self.engine._runner(self.pool, 1, len(prompt))
            a.hashes = block_hashes(prompt, bs) if self.engine.prefix_caching else []
            cached = self._take_cached(a)
            outstanding = sum(b.outstanding(bs, self._held(b)) for b in self.slots if b is not None)
            if a.outstanding(bs, self._held(a)) + outstanding > self.pool.available():
                a.prefill.cache.release()
                a.prefill, a.computed = None, 0
                return  # the oldest waits for blocks; later ones wait behind it
            self.waiting.popleft()
            a.slot = self.slots.index(None)
            self.slots[a.slot] = a
            self._count_cached(a, cached)
            self.counters.prompt_tokens += len(prompt)

    def _held(self, a: _Live) -> int:
        return len(a.prefill.cache.blocks[0]) if a.prefill is not None else len(self.runner.cache.blocks[a.slot])

    def _prefill(self) -> None:
        budget = self.max_num_batched_tokens
        order = sorted((a for a in self.slots if a is not None and not a.decoding), key=lambda a: a.req.stats.arrival)
        for a in order:
            if budget <= 0:
                break
            # Older prompts went first: blocks of a shared prefix one of them just computed are
            # taken, not computed again (prompts that arrive together leapfrog through it).
            self._count_cached(a, self._take_cached(a))
            prompt = a.req.prompt_ids
            n = min(len(prompt) - a.computed, budget)
            budget -= n
            logits = a.prefill.extend([prompt[a.computed:a.computed + n]], n)
            a.computed += n
            if a.hashes:
                done = a.computed // self.block_size
                self.pool.allocator.register(a.prefill.cache.blocks[0][:done], a.hashes[:done])
            if a.computed == len(prompt):
                self._to_slot(a)
                self._emit(a, self._pick(a, logits[0:1]))

    def _take_cached(self, a: _Live) -> int:
        """Take the cached blocks that continue a's prompt where its prefill stands (at a block
        boundary): at admission, and before each chunk (what other prompts cached since).
        Returns the prompt tokens taken."""
        bs = self.block_size
        k, usable = a.computed // bs, shareable_blocks(len(a.req.prompt_ids), bs)
        if not a.hashes or a.computed % bs or k >= usable:
            return 0
        taken = self.pool.allocator.lookup(a.hashes[k:usable])
        if taken:
            a.prefill.cache.attach(0, taken)
            a.computed += len(taken) * bs
            a.prefill.lengths = [a.computed]
            a.prefill.cache.lengths.fill_(a.computed)
        return len(taken) * bs

    def _count_cached(self, a: _Live, tokens: int) -> None:
        a.req.stats.cached_tokens += tokens
        self.counters.prefix_cache_hit_tokens += tokens

    def _to_slot(self, a: _Live) -> None:
        """Move a prefilled prompt's blocks into its row of the decode runner (no copy)."""
        src, dst = a.prefill.cache, self.runner.cache
        dst.attach(a.slot, src.blocks[0])
        src.blocks[0] = []
        self.runner.lengths[a.slot] = a.computed
        dst.lengths[a.slot] = a.computed
        a.prefill = None

    def _decode(self) -> None:
        live = {a.slot: a for a in self.slots if a is not None and a.decoding}
        if not live:
            return
        r = self.runner
        before = {b: r.lengths[b] for b in live}
        feeds = {b: (schedule(len(a.generated) - 1, a.req.resa, before[b]), a.req.resa) for b, a in live.items()}

        def tokens(rows: list[int], lo: int, hi: int) -> torch.Tensor:
            out = torch.zeros(self.max_num_seqs, hi - lo, dtype=torch.int64)
            for b in rows:
                g = live[b].generated
                out[b] = torch.tensor(g[len(g) + lo:len(g) + hi], dtype=torch.int64)
            return out

        passes = r.window_passes
        outs = feed_rows(r, feeds, tokens)
        self.counters.rectification_passes += r.window_passes - passes
        for b, a in live.items():
            st, (feed, resa) = a.req.stats, feeds[b]
            read = feed_reads(feed, before[b], r.lengths[b], resa)
            st.decode_steps += 1
            st.kv_tokens_dense += r.lengths[b]
            st.kv_tokens_read += read
            self.counters.kv_tokens_read += read
            self.counters.kv_tokens_dense += r.lengths[b]
            if feed.rectifies:
                st.rectifications += 1
                self.counters.rectifications += 1
        for rows, logits in outs:
            group = [live[b] for b in rows]
            for a, token in zip(group, self._pick_rows(group, logits)):
                self._emit(a, token)

    def _pick(self, a: _Live, logits: torch.Tensor) -> int:
        return int(sample(logits, a.req.sampling, a.gen)[0])

    def _pick_rows(self, group: list[_Live], logits: torch.Tensor) -> list[int]:
        """The next token of each request of a pass from its row of logits [B, V]: greedy rows
        in one argmax and one transfer, sampled rows each with their own generator."""
        greedy = [i for i, a in enumerate(group) if a.req.sampling.greedy]
        out = [0] * len(group)
        if greedy:
            rows = torch.tensor([group[i].slot for i in greedy], device=logits.device)
            for i, tok in zip(greedy, logits[rows].argmax(-1).tolist()):
                out[i] = tok
        for i, a in enumerate(group):
            if not a.req.sampling.greedy:
                out[i] = self._pick(a, logits[a.slot:a.slot + 1])
        return out

    def _emit(self, a: _Live, token: int) -> None:
        """Deliver one sampled token; finish the request at EOS, a stop string or max_tokens."""
        req, now = a.req, time.monotonic()
        a.generated.append(token)
        if req.stats.first_token is None:
            req.stats.first_token = now
            if self.observe is not None:
                self.observe("ttft", now - req.stats.arrival)
        elif self.observe is not None:
            self.observe("itl", now - a.last_token_time)
        a.last_token_time = now
        if token in a.eos:
            self._finish(a, "eos")
            return
        req.output_ids.append(token)
        req.stats.completion_tokens += 1
        self.counters.generation_tokens += 1
        piece, stopped = a.text.push(a.decoder.push(token) if a.decoder is not None else "")
        req.text = a.text.text
        reason = "stop" if stopped else None
        if reason is None and len(a.generated) >= req.max_tokens:
            reason = "length"
        if req.on_output is not None:
            req.on_output(req, [token], piece)
        if reason is not None:
            self._finish(a, reason, flush=reason == "length")

    def _finish(self, a: _Live, reason: str, *, flush: bool = True, error: str | None = None) -> None:
        """End a request: its slot and blocks go back at once; on_output hears the last text."""
        req = a.req
        if a.slot >= 0 and self.slots[a.slot] is a:
            if a.prefill is not None:
                a.prefill.cache.release()
                a.prefill = None
            else:
                self.runner.cache.release([a.slot])
                self.runner.lengths[a.slot] = 0
                self.runner.cache.lengths[a.slot] = 0
            self.slots[a.slot] = None
        tail = ""
        if reason != "stop":  # the rest of the text (a stop string never began in it)
            if flush and a.decoder is not None and reason in ("eos", "length"):
                tail, _ = a.text.push(a.decoder.flush())
            tail += a.text.flush()
            req.text = a.text.text
        req.finish_reason, req.error = reason, error
        req.stats.finished = time.monotonic()
        self.counters.requests_finished += 1
        if req.on_output is not None:
            req.on_output(req, [], tail)

    def _fail_all(self, message: str) -> None:
        """After a failed pass: every admitted request ends with an error; the rows are reset."""
        for a in [a for a in self.slots if a is not None]:
            try:
                self._finish(a, "error", flush=False, error=message)
            except Exception:
                self.slots[a.slot] = None
        self.runner.reset()

