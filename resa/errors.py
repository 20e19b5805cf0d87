"""The errors resa raises on purpose, as one family.

    ResaError                  anything resa reports with a message meant for the user
    +-- UsageError             a bad argument or setting from the caller (also a ValueError)
    |   +-- ConfigError        a configuration value out of range or of the wrong type
    |       +-- UnsupportedModelError  a well-formed model resa cannot run (architecture,
    |                                  sliding-window or soft-capped attention, RoPE scaling)
    +-- LoaderError            a checkpoint, GGUF file, cache entry or tokenizer cannot be used,
                               malformed config files included (also a ValueError)

Every message names what is wrong (the argument, file, tensor or field) and says what to do.
Both UsageError and LoaderError subclass ValueError, so code that catches ValueError keeps working.
`exit_code` is what the command line exits with: 2 for usage errors, 1 for everything else.
"""

from __future__ import annotations


class ResaError(Exception):
    """Base of every error resa raises on purpose; the message says what to do."""

    exit_code = 1


class UsageError(ResaError, ValueError):
    """An argument or setting of the caller is of the wrong type, out of range or unsupported."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration value is missing, out of range or unsupported (settings or model config)."""


class UnsupportedModelError(ConfigError):
    """The model is well formed but uses something resa does not implement."""


class LoaderError(ResaError, ValueError):
    """A checkpoint, GGUF file, conversion cache entry or tokenizer cannot be loaded.

    The message names the file or tensor at fault and says what to do about it.
    """

    exit_code = 1
