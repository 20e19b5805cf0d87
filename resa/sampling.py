"""Next-token sampling: greedy, temperature, top-k, top-p; seeded and on the logits' device."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ConfigError, is_int, is_number

# torch.Generator.manual_seed takes any 64-bit value; negative seeds wrap, so only [0, 2**64) is accepted.
SEED_MAX = 2**64 - 1


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy (argmax); top_k 0 and top_p 1 disable those filters.

    seed: None (nondeterministic sampling) or an integer in [0, 2**64 - 1]."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (is_number(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ConfigError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (is_number(self.top_p) and 0 < self.top_p <= 1):
            raise ConfigError(f"top_p must be a number in (0, 1] (1 = off), got {self.top_p!r}")
        if self.seed is not None and not (is_int(self.seed) and 0 <= self.seed <= SEED_MAX):
            raise ConfigError(f"seed must be None or an integer in [0, 2**64 - 1], got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(cfg: SamplingConfig, device: torch.device | str) -> torch.Generator | None:
    """A generator seeded from cfg.seed (None: nondeterministic sampling)."""
    if cfg.greedy or cfg.seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    return gen


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: [B, V] -> next token ids [B] (int64)."""
    if cfg.greedy:
        return logits.argmax(dim=-1)
    return torch.multinomial(probabilities(logits, cfg), 1, generator=generator)[:, 0]


def probabilities(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """logits: [..., V] -> the fp32 distribution [..., V] that `sample` draws from (temperature,
    then top-k, then top-p); greedy (temperature 0) gives one-hot rows of the argmax."""
    if cfg.greedy:
        return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    shape = logits.shape
    logits = logits.reshape(-1, shape[-1])
    # Shift by the row maximum first, so the best token scores 0 whatever the temperature; and
    # hold the temperature above 1e-30 (it becomes 0 in fp32 below ~1e-45: 0/0 = NaN). Below that
    # every distinct fp32 logit gap is already worth > 1e20 nats, so the distribution is the same.
    logits = logits.float()
    scores = (logits - logits.amax(dim=-1, keepdim=True)) / max(cfg.temperature, 1e-30)
    if cfg.top_k and cfg.top_k < scores.shape[-1]:
        kth = torch.topk(scores, cfg.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p < 1:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass.
        drop = (probs.cumsum(dim=-1) - probs) >= cfg.top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    return scores.softmax(dim=-1).reshape(shape)
