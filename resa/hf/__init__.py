"""Use ReSA from Hugging Face transformers: `enable(model, ResaConfig(...))`, then
`model.generate(..., custom_generate=resa.hf.generate)`. See docs/hf.md.

Importing this package does not import transformers; `enable` and `generate` do.
"""

from .attention import ATTENTION_NAME, resa_attention
from .cache import ResaCache, ResaPass, ResaStats
from .enable import UnsupportedModelError, check_model, disable, enable, enabled_config
from .generate import generate

__all__ = [
    "ATTENTION_NAME",
    "ResaCache",
    "ResaPass",
    "ResaStats",
    "UnsupportedModelError",
    "check_model",
    "disable",
    "enable",
    "enabled_config",
    "generate",
    "resa_attention",
]
