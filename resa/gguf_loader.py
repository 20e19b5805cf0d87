"""GGUF files (llama.cpp's format) -> ModelConfig + HF-named tensors + Tokenizer.

Quantized tensors are dequantized to fp32 with `gguf.quants.dequantize`; F16/BF16/F32 tensors
keep their dtype. llama.cpp's converter permutes the q/k projection rows of the `llama`
architecture (Llama, Mistral, SmolLM) for its interleaved-pair RoPE; `unpermute_qk` undoes that so
the weights work with the HF rotate-half RoPE. Qwen2/Qwen3 files are stored unpermuted.

Opening a GGUF parses every vocabulary string in Python and dequantizing runs in numpy: ~4 s for
the 135M default model on 2 CPU cores, versus ~0.5 s to read back the converted result. So the
conversion is cached (see `gguf_cache_path`); the cache is only an accelerator, rebuilt from the
GGUF alone whenever it is missing, stale or unreadable. RESA_NO_CACHE=1 turns it off.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from resa.config import ConfigError, ModelConfig, RopeConfig
from resa.errors import LoaderError
from resa.tokenizer import Tokenizer
from resa.weights_table import check_tensors

# Bump when the conversion changes, so caches written by older code are never read.
CACHE_FORMAT = "1"

_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_PERMUTED_ARCHS = ("llama",)

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


class _Pending(NamedTuple):
    """A tensor not yet dequantized: torch-order shape, for validation before any work is done."""

    shape: tuple[int, ...]
    tensor: Any  # gguf.ReaderTensor


def load_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Config, HF-named tensors and tokenizer of a GGUF file, through the conversion cache.

    Raises LoaderError for unreadable/truncated files and unsupported contents, ConfigError for
    architectures resa cannot run.
    """
    path = Path(path)
    cache = None if os.environ.get("RESA_NO_CACHE") == "1" else gguf_cache_path(path)
    if cache is not None and cache.is_file():
        hit = _read_cache(cache, path)
        if hit is not None:
            return hit
    reader = open_gguf(path)
    cfg = gguf_config(reader, str(path))
    try:
        tokenizer = Tokenizer.from_gguf(reader)
    except LoaderError as exc:
        raise LoaderError(f"{path}: {exc}") from exc
    tensors = gguf_tensors(reader, cfg, str(path))
    if cache is not None:
        _write_cache(cache, path, cfg, tensors, tokenizer)
    return cfg, tensors, tokenizer


def open_gguf(path: str | Path) -> Any:
    """A `gguf.GGUFReader` over `path`; LoaderError if the file is not a complete GGUF file."""
    import gguf  # deferred: importing gguf costs ~0.2 s and only GGUF users need it

    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise LoaderError(f"{path}: not a GGUF file (bad magic bytes); pass a .gguf file or an HF folder")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError, OverflowError, UnicodeDecodeError) as exc:
        raise LoaderError(f"{path}: the GGUF file is truncated or corrupt ({exc}); download it again") from exc
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise LoaderError(f"{path}: the GGUF file is truncated (tensor {t.name} ends past the end "
                              f"of the file); download it again")
    return reader


def gguf_config(reader: Any, source: str = "GGUF file") -> ModelConfig:
    """ModelConfig from GGUF metadata ({arch}.block_count, .embedding_length, ...)."""
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise ConfigError(f"{source}: GGUF architecture {arch!r} is not supported; resa runs "
                          f"{', '.join(_ARCHS)} (Mistral GGUFs are stored as llama)")

    def meta(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise LoaderError(f"{source}: the GGUF file has no token_embd.weight tensor")
    hidden = meta("embedding_length")
    heads = _uniform(meta("attention.head_count"), "attention.head_count", source)
    kv_heads = _uniform(meta("attention.head_count_kv", heads), "attention.head_count_kv", source)
    if hidden is None or heads is None or meta("block_count") is None:
        raise LoaderError(f"{source}: GGUF metadata lacks {arch}.embedding_length/block_count/"
                          "attention.head_count; the file is not a complete model")
    head_dim = meta("attention.key_length", hidden // heads)
    if meta("attention.value_length", head_dim) != head_dim:
        raise LoaderError(f"{source}: key_length != value_length is not supported")
    if meta("rope.dimension_count", head_dim) != head_dim:
        raise LoaderError(f"{source}: partial rotary embeddings (rope.dimension_count "
                          f"{meta('rope.dimension_count')} < head_dim {head_dim}) are not supported")
    context = meta("context_length", 4096)
    window = meta("attention.sliding_window")
    if window and window < context:
        raise ConfigError(f"{source}: sliding-window attention (window {window}) is not supported; "
                          "ReSA needs full attention")
    return ModelConfig(
        arch=_ARCHS[arch],
        vocab_size=int(names["token_embd.weight"].shape[1]),
        hidden_size=hidden,
        intermediate_size=_uniform(meta("feed_forward_length"), "feed_forward_length", source),
        num_layers=meta("block_count"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=context,
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        rope=_gguf_rope(reader, arch, head_dim, source),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        qk_norm=arch == "qwen3",
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(i for i in (_field(reader, "tokenizer.ggml.eos_token_id"),) if i is not None),
    )


def gguf_tensors(reader: Any, cfg: ModelConfig, source: str = "GGUF file") -> dict[str, torch.Tensor]:
    """Every tensor under its HF name (validated by `check_tensors` before dequantizing).

    Returns fp32 for quantized tensors, the stored dtype for F32/F16/BF16; shapes in torch order
    (GGUF stores ggml `ne`, i.e. reversed). q/k rows of llama-arch files are un-permuted.
    """
    arch = _field(reader, "general.architecture")
    pending = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":  # folded into cfg.rope by gguf_config
            continue
        pending[hf_tensor_name(t.name)] = _Pending(tuple(int(n) for n in reversed(t.shape)), t)
    pending = check_tensors(cfg, pending, source)
    # numpy releases the GIL in the dequantization kernels, so threads overlap usefully.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        arrays = dict(zip(pending, pool.map(lambda p: _dequantize(p.tensor, p.shape), pending.values())))
    if arch in _PERMUTED_ARCHS:
        for name, w in arrays.items():
            if ".self_attn.q_proj." in name:
                arrays[name] = unpermute_qk(w, cfg.num_heads)
            elif ".self_attn.k_proj." in name:
                arrays[name] = unpermute_qk(w, cfg.num_kv_heads)
    return arrays


def hf_tensor_name(gguf_name: str) -> str:
    """GGUF tensor name -> HF name (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`);
    unknown names are returned unchanged so the strict table reports them."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return gguf_name


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation. w: [n_head * D, ...] (weight or bias).

    llama.cpp stores each head's rows as interleaved (even, odd) pairs; HF's rotate-half layout has
    the first D/2 rows then the second D/2. Per head: [D/2, 2] -> [2, D/2].
    """
    rest = w.shape[1:]
    d = w.shape[0] // n_head
    return w.reshape(n_head, d // 2, 2, *rest).transpose(1, 2).reshape(w.shape).contiguous()


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's permutation (the inverse of `unpermute_qk`); used to write test files."""
    rest = w.shape[1:]
    d = w.shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, *rest).transpose(1, 2).reshape(w.shape).contiguous()


# ---- metadata helpers -------------------------------------------------------------------------

def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _uniform(value: Any, key: str, source: str) -> Any:
    """Some GGUFs store per-layer arrays; resa needs the same value in every layer."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise LoaderError(f"{source}: per-layer {key} {sorted(set(value))} is not supported")
        return value[0]
    return value


def _gguf_rope(reader: Any, arch: str, head_dim: int, source: str) -> RopeConfig:
    theta = float(_field(reader, f"{arch}.rope.freq_base", 10000.0))
    kind = _field(reader, f"{arch}.rope.scaling.type", "none")
    factor = float(_field(reader, f"{arch}.rope.scaling.factor", 1.0) or 1.0)
    attn_factor = _field(reader, f"{arch}.rope.scaling.attn_factor", 1.0)
    if attn_factor not in (None, 1.0):
        raise LoaderError(f"{source}: rope.scaling.attn_factor {attn_factor} is not supported")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        return _llama3_rope_from_factors(np.asarray(_dequantize(freqs, (head_dim // 2,))), theta, head_dim, source)
    if kind in ("none", None) or factor == 1.0:
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=factor)
    if kind == "yarn":
        orig = _field(reader, f"{arch}.rope.scaling.original_context_length")
        if orig is None:
            raise LoaderError(f"{source}: YaRN scaling without rope.scaling.original_context_length")
        return RopeConfig(theta=theta, rope_type="yarn", factor=factor, original_max_position_embeddings=int(orig),
                          beta_fast=float(_field(reader, f"{arch}.rope.scaling.yarn_beta_fast", 32.0)),
                          beta_slow=float(_field(reader, f"{arch}.rope.scaling.yarn_beta_slow", 1.0)))
    raise LoaderError(f"{source}: RoPE scaling {kind!r} is not supported (supported: linear, yarn, llama3)")


def llama3_rope_factors(theta: float, head_dim: int, factor: float, low: float, high: float,
                        orig: int) -> np.ndarray:
    """Per-frequency divisors [D/2] of Llama 3.1 RoPE scaling (what llama.cpp stores as rope_freqs)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = np.clip((orig / wavelen - low) / (high - low), 0.0, 1.0)
    return 1.0 / ((1.0 - smooth) / factor + smooth)


def _llama3_rope_from_factors(factors: np.ndarray, theta: float, head_dim: int, source: str) -> RopeConfig:
    # llama.cpp keeps only the resulting divisors; recover Meta's parameters by matching the
    # published settings (factor = the largest divisor; low 1, high 4, original 8192).
    factor = float(factors.max())
    for low, high, orig in ((1.0, 4.0, 8192),):
        if np.allclose(llama3_rope_factors(theta, head_dim, factor, low, high, orig), factors, rtol=1e-4):
            return RopeConfig(theta=theta, rope_type="llama3", factor=factor, low_freq_factor=low,
                              high_freq_factor=high, original_max_position_embeddings=orig)
    raise LoaderError(f"{source}: rope_freqs.weight does not match Llama 3 RoPE scaling; unsupported")


def _dequantize(t: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """One GGUF tensor as a torch tensor of `shape`: fp32 if quantized, else its stored float dtype."""
    import gguf

    kind = t.tensor_type
    if kind == gguf.GGMLQuantizationType.F32:
        return torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(shape))
    if kind == gguf.GGMLQuantizationType.F16:
        return torch.from_numpy(np.array(t.data, dtype=np.float16).reshape(shape))
    if kind == gguf.GGMLQuantizationType.BF16:
        raw = np.array(t.data, copy=True).view(np.int16).reshape(shape)
        return torch.from_numpy(raw).view(torch.bfloat16)
    try:
        out = gguf.quants.dequantize(t.data, kind)
    except NotImplementedError as exc:
        raise LoaderError(f"tensor {t.name}: GGUF type {kind.name} cannot be dequantized ({exc})") from exc
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32).reshape(shape))


# ---- conversion cache -------------------------------------------------------------------------

def gguf_cache_path(path: str | Path) -> Path:
    """Where the converted form of GGUF `path` is cached: $XDG_CACHE_HOME/resa (else ~/.cache/resa),
    one safetensors file keyed by the GGUF's name, size and mtime, the cache format and the
    ModelConfig fields (so a changed file or changed conversion code never reads a stale entry)."""
    st = Path(path).stat()
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "resa"
    key = "|".join([CACHE_FORMAT, Path(path).name, str(st.st_size), str(st.st_mtime_ns),
                    ",".join(f.name for f in fields(ModelConfig)), ",".join(f.name for f in fields(RopeConfig))])
    return root / f"{Path(path).stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


def _read_cache(cache: Path, path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer] | None:
    """The cached conversion, or None (and a warning) if the entry is unreadable or does not match."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(cache), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("resa_cache_format") != CACHE_FORMAT or meta.get("source_name") != path.name:
            return None
        cfg = _config_from_dict(json.loads(meta["config"]))
        tokenizer = Tokenizer.from_json(meta["tokenizer"])
        tensors = load_file(str(cache))
        return cfg, check_tensors(cfg, tensors, str(cache)), tokenizer
    except Exception as exc:  # any damage to the cache means: rebuild it from the GGUF
        warnings.warn(f"ignoring unreadable GGUF conversion cache {cache} ({exc}); rebuilding it", stacklevel=3)
        return None


def _write_cache(cache: Path, path: Path, cfg: ModelConfig, tensors: dict[str, torch.Tensor],
                 tokenizer: Tokenizer) -> None:
    """Write atomically (temp file + rename) so a crash or a concurrent reader never sees half a file.
    Failing to write (read-only home, full disk) only costs speed, so it warns instead of raising."""
    from safetensors.torch import save_file

    meta = {"resa_cache_format": CACHE_FORMAT, "source_name": path.name, "config": json.dumps(asdict(cfg)),
            "tokenizer": tokenizer.to_json()}
    tmp = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=cache.stem, suffix=".tmp")
        os.close(fd)
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, cache)
        tmp = None
        _prune_stale(cache)
    except OSError as exc:
        warnings.warn(f"could not write the GGUF conversion cache {cache} ({exc}); "
                      "set RESA_NO_CACHE=1 to stop trying", stacklevel=3)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def _prune_stale(cache: Path) -> None:
    """Remove older entries of the same GGUF file name (a re-downloaded or edited file)."""
    prefix = cache.name[: -len("-0123456789abcdef.safetensors")]
    for other in cache.parent.glob(f"{prefix}-*.safetensors"):
        if other != cache and re.fullmatch(re.escape(prefix) + r"-[0-9a-f]{16}\.safetensors", other.name):
            other.unlink(missing_ok=True)


def _config_from_dict(d: dict) -> ModelConfig:
    d = dict(d, rope=RopeConfig(**d["rope"]), eos_token_ids=tuple(d["eos_token_ids"]))
    return ModelConfig(**d)
