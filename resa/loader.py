"""Load a checkpoint: a Hugging Face safetensors folder or a GGUF file -> `Checkpoint`.

Loaders fail loudly: every problem (missing file, truncated shard, a tensor the config does not
explain, a wrong shape, a NaN or infinite weight, a tokenizer with ids past the vocabulary) is a
LoaderError that names the file or tensor and says what to do, malformed config.json fields
included. Models resa cannot run raise UnsupportedModelError (a ConfigError, from `resa.errors`).
GGUF conversions are cached in $XDG_CACHE_HOME/resa (else ~/.cache/resa); see
`conversion_cache_path`. A cache entry carries a CRC32 of its payload (checked on every read; a
mismatch rebuilds it with a warning); temp files of a conversion that died are swept by the next.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
import time
import warnings
import zlib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable

import torch

from resa.config import ModelConfig, RopeConfig
from resa.errors import ConfigError, LoaderError, UnsupportedModelError
from resa.gguf_loader import load_gguf
from resa.tokenizer import Tokenizer
from resa.weights_table import check_finite, check_tensors

_INDEX = "model.safetensors.index.json"

# Bump when the GGUF conversion changes, so caches written by older code are never read.
# "2": entries carry a payload checksum.
CACHE_FORMAT = "2"

# A temp file of the conversion cache whose writer is gone (or that is older than this, when the
# writer cannot be checked: another host, an unknown name) is removed by the next run.
STALE_TEMP_SECONDS = 3600


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


def load_checkpoint(path: str | Path, progress: Callable[[int, int], None] | None = None) -> Checkpoint:
    """Load an HF folder (config.json + model.safetensors or sharded model-0000X-of-0000N.safetensors
    with model.safetensors.index.json, + tokenizer.json) or a `.gguf` file. progress(done, total):
    called per tensor while a GGUF file is converted (the first load; later ones read the cache)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise LoaderError(f"{p} does not exist; pass a Hugging Face model folder (config.json + "
                          "*.safetensors) or a .gguf file")
    if p.is_file():
        if not _is_gguf(p):
            raise LoaderError(f"{p} is not a GGUF file; for a Hugging Face checkpoint pass its folder")
        cfg, tensors, tokenizer = _load_gguf_cached(p, progress)
    else:
        cfg, tensors, tokenizer = _load_hf_folder(p)
    if tokenizer is not None:
        check_vocabulary(cfg, tokenizer, str(p))
    return Checkpoint(config=_merge_token_ids(cfg, tokenizer), tensors=tensors, tokenizer=tokenizer,
                      source=str(p))


def check_vocabulary(cfg: ModelConfig, tokenizer: Tokenizer, source: str) -> None:
    """Every id the tokenizer can produce (added tokens, BOS, EOS included) must index the
    embedding table; a tokenizer of another model would otherwise crash the embedding lookup."""
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    top = max(vocab.values(), default=-1)
    if top >= cfg.vocab_size:
        token = next(t for t, i in vocab.items() if i == top)
        raise LoaderError(f"{source}: the tokenizer has token ids up to {top} ({token!r}) but the model's "
                          f"vocab_size is {cfg.vocab_size}; the tokenizer does not belong to these weights "
                          "(use the tokenizer saved with the model)")
    for what, ids in (("BOS", [tokenizer.bos_token_id]), ("EOS", list(tokenizer.eos_token_ids))):
        for i in ids:
            if i is not None and not 0 <= i < cfg.vocab_size:
                raise LoaderError(f"{source}: the tokenizer's {what} token id {i} is outside the model's "
                                  f"vocabulary of {cfg.vocab_size} ids; fix bos/eos in the tokenizer config")


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
    if not isinstance(raw, dict):
        raise LoaderError(f"{cfg_file}: must hold a JSON object ({{\"model_type\": ..., ...}}), got a JSON "
                          f"{type(raw).__name__}; save the model's config again (model.config.save_pretrained)")
    quant = raw.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise LoaderError(f"{cfg_file}: {method}-quantized checkpoints are not supported; use the "
                          "unquantized weights or a GGUF file")
    try:
        return ModelConfig.from_hf(raw)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"{cfg_file}: {exc}") from exc
    except ConfigError as exc:  # a field of the wrong type or value: the file is malformed
        raise LoaderError(f"{cfg_file}: {exc}; fix the file or save the model's config again") from exc


def _load_hf_folder(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer | None]:
    cfg = read_hf_config(folder)
    files, weight_map = _safetensors_files(folder)
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for file in files:
        for name, t in _read_safetensors(file).items():
            if name in tensors:
                raise LoaderError(f"{file}: tensor {name} also appears in another shard")
            if weight_map and weight_map.get(name) != file.name:
                raise LoaderError(f"{file}: tensor {name} is not listed for this shard in {_INDEX}")
            tensors[name] = t
            origin[name] = str(file)
    for name, shard in weight_map.items():
        if name not in tensors:
            raise LoaderError(f"{folder / shard}: tensor {name} listed in {_INDEX} is not in the shard")
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise LoaderError(f"{folder}: tensor {name} has dtype {t.dtype}; only float checkpoints are "
                              "supported (quantized formats: use a GGUF file)")
    tensors = check_tensors(cfg, tensors, str(folder))
    check_finite(tensors, origin)
    tokenizer = Tokenizer.from_hf_folder(folder) if (folder / "tokenizer.json").is_file() else None
    return cfg, tensors, tokenizer


def _safetensors_files(folder: Path) -> tuple[list[Path], dict[str, str]]:
    """The weight files of a folder and, if sharded, the index's tensor -> shard map."""
    index = folder / _INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map must map tensor names to shard file names")
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


def _load_gguf_cached(path: Path, progress: Callable[[int, int], None] | None = None
                      ) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """`load_gguf` through the conversion cache. Dequantizing the 135M default model takes ~1.5 s
    on 2 CPU cores (Qwen2.5-0.5B ~10 s); reading the cached fp32 result back takes ~0.2 s (its
    checksum ~0.15 s more). The cache is only an accelerator: it is rebuilt from the GGUF alone
    whenever it is missing, stale, damaged or unreadable, and RESA_NO_CACHE=1 turns it off."""
    cache = None if os.environ.get("RESA_NO_CACHE") == "1" else conversion_cache_path(path)
    if cache is not None:
        sweep_stale_temp_files(cache.parent)
    if cache is not None and cache.is_file():
        hit = _read_cache(cache, path)
        if hit is not None:
            return hit
    cfg, tensors, tokenizer = load_gguf(path, progress)
    if cache is not None:
        _write_cache(cache, path, cfg, tensors, tokenizer)
    return cfg, tensors, tokenizer


def _merge_token_ids(cfg: ModelConfig, tokenizer: Tokenizer | None) -> ModelConfig:
    """One source of truth for stop tokens: the config's ids plus the tokenizer's."""
    if tokenizer is None:
        return cfg
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else tokenizer.bos_token_id
    eos = tuple(dict.fromkeys([*cfg.eos_token_ids, *tokenizer.eos_token_ids]))
    return replace(cfg, bos_token_id=bos, eos_token_ids=eos)


# ---- conversion cache -------------------------------------------------------------------------

def conversion_cache_path(path: str | Path) -> Path:
    """Where the converted form of GGUF `path` is cached: $XDG_CACHE_HOME/resa (else ~/.cache/resa),
    one safetensors file keyed by the GGUF's name, size and mtime, the cache format and the
    ModelConfig fields (so a changed file or changed conversion code never reads a stale entry)."""
    st = Path(path).stat()
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "resa"
    key = "|".join([CACHE_FORMAT, Path(path).name, str(st.st_size), str(st.st_mtime_ns),
                    ",".join(f.name for f in fields(ModelConfig)), ",".join(f.name for f in fields(RopeConfig))])
    return root / f"{Path(path).stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


def payload_checksum(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """CRC32 (hex) of a cache entry: every metadata string but the checksum itself, and every
    tensor's name, dtype, shape and bytes, in name order. ~0.15 s for the default model."""
    crc = 0
    for key in sorted(meta):
        if key != "payload_crc32":
            crc = zlib.crc32(f"{key}={meta[key]}\n".encode(), crc)
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        crc = zlib.crc32(f"{name}:{t.dtype}:{list(t.shape)}\n".encode(), crc)
        crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy(), crc)
    return f"{crc:08x}"


def _read_cache(cache: Path, path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer] | None:
    """The cached conversion, or None (and a warning) if the entry is unreadable, damaged (its
    payload does not match its checksum) or does not match."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(cache), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("resa_cache_format") != CACHE_FORMAT or meta.get("source_name") != path.name:
            return None
        tensors = load_file(str(cache))
        if payload_checksum(tensors, meta) != meta.get("payload_crc32"):
            warnings.warn(f"the GGUF conversion cache {cache} is damaged (its payload does not match its "
                          "checksum); rebuilding it from the GGUF file", stacklevel=4)
            return None
        cfg = _config_from_dict(json.loads(meta["config"]))
        tokenizer = Tokenizer.from_json(meta["tokenizer"])
        return cfg, check_tensors(cfg, tensors, str(cache)), tokenizer
    except Exception as exc:  # any damage to the cache means: rebuild it from the GGUF
        warnings.warn(f"ignoring unreadable GGUF conversion cache {cache} ({exc}); rebuilding it", stacklevel=4)
        return None


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname() or "host")[:40]


def _write_cache(cache: Path, path: Path, cfg: ModelConfig, tensors: dict[str, torch.Tensor],
                 tokenizer: Tokenizer) -> None:
    """Write atomically (a temp file next to the entry, then a rename) so a crash or a concurrent
    reader never sees half a file; the temp name carries host and pid so that the next run can
    tell a dead writer's leftovers (`sweep_stale_temp_files`). Failing to write (read-only home,
    full disk) only costs speed, so it warns instead of raising."""
    from safetensors.torch import save_file

    meta = {"resa_cache_format": CACHE_FORMAT, "source_name": path.name, "config": json.dumps(asdict(cfg)),
            "tokenizer": tokenizer.to_json()}
    payload = {k: v.contiguous() for k, v in tensors.items()}
    meta["payload_crc32"] = payload_checksum(payload, meta)
    tmp = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=f"{cache.stem}.{_host_tag()}.{os.getpid()}.",
                                   suffix=".tmp")
        os.close(fd)
        save_file(payload, tmp, metadata=meta)
        os.replace(tmp, cache)
        tmp = None
        _prune_stale(cache)
    except OSError as exc:
        warnings.warn(f"could not write the GGUF conversion cache {cache} ({exc}); "
                      "set RESA_NO_CACHE=1 to stop trying", stacklevel=4)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


_TEMP_NAME = re.compile(r".*\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[^.]*\.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or cannot tell: keep it
    return True


def sweep_stale_temp_files(folder: Path, now: float | None = None) -> list[Path]:
    """Remove the temp files of conversions that died part-way (killed, out of memory, power
    loss) from the cache folder: those whose writer process on this host is gone, and any older
    than STALE_TEMP_SECONDS (a writer on another host, or a name from older code). Returns the
    removed paths. Never raises: a file that cannot be removed is left for next time."""
    removed = []
    if not folder.is_dir():
        return removed
    now = time.time() if now is None else now
    host = _host_tag()
    for tmp in folder.glob("*.tmp"):
        try:
            m = _TEMP_NAME.fullmatch(tmp.name)
            if m and m.group("host") == host and int(m.group("pid")) != os.getpid():
                dead = not _pid_alive(int(m.group("pid")))
            else:
                dead = False
            if dead or now - tmp.stat().st_mtime > STALE_TEMP_SECONDS:
                tmp.unlink()
                removed.append(tmp)
        except OSError:
            continue
    return removed


def _prune_stale(cache: Path) -> None:
    """Remove older entries of the same GGUF file name (a re-downloaded or edited file)."""
    prefix = cache.name[: -len("-0123456789abcdef.safetensors")]
    for other in cache.parent.glob(f"{prefix}-*.safetensors"):
        if other != cache and re.fullmatch(re.escape(prefix) + r"-[0-9a-f]{16}\.safetensors", other.name):
            other.unlink(missing_ok=True)


def _config_from_dict(d: dict) -> ModelConfig:
    d = dict(d, rope=RopeConfig(**d["rope"]), eos_token_ids=tuple(d["eos_token_ids"]))
    return ModelConfig(**d)
