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
   (`resa.rectify.schedule` of its own token index and length; with rectify_every="auto", its
   own `resa.adaptive.Cadence`, whose f follows the agreement its own windows measure): the
   requests due for a rectification are rectified together in one dense window pass, the rest
   take one decode step together (one pass per distinct sparse setting); rows that sit a pass
   out are masked, so a pass has static shapes and replays one CUDA graph whatever the mix;
5. sampled tokens are checked (EOS, stop strings, max_tokens) and handed to the request's
   `on_output`; a finished request's blocks return to the pool at once.

A request of mode "verify" (docs/method.md section 7) runs its rounds inside the same
iterations: its draft steps share the iteration's sparse step pass, its verification is a dense
window over its pending token and drafts (sharing the pass of every row with the same window
width), and after that pass its accepted drafts and the dense model's next token are emitted
and the rest rolled back. Its draft length adapts to its own acceptance rate.

Token for token this is what `Engine.generate` gives each prompt alone (the tests hold it to
that); only the time each token takes changes. `step` is not thread-safe; `submit` and `cancel`
are, and `start` runs the loop on a background thread (what the server uses).
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from . import validate
from .adaptive import Cadence
from .blocks import CacheTooLargeError, block_hashes, shareable_blocks
from .config import ResaConfig
from .cost import dense_reads, feed_reads
from .errors import UsageError
from .generate import feed_rows
from .rectify import Feed, schedule
from .runner import Runner
from .sampling import SamplingConfig, make_generator, sample
from .verify import DraftLength, accept, draft, draft_width, step_cost, step_weights

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
    decode_steps: int = 0             # passes that fed the request a token (draft steps included)
    rectifications: int = 0
    verify_windows: int = 0           # mode "verify": verification passes, drafts proposed and kept
    drafted: int = 0
    accepted: int = 0
    rectify_widths: list[int] = field(default_factory=list)  # f of each rectification, in order
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
        resa = req.resa
        self.cadence = Cadence(resa) if resa.rectify_auto and resa.rectifies and not resa.is_dense else None
        self.round = _Round(resa) if resa.mode == "verify" and not resa.is_dense else None
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


class _Round:
    """A verify-mode request's current round: its draft length w (None between rounds), the
    drafts so far and their distributions, the cache length it started from, the verification
    pass's logits once it ran."""

    def __init__(self, resa: ResaConfig) -> None:
        self.control = DraftLength(resa.draft_min, resa.draft_max, 1)
        self.w: int | None = None
        self.start = 0
        self.drafts: list[int] = []
        self.probs: list[torch.Tensor] = []
        self.dense: torch.Tensor | None = None  # [1, w + 1, V]

    def reset(self) -> None:
        self.w, self.drafts, self.probs, self.dense = None, [], [], None


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
        """The ReSA settings a continuous batch runs: its block size."""
        if resa.block_size != self.block_size:
            raise UsageError(f"this batcher's KV blocks hold {self.block_size} tokens; a request's block_size must "
                             f"match (got {resa.block_size})")

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
        feeds = {b: (self._feed(a, before[b]), a.req.resa) for b, a in live.items()}
        # Requests under rectify_every="auto" measure the agreement of the windows they take now,
        # verify-mode requests check their drafts with theirs (all-position logits of those
        # passes only).
        auto = {b for b, a in live.items() if a.cadence is not None and feeds[b][0].rectifies}
        checks = {b for b, a in live.items() if a.round is not None and feeds[b][0].window}

        def on_window(rows: list[int], feed, logits: torch.Tensor) -> None:
            for b in rows:
                a = live[b]
                if b in auto:
                    history = torch.tensor(a.generated, dtype=torch.int64, device=logits.device)[None]
                    a.cadence.observe(len(a.generated) - 1, feed, logits[b:b + 1], history, 1)
                if b in checks:
                    a.round.dense = logits[b:b + 1]

        def tokens(rows: list[int], lo: int, hi: int) -> torch.Tensor:
            out = torch.zeros(self.max_num_seqs, hi - lo, dtype=torch.int64)
            for b in rows:
                a = live[b]
                g = a.generated + a.round.drafts if a.round is not None else a.generated
                out[b] = torch.tensor(g[len(g) + lo:len(g) + hi], dtype=torch.int64)
            return out

        passes = r.window_passes
        outs = feed_rows(r, feeds, tokens, on_window if auto or checks else None)
        self.counters.rectification_passes += r.window_passes - passes
        for b, a in live.items():
            st, (feed, resa) = a.req.stats, feeds[b]
            read = feed_reads(feed, before[b], r.lengths[b], resa)
            st.decode_steps += 1
            st.kv_tokens_read += read
            self.counters.kv_tokens_read += read
            if a.round is None:  # verify rows count what dense decoding reads when they emit
                st.kv_tokens_dense += r.lengths[b]
                self.counters.kv_tokens_dense += r.lengths[b]
            if feed.rectifies and a.round is None:
                st.rectifications += 1
                st.rectify_widths.append(feed.rewrite_before or feed.window)
                self.counters.rectifications += 1
        emits: list[tuple[_Live, list[int]]] = []
        for rows, logits in outs:
            group = [live[b] for b in rows if live[b].round is None]
            for a, token in zip(group, self._pick_rows(group, logits)):
                emits.append((a, [token]))
            emits.extend(self._advance_rounds([live[b] for b in rows if live[b].round is not None], logits))
        for a, toks in emits:
            for token in toks:
                if a.req.finished:
                    break
                self._emit(a, token)

    def _advance_rounds(self, group: list[_Live], logits: torch.Tensor) -> list[tuple[_Live, list[int]]]:
        """Verify-mode requests after a pass (logits [B, V]): a draft step adds a draft; a dense
        step (a round of w = 0) gives its token; a verification pass decides the round: the
        accepted drafts and the dense model's next token are returned to be emitted, the rest of
        the window is rolled back (lengths and the summaries of the rows' new last blocks)."""
        out, ends = [], {}
        # Greedy drafts of every drafting row in one argmax and one transfer.
        greedy = [a for a in group if a.round.w and len(a.round.drafts) < a.round.w and a.req.sampling.greedy]
        for a, tok in zip(greedy, self._pick_rows(greedy, logits)):
            a.round.drafts.append(tok)
            a.round.probs.append(None)
        for a in group:
            rnd, sampling = a.round, a.req.sampling
            if rnd.w == 0:
                out.append((a, [self._pick(a, logits[a.slot:a.slot + 1])]))
                rnd.reset()
            elif a in greedy:
                continue
            elif len(rnd.drafts) < rnd.w:
                tok, p = draft(logits[a.slot:a.slot + 1], sampling, a.gen)
                rnd.drafts.append(int(tok[0]))
                rnd.probs.append(p)
            else:
                drafts = torch.tensor([rnd.drafts], dtype=torch.int64, device=logits.device)
                probs = None if sampling.greedy else torch.stack(rnd.probs, dim=1)
                accepted, nxt = accept(drafts, probs, rnd.dense, sampling, a.gen)
                n_acc = int(accepted[0])
                keep = min(n_acc + 1, a.req.max_tokens - len(a.generated))
                ends[a.slot] = rnd.start + keep
                st = a.req.stats
                st.verify_windows += 1
                st.drafted += rnd.w
                st.accepted += n_acc
                dense = dense_reads(rnd.start, keep)
                st.kv_tokens_dense += dense
                self.counters.kv_tokens_dense += dense
                rnd.control.observe(0, n_acc, rnd.w)
                out.append((a, (rnd.drafts[:n_acc] + [int(nxt[0])])[:keep]))
                rnd.reset()
        if ends:
            self.runner.truncate([ends.get(b, n) for b, n in enumerate(self.runner.lengths)])
        return out

    def _feed(self, a: _Live, length: int) -> Feed:
        """How request a feeds its newest token (generated token t, or its newest draft) at
        `length` cached tokens."""
        t = len(a.generated) - 1
        rnd = a.round
        if rnd is None:
            return a.cadence.feed(t, length) if a.cadence is not None else schedule(t, a.req.resa, length)
        if rnd.w is None:  # a new round: its draft length, at most what the request may still emit
            resa = a.req.resa
            cost = step_cost(self.runner, resa, [length], self._step_weights)
            rnd.w = draft_width(rnd.control, [0], cost, a.req.max_tokens - len(a.generated) - 1, resa, length)
            rnd.start = length
        if rnd.w == 0:
            return Feed()
        if len(rnd.drafts) < rnd.w:
            return Feed(sparse=True)
        return Feed(window=rnd.w + 1)

    @functools.cached_property
    def _step_weights(self) -> int | None:
        """The decode runner's weight bytes per step, for the verify requests' cost model."""
        return step_weights(self.runner)

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

