"""Argument checks for the public API: each returns the argument normalised or raises UsageError.

Pure functions, called first thing by the public entry points (`Engine.load`, `Engine.generate`,
`Engine.generate_ids`, the command line), so a wrong type or value fails at once with a message
that names the argument, instead of many frames down inside torch, Jinja or the tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .config import ResaConfig, is_int
from .errors import UsageError
from .sampling import SamplingConfig

BACKENDS = ("auto", "torch", "triton")
DEVICE_TYPES = ("cpu", "cuda")

# Accepted dtype spellings -> torch dtype (float64 and integer dtypes are not supported).
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def _kind(value: Any) -> str:
    return type(value).__name__


def check_prompts(prompts: Any) -> list[str]:
    """Text prompts: a list (or other sequence) of str, at least one. Returns a new list.

    A bare str is an error, not a batch of its characters."""
    if isinstance(prompts, str):
        raise UsageError("prompts must be a list of strings, got a single str; pass [prompt] for one prompt")
    if isinstance(prompts, (bytes, bytearray, Mapping)) or not isinstance(prompts, Iterable):
        raise UsageError(f"prompts must be a list of strings, got {_kind(prompts)}")
    out = list(prompts)
    if not out:
        raise UsageError("prompts is empty; pass at least one prompt")
    for i, p in enumerate(out):
        if not isinstance(p, str):
            hint = "; token ids go to generate_ids" if is_int(p) or isinstance(p, (list, tuple)) else ""
            raise UsageError(f"prompts[{i}] is {_kind(p)}, not str{hint}")
    return out


def _row_ids(row: Any, i: int) -> list[int]:
    if isinstance(row, torch.Tensor):
        if row.dim() != 1 or row.is_floating_point() or row.is_complex() or row.dtype == torch.bool:
            raise UsageError(f"prompt_ids[{i}] must be a 1-D integer tensor, got {row.dtype} of shape "
                             f"{list(row.shape)}")
        return row.tolist()
    if isinstance(row, (str, bytes, bytearray, Mapping)) or not isinstance(row, Iterable):
        hint = "; for one prompt pass [ids]" if is_int(row) else ""
        raise UsageError(f"prompt_ids[{i}] must be a sequence of token ids, got {_kind(row)}{hint}")
    ids = list(row)
    if all(type(t) is int for t in ids):  # the common case, checked at C speed
        return ids
    out = []
    for j, t in enumerate(ids):
        if is_int(t):
            out.append(int(t))
        elif _integer_scalar(t):  # numpy / torch integer scalars
            out.append(int(t))
        else:
            raise UsageError(f"prompt_ids[{i}][{j}] is {t!r} ({_kind(t)}); token ids must be integers")
    return out


def _integer_scalar(t: Any) -> bool:
    dtype = str(getattr(t, "dtype", "")).removeprefix("torch.")
    return dtype.startswith(("int", "uint")) and getattr(t, "ndim", 0) == 0


def check_prompt_ids(prompt_ids: Any, vocab_size: int) -> list[list[int]]:
    """Token id prompts: a sequence of non-empty int sequences (or a 2-D integer tensor), every id
    in [0, vocab_size). Returns list[list[int]]."""
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() != 2:
            raise UsageError(f"prompt_ids as a tensor must be 2-D [batch, tokens], got shape {list(prompt_ids.shape)}")
        prompt_ids = list(prompt_ids)
    if isinstance(prompt_ids, str):
        raise UsageError("prompt_ids must be a list of token id lists, got a str; text prompts go to generate")
    if isinstance(prompt_ids, (bytes, bytearray, Mapping)) or not isinstance(prompt_ids, Iterable):
        raise UsageError(f"prompt_ids must be a list of token id lists, got {_kind(prompt_ids)}")
    rows = list(prompt_ids)
    if not rows:
        raise UsageError("prompt_ids is empty; pass at least one prompt")
    if all(is_int(r) for r in rows):
        raise UsageError("prompt_ids must be a list of token id lists, got a flat list of ints; "
                         "pass [ids] for one prompt")
    out = []
    for i, row in enumerate(rows):
        ids = _row_ids(row, i)
        if not ids:
            raise UsageError(f"prompt_ids[{i}] is empty; every prompt needs at least one token")
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= vocab_size:
            j, bad = next((j, t) for j, t in enumerate(ids) if not 0 <= t < vocab_size)
            raise UsageError(f"prompt_ids[{i}][{j}] = {bad} is outside the model's vocabulary of "
                             f"{vocab_size} ids [0, {vocab_size}); the ids must come from this model's tokenizer")
        out.append(ids)
    return out


def check_stop(stop: Any) -> tuple[str, ...]:
    """Stop strings. None or () for none; a bare str is ONE stop string (not one per character);
    otherwise a sequence of non-empty str."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, (bytes, bytearray, Mapping)) or not isinstance(stop, Iterable):
        raise UsageError(f"stop must be a string or a list of strings, got {_kind(stop)}")
    out = tuple(stop)
    for i, s in enumerate(out):
        if not isinstance(s, str):
            raise UsageError(f"stop[{i}] is {_kind(s)}, not str; stop strings are text (stop token ids: "
                             "pass eos_token_ids to generate_ids)")
        if not s:
            raise UsageError(f"stop[{i}] is an empty string, which would stop at once; remove it")
    return out


def _config(name: str, value: Any, cls: type) -> None:
    if isinstance(value, cls):
        return
    if isinstance(value, Mapping):
        raise UsageError(f"{name} must be a {cls.__name__}, got a dict; pass {name}={cls.__name__}(**d)")
    raise UsageError(f"{name} must be a {cls.__name__}, got {_kind(value)}; pass {name}={cls.__name__}(...)")


def _positive_int(name: str, value: Any) -> None:
    if not is_int(value):
        raise UsageError(f"{name} must be an integer, got {value!r} ({_kind(value)})")
    if value < 1:
        raise UsageError(f"{name} must be >= 1, got {value}")


def check_generation_args(*, resa: Any, sampling: Any, max_new_tokens: Any, sync_every: Any = None) -> None:
    """Settings of one generation call: config objects (not dicts) and integers in range.
    sync_every may be None (the engine's default)."""
    _config("resa", resa, ResaConfig)
    _config("sampling", sampling, SamplingConfig)
    _positive_int("max_new_tokens", max_new_tokens)
    if sync_every is not None:
        _positive_int("sync_every", sync_every)


def check_device(device: Any) -> torch.device:
    """A cpu or cuda[:N] device that this torch can use; "auto" is cuda when a GPU is visible,
    else cpu."""
    if isinstance(device, str) and device.strip() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        if not device.strip():
            raise UsageError("device is empty; use 'auto', 'cpu' or 'cuda' (or 'cuda:N')")
        try:
            dev = torch.device(device.strip())
        except (RuntimeError, ValueError) as exc:
            raise UsageError(f"device {device!r} is not a device name torch understands; use 'cpu' or "
                             "'cuda' (or 'cuda:N')") from exc
    else:
        raise UsageError(f"device must be a str such as 'cpu' or 'cuda', got {_kind(device)}")
    if dev.type not in DEVICE_TYPES:
        raise UsageError(f"device {str(dev)!r} is not supported; resa runs on 'cpu' or 'cuda' (or 'cuda:N')")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {str(dev)!r} asked for, but this torch sees no CUDA GPU "
                             f"(torch {torch.__version__}); use device 'cpu' or a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"device {str(dev)!r}: only {torch.cuda.device_count()} CUDA GPU(s) are visible "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return dev


def check_dtype(dtype: Any) -> torch.dtype | None:
    """None (the device's default), a torch float dtype of DTYPES, or one of its names ("bfloat16")."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key not in DTYPES:
            raise UsageError(f"dtype {dtype!r} is not supported; use one of float32, bfloat16, float16")
        return DTYPES[key]
    if isinstance(dtype, torch.dtype):
        if dtype not in set(DTYPES.values()):
            raise UsageError(f"dtype {dtype} is not supported; use torch.float32, torch.bfloat16 or torch.float16")
        return dtype
    raise UsageError(f"dtype must be a torch dtype such as torch.bfloat16 (or its name), got {_kind(dtype)}")


def check_backend(backend: Any) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise UsageError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def check_load_args(*, device: Any, dtype: Any, backend: Any) -> tuple[torch.device, torch.dtype | None, str]:
    """Arguments of `Engine.load`: returns (torch.device, torch dtype or None, backend)."""
    return check_device(device), check_dtype(dtype), check_backend(backend)


def check_pool_args(*, gpu_memory_utilization: Any, kv_cache_gib: Any) -> None:
    """KV pool limits of `Engine`: a fraction in (0, 1] and an optional positive size in GiB."""
    if isinstance(gpu_memory_utilization, bool) or not isinstance(gpu_memory_utilization, (int, float)) \
            or not 0 < gpu_memory_utilization <= 1:
        raise UsageError(f"gpu_memory_utilization must be a fraction in (0, 1], got {gpu_memory_utilization!r}")
    if kv_cache_gib is not None and (isinstance(kv_cache_gib, bool) or not isinstance(kv_cache_gib, (int, float))
                                     or not kv_cache_gib > 0 or kv_cache_gib != kv_cache_gib):
        raise UsageError(f"kv_cache_gib must be a positive number of GiB (or None: sized on demand), got {kv_cache_gib!r}")


def check_token_ids(name: str, values: Any, vocab_size: int | None = None) -> tuple[int, ...] | None:
    """A collection of token ids such as `eos_token_ids`: None passes through (the default); else
    integers, each in [0, vocab_size) when vocab_size is given. An empty collection is allowed
    (e.g. eos_token_ids=(): ignore EOS)."""
    if values is None:
        return None
    if is_int(values):
        raise UsageError(f"{name} must be a list of token ids, got the int {values}; pass [{values}]")
    if isinstance(values, (str, bytes, bytearray, Mapping)) or not isinstance(values, Iterable):
        raise UsageError(f"{name} must be a list of token ids, got {_kind(values)}")
    out = tuple(values)
    for i, v in enumerate(out):
        if not is_int(v):
            raise UsageError(f"{name}[{i}] is {v!r} ({_kind(v)}); token ids must be integers")
        if vocab_size is not None and not 0 <= v < vocab_size:
            raise UsageError(f"{name}[{i}] = {v} is outside the model's vocabulary of {vocab_size} ids")
    return out
