"""Errors raised while loading checkpoints and tokenizers."""

from __future__ import annotations


class LoaderError(ValueError):
    """A checkpoint, GGUF file or tokenizer cannot be loaded.

    The message names the file or tensor at fault and says what to do about it.
    Subclasses ValueError so callers that validate inputs generically still catch it.
    """
