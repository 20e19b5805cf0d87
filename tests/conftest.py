"""Suite-wide test settings.

- Without a CUDA GPU, Triton kernels run in Triton's CPU interpreter (set before anything imports
  triton).
- Fresh buffers that resa code allocates with torch.empty / empty_like / new_empty are filled with
  NaN (floating point) or a huge value (integers), so any read of a slot that was never written
  shows up as a wrong result instead of passing by luck.
"""

import os
import sys

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_ORIGINAL = {"empty": torch.empty, "empty_like": torch.empty_like, "new_empty": torch.Tensor.new_empty}


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    elif t.dtype != torch.bool:
        t.fill_(torch.iinfo(t.dtype).max // 2 + 7)
    return t


def _called_from_resa() -> bool:
    name = sys._getframe(2).f_globals.get("__name__", "")
    return name == "resa" or name.startswith("resa.")


def _wrap(fn):
    def poisoned(*args, **kwargs):
        out = fn(*args, **kwargs)
        if _called_from_resa():
            _poison(out)
        return out

    return poisoned


@pytest.fixture(autouse=True)
def poison_fresh_buffers(monkeypatch):
    monkeypatch.setattr(torch, "empty", _wrap(_ORIGINAL["empty"]))
    monkeypatch.setattr(torch, "empty_like", _wrap(_ORIGINAL["empty_like"]))
    monkeypatch.setattr(torch.Tensor, "new_empty", _wrap(_ORIGINAL["new_empty"]))
    yield
