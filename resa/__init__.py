"""resa: Rectified Sparse Attention (ReSA) for fast, near-lossless long-context decoding.

The public API: `Engine` (load a model, generate), `ResaConfig` (the ReSA settings),
`SamplingConfig`; `Runner` for callers that prefill or fork contexts themselves.
"""

from .config import ModelConfig, ResaConfig

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
