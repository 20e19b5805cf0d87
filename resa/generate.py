"""The generation loop: every caller that generates (the engine's `generate_ids`, evaluation
tasks, benchmarks, the transformers integration) drives this one loop over a prefilled `Runner`.

Rows generate in lock-step (token t of every row in the same step), so one rectification
schedule (`resa.rectify.schedule`) serves the whole batch; row lengths may differ. Sampled tokens
stay on the device and reach the host every `sync_every` tokens, where a `Sink` checks them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from .config import ResaConfig
from .cost import feed_reads
from .errors import UsageError
from .rectify import Feed, schedule
from .runner import Runner
from .sampling import SamplingConfig


@dataclass
class GenerationStats:
    mode: str
    rectify_variant: str
    prompt_tokens: list[int]
    new_tokens: list[int] = field(default_factory=list)
    decode_steps: int = 0
    sparse_steps: int = 0
    rectifications: int = 0
    # (t, first position of the window in row 0, width) of each rectification; t is the index of
    # the generated token being fed when it ran
    rectified_at: list[tuple[int, int, int]] = field(default_factory=list)
    prefill_seconds: float = 0.0  # the prompt's prefill, i.e. the time to the first token
    decode_seconds: float = 0.0
    capture_seconds: float = 0.0  # part of prefill + decode spent capturing CUDA graphs (first use)
    prefix_cached_tokens: int = 0  # prompt tokens taken from the prefix cache instead of computed
    kv_tokens_read: int = 0
    kv_tokens_dense: int = 0
    peak_memory_gib: float | None = None  # CUDA only: weights + cache + activations
    # mode "verify" (resa/verify.py): verification passes, drafts proposed and accepted (rows
    # still generating), tokens those passes emitted and their row count, the batch's draft
    # length of each pass, each row's last chosen draft length
    windows: int = 0
    drafted: int = 0
    accepted: int = 0
    rejections: int = 0  # verification passes (per row) that rejected a draft
    window_tokens: int = 0
    row_windows: int = 0
    draft_widths: list[int] = field(default_factory=list)
    row_draft_lengths: list[int] = field(default_factory=list)
    # rectify_every="auto": the agreement of each rectification window (its f is in rectified_at)
    rectify_agreement: list[float] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        """Mode "verify": drafted tokens the dense pass accepted (NaN when none was drafted)."""
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def token_acceptance(self) -> float:
        """Mode "verify": the per-token acceptance estimate accepted / (accepted + rejections),
        which does not depend on the draft length (each rejection ends a pass's accepted run)."""
        n = self.accepted + self.rejections
        return self.accepted / n if n else float("nan")

    @property
    def tokens_per_window(self) -> float:
        """Mode "verify": tokens a row got per verification pass (accepted drafts + 1)."""
        return self.window_tokens / self.row_windows if self.row_windows else float("nan")

    @property
    def kv_read_fraction(self) -> float:
        """K/V bytes the decode attention read (selected blocks + block summaries + rectification
        passes) over what dense decoding would have read."""
        return self.kv_tokens_read / self.kv_tokens_dense if self.kv_tokens_dense else 1.0

    @property
    def tokens_per_second(self) -> float:
        """Tokens produced by decode steps (all rows) per second of decoding; NaN when no decode
        step ran (the first token of a row comes from the prefill)."""
        decoded = sum(max(0, n - 1) for n in self.new_tokens)
        if self.decode_steps == 0 or decoded == 0 or self.decode_seconds <= 0:
            return float("nan")
        return decoded / self.decode_seconds

    def summary(self) -> str:
        variant = f" ({self.rectify_variant})" if self.mode == "resa" else ""
        tps = self.tokens_per_second
        speed = f"{tps:.1f} tok/s" if tps == tps else "n/a"
        return (
            f"mode={self.mode}{variant} prompt_tokens={sum(self.prompt_tokens)} "
            f"new_tokens={sum(self.new_tokens)} decode={speed} "
            f"ttft={self.prefill_seconds:.2f}s kv_read={self.kv_read_fraction:.3f} "
            f"rectifications={self.rectifications}"
            + (f" graph_capture={self.capture_seconds:.2f}s" if self.capture_seconds else "")
            + (f" prefix_cached={self.prefix_cached_tokens}" if self.prefix_cached_tokens else "")
            + (f" peak_memory={self.peak_memory_gib:.1f}GiB" if self.peak_memory_gib is not None else "")
            + (self._verify_summary() if self.mode == "verify" else "")
            + (f" f_auto={sum(w for _, _, w in self.rectified_at) / len(self.rectified_at):.1f}"
               if self.rectify_agreement else "")
        )

    def _verify_summary(self) -> str:
        mean_w = sum(self.draft_widths) / len(self.draft_widths) if self.draft_widths else 0.0
        return (f" windows={self.windows} accept={self.acceptance_rate:.3f} tokens/window={self.tokens_per_window:.2f} "
                f"draft_w={mean_w:.1f}")


class Sink(Protocol):
    def take(self, tokens: list[list[int]]) -> bool:
        """tokens[b]: the tokens row b sampled since the last call. Returns True when every row
        is done (generation stops)."""


# pick(logits [B, V] fp32, t) -> the tokens [B] (device) of generated position t.
Picker = Callable[[torch.Tensor, int], torch.Tensor]

# tokens(rows, lo, hi) -> [B, hi - lo] int64: column j of row b is that row's generated token at
# offset lo + j from the end of its history (-1 = the newest, the one being fed); other rows: any.
TokenWindow = Callable[[Sequence[int], int, int], torch.Tensor]


def feed_rows(runner: Runner, feeds: dict[int, tuple[Feed, ResaConfig]], tokens: TokenWindow,
              on_window: Callable[[list[int], Feed, torch.Tensor], None] | None = None
              ) -> list[tuple[list[int], torch.Tensor]]:
    """Run the passes that feed each listed row its newest token as its `Feed` (from
    `resa.rectify.schedule`) says: paper rewrites first, then fused windows, then decode steps.
    Rows that need the same pass share it: one pass for every row of the runner (the lock-step
    loop), or a masked pass of the rows that take it (a continuous batch); steps group by their
    sparse settings. Returns (rows, logits [B, V]) of each pass that gave next-token logits;
    every listed row appears in exactly one. on_window(rows, feed, logits [B, W, V]): given the
    logits of every position of each rectification pass (rewrite or window)."""
    all_rows = len(feeds) == runner.batch

    def mask(rows: list[int]) -> list[bool] | None:
        if all_rows and len(rows) == runner.batch:
            return None
        on = set(rows)
        return [b in on for b in range(runner.batch)]

    rewrites: dict[int, list[int]] = {}
    windows: dict[int, list[int]] = {}
    steps: dict[ResaConfig | None, list[int]] = {}
    for b, (feed, resa) in feeds.items():
        if feed.rewrite_before:
            rewrites.setdefault(feed.rewrite_before, []).append(b)
        if feed.window:
            windows.setdefault(feed.window, []).append(b)
        else:
            steps.setdefault(selection_settings(resa) if feed.sparse else None, []).append(b)
    every = on_window is not None
    for f, rows in rewrites.items():
        logits = runner.window(tokens(rows, -1 - f, -1), f, mask(rows), every)
        if every:
            on_window(rows, feeds[rows[0]][0], logits)
    out = []
    for w, rows in windows.items():
        logits = runner.window(tokens(rows, -w, 0), w - 1, mask(rows), every)
        if every:
            on_window(rows, feeds[rows[0]][0], logits)
            logits = logits[:, -1]
        out.append((rows, logits))
    for sparse, rows in steps.items():
        out.append((rows, runner.step(tokens(rows, -1, 0)[:, 0], sparse, active=mask(rows))))
    return out


def selection_settings(resa: ResaConfig) -> ResaConfig:
    """The settings a sparse decode step depends on, the rest normalised: rows that differ only
    in rectification share one step pass (and one captured graph)."""
    return resa.with_(mode="sparse", rectify_every=0, rectify_variant="paper", prefill_chunk=1024)


class Collector:
    """The engine's sink: per-row outputs up to an EOS id (excluded) or a stop from on_token."""

    def __init__(self, rows: int, eos: Sequence[int], on_token: Callable[[int, int], bool] | None) -> None:
        self.outputs: list[list[int]] = [[] for _ in range(rows)]
        self.reasons = ["length"] * rows
        self.done = [False] * rows
        self.eos = set(eos)
        self.on_token = on_token

    def take(self, tokens: list[list[int]]) -> bool:
        for b, toks in enumerate(tokens):
            for tok in toks:
                if self.done[b]:
                    break
                if tok in self.eos:
                    self.done[b], self.reasons[b] = True, "eos"
                    break
                self.outputs[b].append(tok)
                if self.on_token is not None and self.on_token(b, tok):
                    self.done[b], self.reasons[b] = True, "stop"
        return all(self.done)


def decode(runner: Runner, logits: torch.Tensor, *, resa: ResaConfig, pick: Picker, sink: Sink,
           max_new_tokens: int, rows: int | None = None, sync_every: int = 1,
           stats: GenerationStats | None = None, sampling: SamplingConfig | None = None,
           generator: torch.Generator | None = None) -> GenerationStats:
    """Generate up to `max_new_tokens` per row from a prefilled runner.

    logits: [B, V] of each row's last cached token (token 0 is picked from them). Token t >= 1
    comes from feeding token t-1 as `resa.rectify.schedule` says (sparse step, dense step, or
    rectification window). rows: the first `rows` rows are real (the others fill a batch bucket
    and are never shown to the sink). Tokens reach `sink` every `sync_every` tokens (and at the
    end); the steps after a row's stop inside a group are wasted work, not output.

    Mode "verify" runs `resa.verify.decode_verify` instead, which needs the distribution itself:
    `sampling` (and its `generator`) replace `pick` there.
    """
    if resa.mode == "verify" and not resa.is_dense:
        if sampling is None:
            raise UsageError('mode="verify" needs the sampling settings (sampling=SamplingConfig(...)), not only a '
                             "token picker; generate through resa.Engine")
        from .verify import decode_verify

        return decode_verify(runner, logits, resa=resa, sampling=sampling, generator=generator, sink=sink,
                             max_new_tokens=max_new_tokens, rows=rows, stats=stats)
    B = runner.batch
    rows = B if rows is None else rows
    if stats is None:
        stats = GenerationStats("dense" if resa.is_dense else resa.mode, resa.rectify_variant, runner.lengths[:rows])
    cadence = None
    if resa.rectify_auto and resa.rectifies:
        from .adaptive import Cadence

        cadence = Cadence(resa)
    history = torch.empty(B, max_new_tokens, dtype=torch.int64, device=runner.device)
    checked = 0
    capture0 = runner.capture_seconds
    t0 = wall_clock(runner.device)
    for t in range(max_new_tokens):
        history[:, t] = pick(logits, t)
        last = t == max_new_tokens - 1
        if last or (t + 1) % sync_every == 0:
            finished = sink.take(history[:rows, checked:t + 1].tolist())
            checked = t + 1
            if finished:
                break
        if last:
            break
        before = runner.lengths[:rows]
        feed = schedule(t, resa, max(before)) if cadence is None else cadence.feed(t, max(before))
        # rectify_every="auto": every window pass's logits at all positions measure the drift
        on_window = None if cadence is None else \
            (lambda _, fd, lg, t=t: cadence.observe(t, fd, lg, history, rows))
        ((_, logits),) = feed_rows(runner, {b: (feed, resa) for b in range(B)},
                                   lambda _, lo, hi: history[:, t + 1 + lo:t + 1 + hi], on_window)
        after = runner.lengths[:rows]
        stats.decode_steps += 1
        if feed.rectifies:
            stats.rectifications += 1
            stats.rectified_at.append((t, before[0] - (feed.rewrite_before or feed.window - 1),
                                       feed.rewrite_before or feed.window))
        stats.sparse_steps += feed.sparse and not feed.window
        stats.kv_tokens_dense += sum(after)
        stats.kv_tokens_read += sum(feed_reads(feed, n0, n1, resa) for n0, n1 in zip(before, after))
    stats.decode_seconds = wall_clock(runner.device) - t0
    stats.capture_seconds += runner.capture_seconds - capture0
    if cadence is not None:
        stats.rectify_agreement = [a for _, a in cadence.history]
    return stats


def wall_clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
