"""Load a checkpoint: a Hugging Face safetensors folder or a GGUF file -> `Checkpoint`.

Loaders fail loudly: every problem (missing file, truncated shard, a tensor the config does not
explain, a wrong shape) is a LoaderError that names the file or tensor and says what to do.
Architectures resa cannot run raise ConfigError (from `resa.config`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from resa.config import ModelConfig
from resa.errors import LoaderError
from resa.gguf_loader import load_gguf
from resa.tokenizer import Tokenizer
from resa.weights_table import check_tensors

_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint.

    config: the model architecture; bos/eos ids merged with the tokenizer's.
    tensors: every parameter of `expected_parameters(config)` under its HF name, on CPU, in the
        file's float dtype (fp32 for dequantized GGUF tensors); the caller casts.
    tokenizer: None only for an HF folder without tokenizer.json (see `require_tokenizer`).
    source: the path it was loaded from.
    """

    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    tokenizer: Tokenizer | None
    source: str

    def require_tokenizer(self) -> Tokenizer:
        """The tokenizer, or a LoaderError saying the checkpoint has none."""
        if self.tokenizer is None:
            raise LoaderError(f"{self.source} has no tokenizer.json; save the tokenizer into the folder "
                              "(tokenizer.save_pretrained(folder)) or pass token ids instead of text")
        return self.tokenizer


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load an HF folder (config.json + model.safetensors or sharded model-0000X-of-0000N.safetensors
    with model.safetensors.index.json, + tokenizer.json) or a `.gguf` file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise LoaderError(f"{p} does not exist; pass a Hugging Face model folder (config.json + "
                          "*.safetensors) or a .gguf file")
    if p.is_file():
        if not _is_gguf(p):
            raise LoaderError(f"{p} is not a GGUF file; for a Hugging Face checkpoint pass its folder")
        cfg, tensors, tokenizer = load_gguf(p)
    else:
        cfg, tensors, tokenizer = _load_hf_folder(p)
    return Checkpoint(config=_merge_token_ids(cfg, tokenizer), tensors=tensors, tokenizer=tokenizer,
                      source=str(p))


def read_hf_config(folder: str | Path) -> ModelConfig:
    """ModelConfig of an HF folder's config.json, without touching the weights."""
    folder = Path(folder)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        ggufs = sorted(x.name for x in folder.glob("*.gguf"))
        hint = f"; it holds {', '.join(ggufs)}: pass that file instead" if ggufs else ""
        raise LoaderError(f"{folder}: no config.json, so this is not a Hugging Face model folder{hint}")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoaderError(f"{cfg_file}: not valid JSON ({exc})") from exc
    if raw.get("quantization_config"):
        method = raw["quantization_config"].get("quant_method", "?")
        raise LoaderError(f"{cfg_file}: {method}-quantized checkpoints are not supported; use the "
                          "unquantized weights or a GGUF file")
    try:
        return ModelConfig.from_hf(raw)
    except KeyError as exc:
        raise LoaderError(f"{cfg_file}: required field {exc} is missing") from exc


def _load_hf_folder(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer | None]:
    cfg = read_hf_config(folder)
    files, weight_map = _safetensors_files(folder)
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        for name, t in _read_safetensors(file).items():
            if name in tensors:
                raise LoaderError(f"{file}: tensor {name} also appears in another shard")
            if weight_map and weight_map.get(name) != file.name:
                raise LoaderError(f"{file}: tensor {name} is not listed for this shard in {_INDEX}")
            tensors[name] = t
    for name, shard in weight_map.items():
        if name not in tensors:
            raise LoaderError(f"{folder / shard}: tensor {name} listed in {_INDEX} is not in the shard")
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise LoaderError(f"{folder}: tensor {name} has dtype {t.dtype}; only float checkpoints are "
                              "supported (quantized formats: use a GGUF file)")
    tensors = check_tensors(cfg, tensors, str(folder))
    tokenizer = Tokenizer.from_hf_folder(folder) if (folder / "tokenizer.json").is_file() else None
    return cfg, tensors, tokenizer


def _safetensors_files(folder: Path) -> tuple[list[Path], dict[str, str]]:
    """The weight files of a folder and, if sharded, the index's tensor -> shard map."""
    index = folder / _INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise LoaderError(f"{index}: not a valid safetensors index ({exc})") from exc
        files = [folder / s for s in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise LoaderError(f"{f}: shard listed in {_INDEX} is missing; download it again")
        return files, weight_map
    single = folder / "model.safetensors"
    if single.is_file():
        return [single], {}
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return others, {}
    legacy = [x.name for x in folder.glob("*.bin")] + [x.name for x in folder.glob("*.pt*")]
    hint = (f" ({', '.join(sorted(legacy))} found: convert it with "
            "model.save_pretrained(folder, safe_serialization=True))") if legacy else ""
    raise LoaderError(f"{folder}: no *.safetensors weights{hint}")


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise LoaderError(f"{file}: the safetensors file is truncated or corrupt ({exc}); "
                          "download or save it again") from exc


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _merge_token_ids(cfg: ModelConfig, tokenizer: Tokenizer | None) -> ModelConfig:
    """One source of truth for stop tokens: the config's ids plus the tokenizer's."""
    if tokenizer is None:
        return cfg
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else tokenizer.bos_token_id
    eos = tuple(dict.fromkeys([*cfg.eos_token_ids, *tokenizer.eos_token_ids]))
    return replace(cfg, bos_token_id=bos, eos_token_ids=eos)
