"""lm-evaluation-harness model "resa": a transformers model whose generation runs ReSA.

Likelihood requests (loglikelihood, loglikelihood_rolling) are plain dense forwards, exactly as
lm-eval's "hf" model computes them; generate_until requests decode with ReSA through
`resa.hf.generate` (dense prefill, sparse steps, rectification every f tokens).

lm-eval is an optional dependency (`pip install lm-eval`); only this module imports it.
Use from Python: `resa.hf.lm_eval.evaluate(...)`, or register the model with `register()` and call
`lm_eval.simple_evaluate(model="resa", ...)`; from a shell: `python -m resa.hf.lm_eval --model resa
--model_args pretrained=PATH,active_ratio=0.1 --tasks TASK` (lm-eval's own command-line flags).
"""

from __future__ import annotations

from typing import Any

try:
    import lm_eval
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("resa.hf.lm_eval needs lm-evaluation-harness: pip install lm-eval") from exc

from ..config import ResaConfig
from .enable import enable
from .generate import generate as resa_generate

MODEL_NAME = "resa"


def _resa_config(**settings: Any) -> ResaConfig:
    """ResaConfig from model_args values, which lm-eval may hand over as strings."""
    casts = {"block_size": int, "min_blocks": int, "local_blocks": int, "rectify_every": int,
             "prefill_chunk": int, "active_ratio": float, "mode": str, "rectify_variant": str,
             "group_pool": str}
    return ResaConfig(**{k: casts[k](v) for k, v in settings.items() if v is not None})


class ResaLM(HFLM):
    """lm-eval's Hugging Face model (`HFLM`) with ReSA generation.

    Takes every HFLM argument (pretrained=hub id, local folder or a loaded model, dtype,
    batch_size, device, gguf_file, ...) plus the ReSA settings of `resa.ResaConfig`: mode,
    block_size, active_ratio, min_blocks, local_blocks, rectify_every, rectify_variant,
    prefill_chunk, group_pool (unset ones keep ResaConfig's defaults), and attention_backend
    ("auto", "torch", "triton"). The model must be a Llama/Mistral/Qwen2/Qwen3 causal LM.
    """

    def __init__(
        self,
        pretrained,
        mode: str | None = None,
        block_size: int | None = None,
        active_ratio: float | None = None,
        min_blocks: int | None = None,
        local_blocks: int | None = None,
        rectify_every: int | None = None,
        rectify_variant: str | None = None,
        prefill_chunk: int | None = None,
        group_pool: str | None = None,
        attention_backend: str = "auto",
        **kwargs: Any,
    ) -> None:
        resa = _resa_config(mode=mode, block_size=block_size, active_ratio=active_ratio,
                            min_blocks=min_blocks, local_blocks=local_blocks,
                            rectify_every=rectify_every, rectify_variant=rectify_variant,
                            prefill_chunk=prefill_chunk, group_pool=group_pool)
        super().__init__(pretrained=pretrained, **kwargs)
        if self.backend != "causal":
            raise ValueError("the resa lm-eval model needs a decoder-only causal LM")
        enable(self.model, resa, backend=attention_backend)

    @property
    def resa_config(self) -> ResaConfig:
        return self.model.resa_config

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        """HFLM's generation call (stop sequences, padding, sampling settings), through ReSA."""
        generation_kwargs["custom_generate"] = resa_generate
        return super()._model_generate(context, max_length, stop, **generation_kwargs)


def register() -> type[ResaLM]:
    """Register `ResaLM` as lm-eval model "resa" (idempotent). Returns the class."""
    register_model(MODEL_NAME)(ResaLM)
    return ResaLM


def evaluate(model_args: str | dict[str, Any], tasks: list[str], **kwargs: Any) -> dict:
    """`lm_eval.simple_evaluate(model="resa", model_args=..., tasks=..., **kwargs)`."""
    register()
    return lm_eval.simple_evaluate(model=MODEL_NAME, model_args=model_args, tasks=tasks, **kwargs)


def main() -> None:
    """lm-eval's command line with the "resa" model registered (reads sys.argv)."""
    from lm_eval.__main__ import cli_evaluate

    register()
    cli_evaluate()


if __name__ == "__main__":
    main()
