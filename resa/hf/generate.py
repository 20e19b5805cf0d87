"""ReSA generation for transformers models: `model.generate(..., custom_generate=resa.hf.generate)`.

Generation runs our one loop (`resa.generate.decode`) through our runner, with the transformers
model behind a thin adapter, and applies transformers' sampling step (same logits processors,
stopping criteria, sampling settings, EOS padding of finished rows, same output types): dense
chunked prefill, sparse decode steps, and a dense rectification pass every f = rectify_every
generated tokens that overwrites the window's K/V in every layer (`resa.rectify.schedule`):
- paper: after sampling token t (t > 0, t % f == 0), tokens t-f .. t-1 are re-run densely and their
  K/V overwritten; token t is then fed by a sparse step.
- fused: tokens are fed sparsely except when t % f == f - 1, where one dense pass over tokens
  t-f+1 .. t rewrites the f-1 sparse-made entries, writes token t and gives the next logits.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch

from .. import validate
from ..cache import Span
from ..config import ResaConfig
from ..errors import UsageError
from ..generate import decode
from ..runner import Runner
from .cache import ResaCache, ResaPass
from .enable import enabled_config


def _cache_kwarg(model) -> str:
    """Name of the forward argument that takes the cache: `cache` in newer transformers,
    `past_key_values` in older ones (both present in the releases we support, under one name)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
    """Per-row prompt tokens of a (left- or right-) padded batch; padding must be at the ends."""
    if attention_mask is None:
        return input_ids.tolist()
    rows = []
    for b, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist())):
        valid = [i for i, m in enumerate(mask) if m]
        if not valid:
            raise UsageError(f"row {b} of the batch has no unmasked prompt token")
        if valid[-1] - valid[0] + 1 != len(valid):
            raise UsageError(f"row {b}: padding must be on the left or the right of the prompt, not inside it")
        rows.append(ids[valid[0]:valid[-1] + 1])
    return rows


class _HFModel:
    """A transformers causal LM seen as a model of `resa.runner.Runner`: `run` is one forward pass
    of the transformers model against the `ResaCache` that wraps the runner's KV cache."""

    graph_safe = False  # transformers' forward reads host values; the runner runs it eagerly

    def __init__(self, model, cache: ResaCache) -> None:
        self.model = model
        self.cache = cache
        self.backend = cache.backend
        self.cache_arg = _cache_kwarg(model)

    def run(self, tokens: torch.Tensor, kv, span: Span, sparse: ResaConfig | None,
            cols: int | torch.Tensor = -1, observe=None) -> torch.Tensor:
        """fp32 logits [B, V] of column `cols` of each row (an int, or a [B] tensor) after a pass
        over tokens [B, T] written at `span`."""
        if kv is not self.cache.kv:
            raise ValueError("the transformers adapter runs against its own ResaCache's storage")
        if observe is not None:
            raise ValueError("query observers are not supported on transformers models")
        B, T = tokens.shape
        device = tokens.device
        positions = span.start_t[:, None] + torch.arange(T, device=device)[None, :]
        if isinstance(cols, int):
            keep, pick = torch.tensor([cols % T], device=device), torch.zeros(B, dtype=torch.int64, device=device)
        else:
            keep, pick = torch.unique(cols, return_inverse=True)
        # A 4-D mask is passed through to the attention function untouched, which skips
        # transformers' mask construction: the ReSA attention takes visibility from the span.
        placeholder_mask = torch.ones(B, 1, T, 1, dtype=torch.bool, device=device)
        self.cache.begin(ResaPass(span, sparse))
        try:
            out = self.model(input_ids=tokens, attention_mask=placeholder_mask, position_ids=positions,
                             use_cache=True, logits_to_keep=keep, resa_cache=self.cache,
                             **{self.cache_arg: self.cache})
        except BaseException:
            self.cache.abort()
            raise
        self.cache.end()
        return out.logits.float()[torch.arange(B, device=device), pick]


def _check_supported(generation_config, model_kwargs: dict[str, Any]) -> None:
    if getattr(generation_config, "num_beams", 1) not in (None, 1):
        raise ValueError("ReSA generation supports greedy search and sampling, not beam search (num_beams > 1)")
    for flag in ("output_attentions", "output_hidden_states"):
        if getattr(generation_config, flag, False):
            raise ValueError(f"ReSA generation does not return attentions or hidden states ({flag}=True)")
    if model_kwargs.get("inputs_embeds") is not None:
        raise ValueError("ReSA generation needs input_ids, not inputs_embeds")
    for name in ("cache", "past_key_values"):
        given = model_kwargs.get(name)
        if given is not None and not isinstance(given, ResaCache) and given.get_seq_length() > 0:
            raise ValueError("ReSA generation builds its own cache; continuing from a filled cache is not supported")


@torch.no_grad()
def generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    synced_gpus: bool = False,
    streamer=None,
    resa_config: ResaConfig | None = None,
    **model_kwargs,
):
    """Generate with ReSA; meant to be passed as `model.generate(..., custom_generate=generate)`.

    model: a transformers causal LM prepared with `resa.hf.enable(model, ResaConfig(...))`.
    input_ids: [B, L] prompts, padded on the left (or right) as given by `attention_mask` in
    `model_kwargs`. `resa_config` overrides the settings recorded by `enable` for this call
    (`model.generate(..., custom_generate=generate, resa_config=ResaConfig(...))`).

    transformers prepares logits_processor (temperature, top-k/p, repetition penalty, the user's
    own processors), stopping_criteria (max length, EOS, stop strings, the user's own) and
    generation_config; they are applied exactly as in transformers' sampling loop: processors see
    the padded sequences so far, tokens are argmax or multinomial of the processed scores, finished
    rows are padded with pad_token_id, generation stops when every row is finished.
    Beam search, assisted decoding and returning attentions/hidden states are not supported.

    Returns the sequences [B, L + new] (LongTensor), or with `return_dict_in_generate=True` a
    `GenerateDecoderOnlyOutput` whose cache is the `ResaCache` (its `.stats` counts decode steps,
    sparse steps and rectifications).
    """
    from transformers.generation import (GenerateDecoderOnlyOutput, LogitsProcessorList,
                                         StoppingCriteriaList)

    resa, backend = enabled_config(model)
    resa = resa if resa_config is None else resa_config
    generation_config = model.generation_config if generation_config is None else generation_config
    logits_processor = LogitsProcessorList() if logits_processor is None else logits_processor
    stopping_criteria = StoppingCriteriaList() if stopping_criteria is None else stopping_criteria
    _check_supported(generation_config, model_kwargs)

    B, L = input_ids.shape
    if generation_config.max_length is not None and generation_config.max_length > L:
        max_new = generation_config.max_length - L
    elif generation_config.max_new_tokens:
        max_new = generation_config.max_new_tokens
    else:
        raise ValueError("set max_new_tokens (or max_length above the prompt length)")
    prompts = validate.check_prompt_ids(_prompts(input_ids, model_kwargs.get("attention_mask")),
                                        model.config.vocab_size)
    lens = [len(p) for p in prompts]
    cache = ResaCache.for_model(model, B, resa.block_size, capacity=max(lens) + max_new, static=True,
                                backend=backend)
    cache.stats.prompt_tokens = lens
    runner = Runner(_HFModel(model, cache), cache.kv, cuda_graphs=False)
    device = input_ids.device

    pad = getattr(generation_config, "_pad_token_tensor", None)
    if pad is None and generation_config.pad_token_id is not None:
        pad = torch.tensor(generation_config.pad_token_id, device=device)
    has_eos = pad is not None and any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    keep_scores = generation_config.return_dict_in_generate and generation_config.output_scores
    keep_logits = generation_config.return_dict_in_generate and generation_config.output_logits
    state = {"sequences": input_ids, "scores": (), "logits": (), "last_scores": None,
             "unfinished": torch.ones(B, dtype=torch.long, device=device)}

    def pick(logits: torch.Tensor, t: int) -> torch.Tensor:
        """transformers' sampling step: processors on the sequences so far, argmax or multinomial,
        finished rows padded."""
        logits = logits.to(device)
        scores = logits_processor(state["sequences"], logits)
        if keep_scores:
            state["scores"] += (scores,)
        if keep_logits:
            state["logits"] += (logits,)
        if generation_config.do_sample:
            token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            token = torch.argmax(scores, dim=-1)
        if has_eos:
            token = token * state["unfinished"] + pad.to(device) * (1 - state["unfinished"])
        state["sequences"] = torch.cat([state["sequences"], token[:, None]], dim=-1)
        state["last_scores"] = scores
        if streamer is not None:
            streamer.put(token.cpu())
        return token.to(runner.device)

    class _Stopping:
        def take(self, tokens: list[list[int]]) -> bool:
            done = stopping_criteria(state["sequences"], state["last_scores"])
            state["unfinished"] = state["unfinished"] & ~done
            return bool(state["unfinished"].max() == 0)

    logits = runner.extend(prompts, resa.prefill_chunk)
    stats = decode(runner, logits, resa=resa, pick=pick, sink=_Stopping(), max_new_tokens=max_new, sync_every=1)
    cache.stats.decode_steps = stats.decode_steps
    cache.stats.sparse_steps = stats.sparse_steps
    cache.stats.rectifications = stats.rectifications
    cache.stats.rectified_at = list(stats.rectified_at)
    sequences = state["sequences"]
    scores_out, logits_out = state["scores"], state["logits"]
    if streamer is not None:
        streamer.end()
    if not generation_config.return_dict_in_generate:
        return sequences
    names = {fld.name for fld in dataclasses.fields(GenerateDecoderOnlyOutput)}
    cache_field = "cache" if "cache" in names else "past_key_values"
    return GenerateDecoderOnlyOutput(
        sequences=sequences,
        scores=scores_out if keep_scores else None,
        logits=logits_out if keep_logits else None,
        **{cache_field: cache},
    )
