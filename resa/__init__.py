"""resa: Rectified Sparse Attention (ReSA) for fast, near-lossless long-context decoding.

The public API: `Engine` (load a model, generate), `ResaConfig` (the ReSA settings),
`SamplingConfig`; `Runner` for callers that prefill or fork contexts themselves.
"""

from .config import ModelConfig, ResaConfig
from .engine import Engine, GenerationResult
from .generate import GenerationStats
from .runner import Runner
from .sampling import SamplingConfig

__version__ = "0.1.0"

__all__ = ["Engine", "GenerationResult", "GenerationStats", "ModelConfig", "ResaConfig", "Runner",
           "SamplingConfig", "__version__"]
