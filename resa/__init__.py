"""resa: Rectified Sparse Attention (ReSA) for fast, near-lossless long-context decoding."""

from .config import ModelConfig, ResaConfig
from .sampling import SamplingConfig

__version__ = "0.1.0"

__all__ = ["ModelConfig", "ResaConfig", "SamplingConfig", "__version__"]
