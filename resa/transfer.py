"""Host-to-device copies of small host values that do not wait for the GPU.

A copy from pageable host memory (`torch.tensor(values, device="cuda")`, `cpu_tensor.to("cuda")`)
first waits for all work queued on the stream, so a loop that writes a few indices between
queued passes leaves the GPU idle while the host catches up. Staging the values in pinned memory
makes the copy asynchronous; PyTorch's caching host allocator keeps a pinned buffer alive until
the copy that reads it has run, so the buffer is never overwritten early.
"""

from __future__ import annotations

from typing import Sequence

import torch


def to_device(values: "Sequence | torch.Tensor", dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` (a host sequence or CPU tensor) as a tensor of `dtype` on `device`, copied without
    waiting for the device's queued work when `device` is a GPU."""
    host = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
