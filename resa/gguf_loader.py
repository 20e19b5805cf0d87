"""GGUF files (llama.cpp's format) -> ModelConfig + HF-named tensors + Tokenizer.

Quantized tensors are dequantized to fp32 with `gguf.quants.dequantize`; F16/BF16/F32 tensors
keep their dtype. llama.cpp's converter permutes the q/k projection rows of the `llama`
architecture (Llama, Mistral, SmolLM) for its interleaved-pair RoPE; `unpermute_qk` undoes that so
the weights work with the HF rotate-half RoPE. Qwen2/Qwen3 files are stored unpermuted.

The header is read by `GGUFFile` (gguf's own reader parses vocabulary arrays element by element:
2.5 s for the default model, 21 s for Qwen2.5's 150K-token vocabulary). Dequantizing is what
remains slow, which is why resa.loader caches the converted result.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from resa.config import ConfigError, ModelConfig, RopeConfig, is_int
from resa.errors import UnsupportedModelError
from resa.errors import LoaderError
from resa.tokenizer import Tokenizer
from resa.weights_table import check_finite, check_tensors

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
    tensor: Any  # _TensorInfo


def load_gguf(path: str | Path, progress: Callable[[int, int], None] | None = None
              ) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Config, HF-named tensors and tokenizer of a GGUF file (no caching; see resa.loader).
    progress(done, total): called after each tensor is dequantized.

    Raises LoaderError for unreadable/truncated files and unsupported contents, UnsupportedModelError for
    architectures resa cannot run.
    """
    path = Path(path)
    reader = open_gguf(path)
    cfg = gguf_config(reader, str(path))
    try:
        tokenizer = Tokenizer.from_gguf(reader)
    except LoaderError as exc:
        raise LoaderError(f"{path}: {exc}") from exc
    return cfg, gguf_tensors(reader, cfg, str(path), progress), tokenizer


def open_gguf(path: str | Path) -> "GGUFFile":
    """Parse the header of GGUF file `path`; LoaderError if it is not a complete GGUF file."""
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise LoaderError(f"{path}: not a GGUF file (bad magic bytes); pass a .gguf file or an HF folder")
    try:
        reader = GGUFFile(path)
    except (struct.error, ValueError, KeyError, IndexError, OverflowError, UnicodeDecodeError) as exc:
        raise LoaderError(f"{path}: the GGUF file is truncated or corrupt ({exc}); download it again") from exc
    return reader


class _Value(NamedTuple):
    """One metadata value; `contents()` mirrors `gguf.ReaderField.contents()`."""

    value: Any

    def contents(self) -> Any:
        return self.value


class _TensorInfo(NamedTuple):
    """The attributes of `gguf.ReaderTensor` the loader uses."""

    name: str
    tensor_type: Any      # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # ggml order (ne): reversed torch order
    n_bytes: int
    data_offset: int
    data: np.ndarray      # read-only view: elements for F32/F16, raw bytes [.., row bytes] otherwise


class GGUFFile:
    """A GGUF v2/v3 header reader with the `fields` / `tensors` interface of `gguf.GGUFReader`.

    gguf's reader builds numpy views per array element, which takes 2.5 s for the default model's
    vocabulary and 21 s for Qwen2.5's (150K tokens + 150K merges); this one reads the same
    metadata in well under a second. Tensor payloads stay memory-mapped; decoding them is left to
    `gguf.quants`. Little-endian files only (what llama.cpp writes).
    """

    _SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
               11: "<q", 12: "<d"}
    _NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
              6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}

    def __init__(self, path: str | Path) -> None:
        import gguf

        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", self._buf, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (only little-endian v2/v3 files are supported)")
        self._pos = 24
        self.fields: dict[str, _Value] = {}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = _Value(self._value(self._unpack("<I")))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            ne = tuple(self._unpack("<Q") for _ in range(self._unpack("<I")))
            infos.append((name, ne, gguf.GGMLQuantizationType(self._unpack("<I")), self._unpack("<Q")))
        align = int(self.fields.get("general.alignment", _Value(32)).value)
        start = -(-self._pos // align) * align
        self.tensors = [self._tensor(gguf, start, *info) for info in infos]

    def _tensor(self, gguf: Any, start: int, name: str, ne: tuple[int, ...], kind: Any, offset: int) -> _TensorInfo:
        dims = tuple(reversed(ne))
        block, type_size = gguf.GGML_QUANT_SIZES[kind]
        n_bytes = math.prod(ne) * type_size // block
        if start + offset + n_bytes > len(self._buf):
            raise ValueError(f"tensor {name} ends past the end of the file")
        raw = np.frombuffer(self._buf, dtype=np.uint8, count=n_bytes, offset=start + offset)
        plain = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}
        data = (raw.view(plain[kind]).reshape(dims) if kind in plain
                else raw.reshape(gguf.quants.quant_shape_to_byte_shape(dims, kind)))
        return _TensorInfo(name, kind, ne, n_bytes, start + offset, data)

    def _unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._unpack("<Q")
        if self._pos + n > len(self._buf):
            raise ValueError("a string runs past the end of the file")
        text = self._buf[self._pos:self._pos + n].decode("utf-8")
        self._pos += n
        return text

    def _value(self, kind: int) -> Any:
        if kind == 8:
            return self._string()
        if kind in self._SCALAR:
            return self._unpack(self._SCALAR[kind])
        if kind != 9:
            raise ValueError(f"unknown GGUF value type {kind}")
        item, count = self._unpack("<I"), self._unpack("<Q")
        if item in self._NUMPY:  # numeric arrays in one read
            arr = np.frombuffer(self._buf, dtype=self._NUMPY[item], count=count, offset=self._pos)
            self._pos += arr.nbytes
            return arr.tolist()
        return [self._value(item) for _ in range(count)]


def gguf_config(reader: Any, source: str = "GGUF file") -> ModelConfig:
    """ModelConfig from GGUF metadata ({arch}.block_count, .embedding_length, ...)."""
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise UnsupportedModelError(f"{source}: GGUF architecture {arch!r} is not supported; resa runs "
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
    for key, value in (("embedding_length", hidden), ("attention.head_count", heads),
                       ("attention.head_count_kv", kv_heads), ("block_count", meta("block_count"))):
        if not is_int(value) or value <= 0:
            raise LoaderError(f"{source}: GGUF metadata {arch}.{key} must be a positive integer, got {value!r}; "
                              "the file is damaged or was not written by llama.cpp")
    head_dim = meta("attention.key_length", hidden // heads)
    if meta("attention.value_length", head_dim) != head_dim:
        raise LoaderError(f"{source}: key_length != value_length is not supported")
    if meta("rope.dimension_count", head_dim) != head_dim:
        raise LoaderError(f"{source}: partial rotary embeddings (rope.dimension_count "
                          f"{meta('rope.dimension_count')} < head_dim {head_dim}) are not supported")
    context = meta("context_length", 4096)
    window = meta("attention.sliding_window")
    if window and window < context:
        raise UnsupportedModelError(f"{source}: sliding-window attention (window {window}) is not supported; "
                          "ReSA needs full attention")
    try:
        return _model_config(reader, arch, names, hidden, heads, kv_heads, head_dim, context, meta, source)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"{source}: {exc}") from exc
    except ConfigError as exc:
        raise LoaderError(f"{source}: GGUF metadata: {exc}; the file is damaged or was not written by "
                          "llama.cpp") from exc


def _model_config(reader: Any, arch: str, names: dict, hidden: int, heads: int, kv_heads: int, head_dim: int,
                  context: Any, meta: Any, source: str) -> ModelConfig:
    eps = meta("attention.layer_norm_rms_epsilon", 1e-6)
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
        rms_norm_eps=float(eps) if isinstance(eps, (int, float)) else eps,
        rope=_gguf_rope(reader, arch, head_dim, source),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        qk_norm=arch == "qwen3",
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(i for i in (_field(reader, "tokenizer.ggml.eos_token_id"),) if i is not None),
    )


def gguf_tensors(reader: Any, cfg: ModelConfig, source: str = "GGUF file",
                 progress: Callable[[int, int], None] | None = None) -> dict[str, torch.Tensor]:
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
    arrays = {}
    for name, p in pending.items():
        arrays[name] = _dequantize(p.tensor, p.shape)
        if progress is not None:
            progress(len(arrays), len(pending))
    check_finite(arrays, source, labels={name: p.tensor.name for name, p in pending.items()})
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
