"""Request and response bodies of the OpenAI-compatible endpoints (pydantic v2 models).

Requests are validated strictly ("5" is not an integer, 1 is not a boolean); fields this server
does not know are ignored, as vLLM does. Fields that exist in the OpenAI API but that this server
cannot honour (logprobs, echo, suffix, best_of > 1, penalties, tools) are refused with a 400 in
`resa.server.app` rather than silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ResaOverrides", "CompletionRequest", "ChatMessage", "ChatRequest", "StreamOptions", "error_body"]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ResaOverrides(BaseModel):
    """The per-request `resa` object: overrides of the server's ReSA defaults. Unknown keys are
    an error here (a misspelt setting would otherwise change nothing without a word)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    mode: Literal["resa", "sparse", "dense", "verify"] | None = None
    active_ratio: float | None = None
    rectify_every: Union[int, Literal["auto"], None] = None
    rectify_variant: Literal["paper", "fused"] | None = None

    def changes(self) -> dict[str, Any]:
        out = {k: v for k, v in self.model_dump().items() if v is not None}
        if isinstance(out.get("rectify_every"), int):
            out["rectify_auto"] = False  # a fixed f, also when the server's default is "auto"
        return out


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields both endpoints share. None means: the server's default (its command-line flag)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    best_of: int | None = None
    logprobs: Any = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    ignore_eos: bool = False
    resa: ResaOverrides | None = None


class CompletionRequest(_Sampling):
    """POST /v1/completions. prompt: a string, a list of one string, a list of token ids, or a
    list of one list of token ids."""

    # Tried in this order, so a long list of token ids is validated once.
    prompt: Union[str, list[int], list[str], list[list[int]]] = Field(union_mode="left_to_right")
    echo: bool = False
    suffix: str | None = None


class ChatMessage(BaseModel):
    """One message; content is a string or a list of text parts ({"type": "text", "text": ...})."""

    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[dict[str, Any]], None] = None


class ChatRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """The OpenAI error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
