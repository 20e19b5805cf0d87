"""Verified ReSA (mode "verify", docs/method.md section 7): self-speculative decoding with the
block-sparse model as the draft and the rectification pass as the verifier.

One round per window: each row's pending token (emitted, not yet cached) and w drafted tokens are
fed by w sparse decode steps (`Runner.step`); one dense pass over those w + 1 tokens
(`Runner.window`, the rectification pass) overwrites their K/V and gives the dense distribution
after every one of them. The acceptance rule keeps a prefix of the drafts and adds one token of its
own (the correction at the first rejection, or a bonus token after the last draft), so a round
emits 1 .. w + 1 tokens per row, distributed exactly as dense decoding would emit them:

- greedy: the longest prefix of drafts equal to the dense argmax, then the dense argmax;
- sampling: speculative sampling (accept draft d with probability min(1, q(d) / p(d)); at the
  first rejection sample from the normalised positive part of q - p; if all are accepted, sample
  from the last dense distribution), p and q being the sparse and dense distributions after the
  user's temperature / top-k / top-p (`resa.sampling.probabilities`).

Accepted positions keep the dense pass's K/V. Rejected ones are rolled back on the device: the
rows' lengths are set to the accepted ends and the summary of each row's new last block is
recomputed from its remaining keys (blocks wholly past the end are rebuilt from scratch when the
row next writes into them, docs/method.md 2.1). The only host synchronisation of a round is the
read of its emitted tokens at its end (the sink's check and the next round's draft length).

Rows are ragged: each row accepts its own count, and its cache, tokens and draft statistics are
its own. All rows of a batch draft the same number of tokens per round (static shapes: one
captured graph per window width); a row that has finished drafts along and is rolled back to
where it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch

from . import attention as attn
from .config import ResaConfig
from .cost import dense_reads, sparse_step_reads
from .rectify import window_was_sparse
from .runner import Runner
from .sampling import SamplingConfig, probabilities, sample
from .transfer import to_device

# accept_override(accepted [B] device int64, w) -> accepted counts to use instead (0 .. w); for
# benchmarks that impose a measured acceptance pattern on random weights.
AcceptOverride = Callable[[torch.Tensor, int], torch.Tensor]


# ---- acceptance rules ----

def greedy_accept(drafts: torch.Tensor, dense_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """drafts [B, w] (the sparse argmax tokens), dense_logits [B, w + 1, V] (the dense logits
    after the pending token and after each draft). Returns (accepted [B]: the length of the
    longest prefix of drafts equal to the dense argmax, next [B]: the dense argmax after that
    prefix, i.e. the correction at the first mismatch or the bonus token when all matched)."""
    target = dense_logits.argmax(dim=-1)  # [B, w + 1]
    w = drafts.shape[1]
    accepted = (drafts == target[:, :w]).long().cumprod(dim=1).sum(dim=1)
    nxt = target.gather(1, accepted[:, None])[:, 0]
    return accepted, nxt


def speculative_accept(drafts: torch.Tensor, p_draft: torch.Tensor, q_dense: torch.Tensor,
                       generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling. drafts [B, w] were sampled from p_draft [B, w, V]; q_dense
    [B, w + 1, V] is the target distribution after the pending token and after each draft.
    Draft j is accepted with probability min(1, q(d_j) / p(d_j)), in order, until the first
    rejection; the next token comes from normalise(max(q - p, 0)) at the rejected position, or
    from q after the last draft when all are accepted. Returns (accepted [B], next [B])."""
    B, w = drafts.shape
    rows = torch.arange(B, device=drafts.device)
    p_d = p_draft.gather(2, drafts[:, :, None])[:, :, 0]
    q_d = q_dense[:, :w].gather(2, drafts[:, :, None])[:, :, 0]
    u = torch.rand(B, w, generator=generator, device=drafts.device)
    ok = u * p_d < q_d  # u < q / p, with p > 0 for a drafted token
    accepted = ok.long().cumprod(dim=1).sum(dim=1)
    q_a = q_dense[rows, accepted]
    p_pad = torch.cat([p_draft, torch.zeros_like(p_draft[:, :1])], dim=1)  # nothing to subtract after the last draft
    residual = (q_a - p_pad[rows, accepted]).clamp_min(0)
    mass = residual.sum(dim=1, keepdim=True)
    # A rejection implies q(d) < p(d), so the residual has mass; the guard only catches rounding.
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), q_a)
    nxt = torch.multinomial(residual, 1, generator=generator)[:, 0]
    return accepted, nxt


# ---- draft length ----

def expected_tokens(alpha: float, w: int) -> float:
    """Tokens a round emits on average when each draft is accepted with probability alpha
    independently: 1 + alpha + ... + alpha^w (accepted drafts plus the correction / bonus)."""
    if alpha >= 1.0:
        return w + 1.0
    return (1.0 - alpha ** (w + 1)) / (1.0 - alpha)


class Costs(NamedTuple):
    """A round's costs in dense decode steps: `step`, one sparse draft step; the verification
    pass over w + 1 tokens and the round's fixed work, `pass_base` + w * `window_slope` (one read
    of the weights and the cache, plus the arithmetic of w more tokens)."""

    step: float
    window_slope: float = 0.0
    pass_base: float = 1.0


def speedup(alpha: float, w: int, cost: "Costs | float") -> float:
    """Tokens per unit of cost of a round over dense decoding (1 token per dense step): w sparse
    steps plus the verification pass (`Costs`; a float is the step cost with a flat pass)."""
    step, slope, base = (cost, 0.0, 1.0) if isinstance(cost, (int, float)) else cost
    return expected_tokens(alpha, w) / (w * step + base + w * slope)


def draft_grid(lo: int, hi: int) -> list[int]:
    """The draft lengths used: the bounds and the powers of two between them (few distinct window
    widths, so few captured graphs)."""
    grid = {lo, hi}
    p = 1
    while p < hi:
        if p > lo:
            grid.add(p)
        p *= 2
    return sorted(grid)


def best_draft(alpha: float, cost: "Costs | float", grid: Sequence[int]) -> int:
    """The draft length of `grid` with the highest `speedup` (the shortest among equals)."""
    return max(grid, key=lambda w: (speedup(alpha, w, cost), -w))


class DraftLength:
    """Per-row draft length from a running estimate of the per-token acceptance rate.

    A round with w drafts of which a were accepted observes a successes and, when a < w, one
    rejection; both counts decay by DECAY per round, so the estimate alpha = S / (S + F) follows
    the recent text. The prior (PRIOR_S successes, PRIOR_F rejections) starts rows at alpha 0.75.
    Each row's w is the grid length that maximises the expected tokens per unit of cost
    (`best_draft`) at its alpha and the step cost of the cost model (docs/method.md 4, 7).
    """

    DECAY = 0.8
    PRIOR_S, PRIOR_F = 3.0, 1.0

    def __init__(self, lo: int, hi: int, rows: int) -> None:
        self.grid = draft_grid(lo, hi)
        self.s = [self.PRIOR_S] * rows
        self.f = [self.PRIOR_F] * rows
        self.chosen = [self.grid[0]] * rows

    def alpha(self, b: int) -> float:
        return self.s[b] / (self.s[b] + self.f[b])

    def observe(self, b: int, accepted: int, drafted: int) -> None:
        self.s[b] = self.DECAY * self.s[b] + accepted
        self.f[b] = self.DECAY * self.f[b] + (1.0 if accepted < drafted else 0.0)

    def choose(self, rows: Sequence[int], cost: "Costs | float") -> int:
        """Update the chosen w of `rows` (each row's own best) and return the batch's draft length:
        the grid length with the most tokens per unit of cost summed over `rows`, since all rows
        share the round's cost (the shortest among equals). Taking the rows' largest w instead
        drafted too long at batch 4 (1.19x against 1.37x dense for the best fixed w, H200)."""
        for b in rows:
            self.chosen[b] = best_draft(self.alpha(b), cost, self.grid)
        alphas = [self.alpha(b) for b in rows]
        return max(self.grid, key=lambda w: (sum(speedup(a, w, cost) for a in alphas), -w))


# Arithmetic a GPU does per byte it reads, as achieved by the verification pass: its chunk
# attention (A_ATTN) and its matrix products (A_MM). Calibrated on an H200 from the rectification
# pass of benchmarks/e2e/h200_public_loop.md (32 tokens at 128K / 256K, batch 4, Qwen2.5-7B
# shapes: 2.25x / 2.6x a dense step).
A_ATTN = 110.0
A_MM = 140.0
# The fixed work of a round beyond one dense step (all-position logits, rollback, host sync, the
# pass's own inefficiency at few tokens), in dense steps: measured on an H200, Qwen2.5-7B shapes,
# batch 4, compiled layer halves, a round costs 1.10 / 0.99 dense steps + 0.58 / 0.54 per draft at
# 128K / 256K (benchmarks/verify/qwen2.5-7b-b4-h200-compiled.md, w = 4 and 8 at a = 0.97).
ROUND_OVERHEAD = 0.1
# What a sparse step costs beyond its bytes (selection, kernel efficiency), in dense steps: the
# H200 measures 0.58 / 0.45 of a dense step at 128K / 256K, batch 4, where the bytes give 0.43 /
# 0.32 (benchmarks/e2e/h200_public_loop.md).
STEP_OVERHEAD = 0.15


def step_weights(runner: Runner) -> int | None:
    """Bytes of weights a decode step of the runner's batch reads, for `step_cost` (None for a
    model without a config, which `step_cost` prices flat); computed once per loop."""
    if not (hasattr(runner.model, "parameters") and hasattr(runner.model, "cfg")):
        return None
    from .random_model import weight_bytes_per_step

    return weight_bytes_per_step(runner.model, runner.batch)


def step_cost(runner: Runner, resa: ResaConfig, lengths: Sequence[int], weights: int | None = None) -> Costs:
    """The cost model of a round (docs/method.md 4, 7.2) at these lengths, in dense steps: a
    sparse step reads (weights + selected K/V + summaries) / (weights + all K/V); each extra token
    of the verification pass adds the arithmetic of its attention over the cache (G query heads
    per KV head, 4·D flops per key and head: G·K / A_ATTN in bytes-equivalent) and of its matrix
    products (2 flops per weight: W / A_MM). weights: the bytes of weights a step reads (default:
    computed from the model)."""
    model = runner.model
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(model, "parameters"):
        return Costs(0.5)
    kv_tok = cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2 * runner.cache.k.element_size()
    if weights is None:
        from .random_model import weight_bytes_per_step

        weights = weight_bytes_per_step(model, runner.batch)
    kv = kv_tok * sum(lengths)
    dense = weights + kv
    sparse = weights + kv_tok * sum(sparse_step_reads(n, resa) for n in lengths)
    slope = (cfg.group_size * kv / A_ATTN + weights / A_MM) / dense
    return Costs(sparse / dense + STEP_OVERHEAD, slope, 1.0 + ROUND_OVERHEAD)


def draft_width(control: DraftLength, rows: Sequence[int], cost: "Costs | float", most: int, resa: ResaConfig,
                longest: int) -> int:
    """The next round's draft length for `rows`: the control's choice, at most `most` (the
    tokens the rows may still emit less one, and the cache's room), rounded down to the grid; 0
    (a plain dense step) when every draft step at the rows' longest length `longest` would keep
    all blocks: a dense step is then the same computation, and exact."""
    w = min(control.choose(rows, cost), most)
    if w > 0:
        w = max([g for g in control.grid if g <= w], default=w)
    if w > 0 and not window_was_sparse(resa, longest + w):
        w = 0
    return w


def draft(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The drafted tokens [B] from a sparse step's logits [B, V], and their distributions [B, V]
    (None when greedy: the draft is the argmax)."""
    if sampling.greedy:
        return logits.argmax(dim=-1), None
    p = probabilities(logits, sampling)
    return torch.multinomial(p, 1, generator=generator)[:, 0], p


def accept(drafts: torch.Tensor, p_draft: torch.Tensor | None, dense_logits: torch.Tensor, sampling: SamplingConfig,
           generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The acceptance rule of the sampling settings: drafts [B, w], their distributions [B, w, V]
    (None when greedy), the verification pass's logits [B, w + 1, V]. Returns (accepted [B],
    next [B]) as `greedy_accept` / `speculative_accept`."""
    if sampling.greedy:
        return greedy_accept(drafts, dense_logits)
    return speculative_accept(drafts, p_draft, probabilities(dense_logits, sampling), generator)


# ---- the loop ----

@dataclass
class _Round:
    width: int  # drafts per row this round (0: a plain dense step)
    accepted: torch.Tensor  # [B] drafts kept per row
    tokens: torch.Tensor  # [B, width + 1] emitted tokens (the first accepted + 1 of each row)


def rollback(runner: Runner, start: torch.Tensor, keep: torch.Tensor) -> None:
    """Device side of a round's rollback: rows keep `keep` [B] tokens past their `start` [B]
    (device tensors; every row holds at least that many); the summary of each row's new last
    block is recomputed from the keys it keeps. No host synchronisation; the host's lengths and
    block lists follow in `settle`."""
    cache = runner.cache
    end = start + keep
    first = end // cache.block_size * cache.block_size
    attn.refresh_all_summaries(cache, first, end, attn.resolve_backend(runner.model.backend, runner.device))
    cache.lengths.copy_(end)


def settle(runner: Runner, lengths: Sequence[int]) -> None:
    """Host side of a rollback: the runner's lengths become `lengths` and blocks past them go
    back to the pool (the device lengths and summaries were set by `rollback`)."""
    for b, n in enumerate(lengths):
        runner.cache.shrink(b, n)
    runner.lengths = list(lengths)


def decode_verify(runner: Runner, logits: torch.Tensor, *, resa: ResaConfig, sampling: SamplingConfig,
                  generator: torch.Generator | None, sink, max_new_tokens: int, rows: int | None = None,
                  stats=None, accept_override: AcceptOverride | None = None):
    """The generation loop of mode "verify" (called by `resa.generate.decode`): up to
    `max_new_tokens` per row from a prefilled runner, identical in distribution (greedy: token for
    token) to dense decoding with `sampling`. Token 0 is sampled from `logits` [B, V]; every later
    token comes from a verification round (module docstring). Returns the `GenerationStats`."""
    from .generate import GenerationStats, wall_clock

    B = runner.batch
    rows = B if rows is None else rows
    if stats is None:
        stats = GenerationStats(resa.mode, resa.rectify_variant, runner.lengths[:rows])
    control = DraftLength(resa.draft_min, resa.draft_max, B)
    dev = runner.device
    weights = step_weights(runner)
    capture0 = runner.capture_seconds
    t0 = wall_clock(dev)
    pending = sample(logits, sampling, generator)
    produced = [1] * B
    sink_done = getattr(sink, "done", None)  # rows the sink has finished (EOS, stop), if it says
    finished = sink.take([[x] for x in pending[:rows].tolist()])
    while not finished:
        active = [b for b in range(rows) if produced[b] < max_new_tokens and not (sink_done and sink_done[b])]
        if not active:
            break
        before = list(runner.lengths)
        room = runner.capacity - max(before) - 1
        need = max(max_new_tokens - produced[b] for b in active) - 1
        cost = step_cost(runner, resa, [before[b] for b in active], weights)
        w = draft_width(control, active, cost, min(need, room), resa, max(before))
        start = runner.cache.lengths.clone()
        rnd = _round(runner, pending, w, resa, sampling, generator, accept_override)
        # Row b keeps (and emits) its accepted drafts + 1, at most what it still may generate,
        # and none when it has finished; its last emitted token is its next pending one.
        room_left = to_device([max_new_tokens - produced[b] if b in active else 0 for b in range(B)],
                              torch.int64, dev)
        keep = torch.minimum(rnd.accepted + 1, room_left)
        rollback(runner, start, keep)
        last = rnd.tokens.gather(1, (keep - 1).clamp_min(0)[:, None])[:, 0]
        pending = torch.where(keep > 0, last, pending)
        # The round's one host synchronisation: counts and tokens of every row.
        counts, accepted = torch.stack([keep, rnd.accepted]).tolist()
        toks = rnd.tokens.tolist()
        settle(runner, [n + k for n, k in zip(before, counts)])
        out = [[] for _ in range(rows)]
        for b in active:
            out[b] = toks[b][:counts[b]]
            produced[b] += counts[b]
        _count(stats, control, resa, before, active, w, counts, accepted)
        finished = sink.take(out)
    stats.decode_seconds = wall_clock(dev) - t0
    stats.capture_seconds += runner.capture_seconds - capture0
    stats.row_draft_lengths = list(control.chosen[:rows])
    return stats


def _round(runner: Runner, pending: torch.Tensor, w: int, resa: ResaConfig, sampling: SamplingConfig,
           generator: torch.Generator | None, accept_override: AcceptOverride | None) -> _Round:
    """Feed the pending tokens and w drafts (w sparse steps), verify with one dense pass; w = 0
    is one dense decode step. Leaves every row w + 1 tokens longer (the caller rolls back)."""
    B = runner.batch
    if w == 0:
        nxt = sample(runner.step(pending, None), sampling, generator)
        return _Round(0, torch.zeros(B, dtype=torch.int64, device=runner.device), nxt[:, None])
    toks = torch.empty(B, w + 1, dtype=torch.int64, device=runner.device)
    toks[:, 0] = pending
    p_draft = []
    for j in range(w):
        toks[:, j + 1], p = draft(runner.step(toks[:, j], resa), sampling, generator)
        p_draft.append(p)
    dense = runner.window(toks, overwrite=w, every=True)  # [B, w + 1, V]
    drafts = toks[:, 1:]
    accepted, nxt = accept(drafts, None if sampling.greedy else torch.stack(p_draft, dim=1), dense, sampling,
                           generator)
    if accept_override is not None:
        accepted = accept_override(accepted, w).clamp(0, w)
        nxt = dense.argmax(dim=-1).gather(1, accepted[:, None])[:, 0]
    emitted = torch.cat([drafts, drafts[:, :1]], dim=1)
    emitted.scatter_(1, accepted[:, None], nxt[:, None])
    return _Round(w, accepted, emitted)


def _count(stats, control: DraftLength, resa: ResaConfig, before: Sequence[int], active: Sequence[int],
           w: int, counts: Sequence[int], accepted: Sequence[int]) -> None:
    """Fold one round into the stats and the rows' acceptance estimates (counts: tokens each
    row emitted, accepted: drafts the rule accepted, which may be more near the end)."""
    stats.decode_steps += w + 1
    stats.sparse_steps += w
    for b in active:
        n, k = before[b], counts[b]
        stats.kv_tokens_dense += dense_reads(n, k)  # dense decoding of the same k tokens
        if w == 0:
            stats.kv_tokens_read += n + 1
            continue
        stats.kv_tokens_read += sum(sparse_step_reads(n + j + 1, resa) for j in range(w)) + n + w + 1
        control.observe(b, accepted[b], w)
        stats.drafted += w
        stats.accepted += accepted[b]
        stats.rejections += accepted[b] < w
        stats.window_tokens += k
        stats.row_windows += 1
    if w:
        stats.windows += 1
        stats.draft_widths.append(w)


def acceptance_pattern(alpha: float, seed: int = 0) -> AcceptOverride:
    """An `AcceptOverride` that accepts each draft with probability alpha independently (counts
    of leading successes), for speed measurements on random weights at a measured rate."""
    state: dict[str, torch.Generator] = {}

    def override(accepted: torch.Tensor, w: int) -> torch.Tensor:
        gen = state.get("gen")
        if gen is None:
            gen = state["gen"] = torch.Generator(device=accepted.device).manual_seed(seed)
        ok = torch.rand(accepted.shape[0], w, generator=gen, device=accepted.device) < alpha
        return ok.long().cumprod(dim=1).sum(dim=1)

    return override


def break_even(cost: "Costs | float", grid: Sequence[int]) -> float:
    """The per-token acceptance rate below which no draft length of `grid` beats dense decoding
    under the cost model (`speedup` < 1), by bisection."""
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if max(speedup(mid, w, cost) for w in grid) >= 1.0:
            hi = mid
        else:
            lo = mid
    return hi if not math.isnan(hi) else 1.0
