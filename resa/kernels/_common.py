"""Checks shared by the kernel wrappers: where a kernel may run and how inputs must look."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(name: str, *tensors: torch.Tensor) -> torch.device:
    """All tensors on one device, and a device a Triton kernel can run on."""
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"{name}: all inputs must be on one device, got {device} and {t.device}")
    if device.type != "cuda" and not interpreting():
        raise ValueError(
            f"{name}: Triton kernels need CUDA tensors (got {device}); on CPU set TRITON_INTERPRET=1 "
            "before importing triton, or use the references in resa.ref"
        )
    return device


def check_dtype(name: str, what: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name}: {what} must be one of {names}, got {str(t.dtype).replace('torch.', '')}")


def check_shape(name: str, what: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: {what} must have shape {list(shape)}, got {list(t.shape)}")


def check_last_contiguous(name: str, what: str, t: torch.Tensor) -> None:
    """Kernels vectorise along the last dimension; other dimensions may have any stride."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: {what} must be contiguous in its last dimension (stride {t.stride()})")


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_qkv(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q, k, v of an attention kernel: one float dtype, contiguous last dimension, H a multiple of
    HKV (dim 1), head dim (last) 64, 128 or 256. Shapes are checked by the caller."""
    check_dtype(name, "q", q, FLOAT_DTYPES)
    for what, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: {what} dtype {t.dtype} differs from q dtype {q.dtype}")
    for what, t in (("q", q), ("k", k), ("v", v)):
        check_last_contiguous(name, what, t)
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{name}: {q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads")
    if q.shape[-1] not in (64, 128, 256):
        raise ValueError(f"{name}: head dim {q.shape[-1]} unsupported (64, 128, 256)")
INDEX_DTYPES = (torch.int32, torch.int64)


def check_pages(name: str, pages: torch.Tensor, batch: int) -> int:
    """A block table [B, max_blocks] of int32/int64 physical block ids (logical block j of row b
    lives in physical block pages[b, j]); returns max_blocks."""
    if pages.dim() != 2 or pages.shape[0] != batch:
        raise ValueError(f"{name}: pages must be [B={batch}, max_blocks], got {list(pages.shape)}")
    check_dtype(name, "pages", pages, INDEX_DTYPES)
    return pages.shape[1]


def check_pool(name: str, what: str, pool: torch.Tensor, num_kv_heads: int | None = None) -> tuple[int, int, int, int]:
    """One layer of the paged K/V pool, [num_blocks, HKV, BS, D] (the block's BS tokens of one KV
    head are contiguous rows); returns its shape."""
    if pool.dim() != 4:
        raise ValueError(f"{name}: {what} must be a pool layer [num_blocks, HKV, BS, D], got {list(pool.shape)}")
    if num_kv_heads is not None and pool.shape[1] != num_kv_heads:
        raise ValueError(f"{name}: {what} has {pool.shape[1]} KV heads, expected {num_kv_heads}")
    check_last_contiguous(name, what, pool)
    return tuple(pool.shape)
