"""Rectification schedule: which pass feeds generated token t (docs/method.md section 3).

A pure function of the step index and the settings; the generation loop (`resa.generate`)
executes what it says. Generated tokens are numbered from 0 (the first token sampled from the
prefill logits); token t is fed to the model at step t, which yields the logits of token t + 1.
With f = rectify_every:
- paper: before feeding token t (t > 0, t % f == 0), tokens t-f .. t-1 (the newest f cached
  tokens, written by sparse steps) are re-run through the whole model densely and their K/V
  overwritten; token t is then fed by a sparse step.
- fused: when t % f == f - 1, token t is fed by one dense pass over tokens t-f+1 .. t, which
  rewrites the f-1 sparse-made entries and gives the next logits; other tokens are fed sparsely.
Both rectify the same windows of f tokens; fused saves one forward (one read of all weights) per
window.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ResaConfig
from .ref.selection import block_budget


@dataclass(frozen=True)
class Feed:
    """How token t is fed.

    rewrite_before: paper variant, > 0: first re-run the newest `rewrite_before` cached tokens
        (generated tokens t-f .. t-1) densely, overwriting their K/V.
    window: fused variant, > 0: feed token t by a dense pass over the newest `window` generated
        tokens (t-window+1 .. t), overwriting the K/V of the first window-1 of them; its logits
        are the next token's.
    sparse: otherwise token t is fed by a decode step, block-sparse when True, dense when False.
    """

    rewrite_before: int = 0
    window: int = 0
    sparse: bool = False

    @property
    def rectifies(self) -> bool:
        return self.rewrite_before > 0 or self.window > 0


def window_was_sparse(resa: ResaConfig, max_length: int) -> bool:
    """Whether a decode step at `max_length` cached tokens (the longest row, current token
    included) kept fewer blocks than it had. If not, that step and every earlier one of the window
    attended densely, so their K/V is already exact and rectifying would only repeat work."""
    nb = -(-max_length // resa.block_size)
    return block_budget(nb, resa.active_ratio, resa.min_blocks) < nb


def schedule(t: int, resa: ResaConfig, max_length: int) -> Feed:
    """How generated token t is fed under `resa`; max_length: tokens in the longest row's cache
    before feeding it. Steps at full budget (short contexts: every row keeps all its blocks) are
    dense steps, and windows decoded entirely at full budget are not rectified."""
    if resa.is_dense or not window_was_sparse(resa, max_length + 1):
        # At full budget every block is selected: a dense step attends to exactly the same keys
        # without reading the block summaries, and the window's K/V is already exact.
        return Feed()
    f = resa.rectify_every
    if resa.rectifies:
        if resa.rectify_variant == "paper" and t > 0 and t % f == 0:
            return Feed(rewrite_before=f, sparse=True)
        if resa.rectify_variant == "fused" and t % f == f - 1:
            return Feed(window=f)
    return Feed(sparse=True)
