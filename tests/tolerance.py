"""The one tolerance rule of the test suite.

A fast path is compared with the fp32 reference, and its error is held to what PyTorch itself
makes when it does the same computation in the same low precision: the kernel may be at most
`factor` (default 2) times worse than that baseline. A small absolute floor, relative to the size of
the reference, keeps fp32-vs-fp32 comparisons (where the baseline error is ~0) from failing on
rounding-order differences alone.
"""

from __future__ import annotations

import torch


def max_abs_error(actual: torch.Tensor, ref: torch.Tensor) -> float:
    """max |actual - ref| in fp64 (NaN/inf in `actual` count as infinite error)."""
    diff = (actual.double() - ref.double()).abs()
    if diff.numel() == 0:
        return 0.0
    diff = torch.where(torch.isfinite(diff), diff, torch.full_like(diff, float("inf")))
    return float(diff.max())


def assert_close(
    actual: torch.Tensor,
    ref_fp32: torch.Tensor,
    lowp_baseline: torch.Tensor | None,
    *,
    factor: float = 2.0,
    floor: float = 1e-5,
    what: str = "output",
) -> None:
    """Assert max|actual - ref| <= factor * max|lowp_baseline - ref| + floor * (1 + max|ref|).

    actual: the fast path's result (any dtype); ref_fp32: the fp32 reference of the same shape;
    lowp_baseline: PyTorch's result for the same computation in the fast path's precision (None:
    compare against the floor alone, for computations that should be exact up to rounding order).
    Non-finite values in `actual` where the reference is finite always fail.
    """
    if actual.shape != ref_fp32.shape:
        raise AssertionError(f"{what}: shape {list(actual.shape)} != reference {list(ref_fp32.shape)}")
    actual, ref = actual.detach().cpu(), ref_fp32.detach().cpu()
    bad = ~torch.isfinite(actual.double()) & torch.isfinite(ref.double())
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())} non-finite values, first at {idx}")
    err = max_abs_error(actual, ref)
    base = 0.0 if lowp_baseline is None else max_abs_error(lowp_baseline.detach().cpu(), ref)
    scale = float(ref.double().abs().max()) if ref.numel() else 0.0
    bound = factor * base + floor * (1.0 + scale)
    if not err <= bound:
        raise AssertionError(
            f"{what}: max abs error {err:.3e} exceeds {factor}x the low-precision baseline's "
            f"{base:.3e} plus floor ({bound:.3e} in all; |ref| max {scale:.3e})"
        )
