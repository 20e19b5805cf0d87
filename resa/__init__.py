"""resa: Rectified Sparse Attention (ReSA) for fast, near-lossless long-context decoding.

The public API: `Engine` (load a model, generate), `ResaConfig` (the ReSA settings),
`SamplingConfig`; `Runner` for callers that prefill or fork contexts themselves.
"""

import os

# A KV pool is a few very large tensors: with torch's default caching allocator a 119 GiB pool
# (Qwen2.5-7B shapes, 256K tokens x 8 rows on an H200) failed to allocate with 124.6 GiB free, with
# expandable segments it fits (peak 133.7 GiB, benchmarks/e2e). Read when CUDA first allocates, so
# setting it here covers every caller; a value the user set is kept.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from .config import ModelConfig, ResaConfig  # noqa: E402

__version__ = "0.1.0"

# Imported on first use, so that `import resa` (and `resa --help`) does not load torch.
_LAZY = {"Engine": ".engine", "GenerationResult": ".engine", "GenerationStats": ".generate", "Runner": ".runner",
         "SamplingConfig": ".sampling"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'resa' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__all__ = ["Engine", "GenerationResult", "GenerationStats", "ModelConfig", "ResaConfig", "Runner",
           "SamplingConfig", "__version__"]
