"""GGUF files: metadata -> ModelConfig, tensors -> HF names (q/k un-permuted), cache, failures."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from resa import gguf_loader, loader
from resa.config import ConfigError, RopeConfig
from resa.errors import LoaderError
from resa.gguf_loader import GGUFFile, llama3_rope_factors, permute_qk, unpermute_qk
from resa.loader import conversion_cache_path, load_checkpoint
from tests.checkpoints import random_tensors, tiny_config, write_gguf



@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Never write into the user's real cache from tests."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("RESA_NO_CACHE", raising=False)








# ---- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", True),
                                       ("qwen2", False), ("qwen3", False)])
def test_round_trip_exact(tmp_path, arch, tied):
    cfg = tiny_config(arch, tie_word_embeddings=tied)
    tensors = random_tensors(cfg, seed=3)
    ck = load_checkpoint(write_gguf(tmp_path / "m.gguf", cfg, tensors))
    assert ck.config.arch == arch and ck.config.tie_word_embeddings == tied
    assert ck.config.attention_bias == (arch == "qwen2") and ck.config.qk_norm == (arch == "qwen3")
    assert (ck.config.num_heads, ck.config.num_kv_heads, ck.config.head_dim) == (4, 2, 8)
    assert ck.config.max_position_embeddings == 256 and ck.config.rms_norm_eps == pytest.approx(1e-5)
    assert ck.config.bos_token_id == 1 and 2 in ck.config.eos_token_ids
    assert list(ck.tensors) == list(tensors)
    for name, t in tensors.items():
        assert ck.tensors[name].dtype == torch.float32
        assert torch.equal(ck.tensors[name], t), name


def test_conversion_reports_progress_once_per_tensor_and_not_from_the_cache(tmp_path):
    cfg = tiny_config("llama")
    tensors = random_tensors(cfg, seed=3)
    path = write_gguf(tmp_path / "m.gguf", cfg, tensors)
    calls = []
    load_checkpoint(path, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, len(tensors)) for i in range(1, len(tensors) + 1)]
    calls.clear()
    load_checkpoint(path, progress=lambda done, total: calls.append((done, total)))  # the cached conversion
    assert calls == []


def test_llama_file_really_is_permuted(tmp_path):
    """Guards the test itself: what the file holds differs from the HF weights until un-permuted."""
    cfg = tiny_config("llama")
    tensors = random_tensors(cfg)
    reader = gguf_loader.open_gguf(write_gguf(tmp_path / "m.gguf", cfg, tensors))
    stored = next(t for t in reader.tensors if t.name == "blk.0.attn_k.weight")
    raw = torch.from_numpy(np.array(stored.data))
    hf = tensors["model.layers.0.self_attn.k_proj.weight"]
    assert not torch.equal(raw, hf) and torch.equal(unpermute_qk(raw, cfg.num_kv_heads), hf)


def test_header_reader_agrees_with_gguf_package(tmp_path):
    cfg = tiny_config("qwen2")
    meta = {"qwen2.rope.scaling.type": "yarn", "qwen2.rope.scaling.factor": 4.0,
            "qwen2.rope.scaling.original_context_length": 64}
    path = write_gguf(tmp_path / "m.gguf", cfg, random_tensors(cfg), metadata=meta, fp16=True,
                      quant={"model.layers.0.mlp.up_proj.weight": gguf.GGMLQuantizationType.Q5_0})
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    assert set(ours.fields) == set(theirs.fields) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    for key, value in ours.fields.items():
        assert value.contents() == theirs.fields[key].contents(), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert a.tensor_type == b.tensor_type and list(a.shape) == b.shape.tolist()
        assert (a.data_offset, a.n_bytes) == (b.data_offset, b.n_bytes)
        assert np.array_equal(a.data, b.data), a.name


@pytest.mark.parametrize("n_head,d", [(1, 2), (3, 8), (9, 64)])
def test_permute_inverse(n_head, d):
    w = torch.randn(n_head * d, 5)
    assert torch.equal(unpermute_qk(permute_qk(w, n_head), n_head), w)
    b = torch.randn(n_head * d)
    assert torch.equal(unpermute_qk(permute_qk(b, n_head), n_head), b)
    # Row r = 2*i + j of a head in the file is HF row j*D/2 + i (interleaved pairs -> halves).
    assert torch.equal(unpermute_qk(torch.arange(d * n_head), n_head)[:d],
                       torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)]))


def test_f16_tensors_keep_dtype(tmp_path):
    cfg = tiny_config("qwen2")
    tensors = {k: v.half().float() for k, v in random_tensors(cfg).items()}
    ck = load_checkpoint(write_gguf(tmp_path / "m.gguf", cfg, tensors, fp16=True))
    w = ck.tensors["model.layers.1.mlp.down_proj.weight"]
    assert w.dtype == torch.float16 and torch.equal(w.float(), tensors["model.layers.1.mlp.down_proj.weight"])


def test_bf16_tensors_keep_dtype(tmp_path):
    cfg = tiny_config("llama")
    tensors = {k: v.bfloat16().float() for k, v in random_tensors(cfg).items()}
    name = "model.layers.0.self_attn.k_proj.weight"
    ck = load_checkpoint(write_gguf(tmp_path / "m.gguf", cfg, tensors,
                                    quant={name: gguf.GGMLQuantizationType.BF16}))
    assert ck.tensors[name].dtype == torch.bfloat16 and torch.equal(ck.tensors[name].float(), tensors[name])


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1,
                                   gguf.GGMLQuantizationType.Q4_0])
def test_quantized_tensors_dequantize(tmp_path, qtype):
    cfg = tiny_config("llama")
    tensors = random_tensors(cfg)
    name = "model.layers.0.self_attn.q_proj.weight"
    ck = load_checkpoint(write_gguf(tmp_path / "m.gguf", cfg, tensors, quant={name: qtype}))
    expect = gguf.quants.dequantize(gguf.quants.quantize(permute_qk(tensors[name], 4).numpy(), qtype), qtype)
    got = ck.tensors[name]
    assert got.dtype == torch.float32
    assert torch.equal(got, unpermute_qk(torch.from_numpy(expect), 4))
    assert (got - tensors[name]).abs().max() < 0.5  # and it is a faithful approximation


def test_tokenizer_from_gguf(tmp_path):
    cfg = tiny_config()
    tok = load_checkpoint(write_gguf(tmp_path / "m.gguf", cfg, random_tensors(cfg))).tokenizer
    ids = tok.encode("<|im_start|>hello the world")
    assert ids[0] == 1 and tok.decode(ids) == "hello the world"
    assert tok.bos_token_id == 1 and tok.eos_token_ids == (2,) and not tok.add_bos
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]).startswith("<|im_start|>user\nhi")


# ---- RoPE metadata ----------------------------------------------------------------------------

def test_llama3_rope_from_rope_freqs(tmp_path):
    cfg = tiny_config("llama", head_dim=8, max_position_embeddings=131072, rope=RopeConfig(theta=500000.0))
    factors = llama3_rope_factors(500000.0, 8, 8.0, 1.0, 4.0, 8192).astype(np.float32)
    assert factors.min() == 1.0 and factors.max() == 8.0
    path = write_gguf(tmp_path / "m.gguf", cfg, random_tensors(cfg), extra_tensors={"rope_freqs.weight": factors})
    rope = load_checkpoint(path).config.rope
    assert (rope.rope_type, rope.factor, rope.low_freq_factor, rope.high_freq_factor,
            rope.original_max_position_embeddings) == ("llama3", 8.0, 1.0, 4.0, 8192)


def test_unknown_rope_freqs_rejected(tmp_path):
    cfg = tiny_config("llama")
    path = write_gguf(tmp_path / "m.gguf", cfg, random_tensors(cfg),
                      extra_tensors={"rope_freqs.weight": np.array([1.0, 3.0, 2.0, 5.0], np.float32)})
    with pytest.raises(LoaderError, match="rope_freqs"):
        load_checkpoint(path)


def test_yarn_rope_metadata(tmp_path):
    cfg = tiny_config("qwen2")
    meta = {"qwen2.rope.scaling.type": "yarn", "qwen2.rope.scaling.factor": 4.0,
            "qwen2.rope.scaling.original_context_length": 64}
    rope = load_checkpoint(write_gguf(tmp_path / "m.gguf", cfg, random_tensors(cfg), metadata=meta)).config.rope
    assert (rope.rope_type, rope.factor, rope.original_max_position_embeddings) == ("yarn", 4.0, 64)


# ---- failures ---------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [0.02, 0.5, 0.999], ids=["header", "half", "tail"])
def test_truncated_gguf(tmp_path, keep):
    cfg = tiny_config()
    path = write_gguf(tmp_path / "m.gguf", cfg, random_tensors(cfg))
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(LoaderError, match=r"m\.gguf.*truncated"):
        load_checkpoint(path)


def test_unsupported_gguf_architecture(tmp_path):
    cfg = tiny_config()
    path = write_gguf(tmp_path / "m.gguf", cfg, random_tensors(cfg))
    data = path.read_bytes().replace(b"\x05\x00\x00\x00\x00\x00\x00\x00llama", b"\x05\x00\x00\x00\x00\x00\x00\x00gemma", 1)
    path.write_bytes(data)
    with pytest.raises(ConfigError, match="'gemma' is not supported"):
        load_checkpoint(path)


def test_sliding_window_gguf_rejected(tmp_path):
    cfg = tiny_config()
    path = write_gguf(tmp_path / "m.gguf", cfg, random_tensors(cfg), metadata={"llama.attention.sliding_window": 64})
    with pytest.raises(ConfigError, match="sliding-window"):
        load_checkpoint(path)


def test_gguf_missing_tensor(tmp_path):
    cfg = tiny_config()
    tensors = random_tensors(cfg)
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    with pytest.raises(LoaderError, match="missing.*model.layers.1.self_attn.v_proj.weight"):
        load_checkpoint(write_gguf(tmp_path / "m.gguf", cfg, tensors))


def test_unsupported_pre_tokenizer(tmp_path):
    cfg = tiny_config()
    with pytest.raises(LoaderError, match="pre-tokenizer 'tekken'"):
        load_checkpoint(write_gguf(tmp_path / "m.gguf", cfg, random_tensors(cfg), pre="tekken"))


# ---- conversion cache ---------------------------------------------------------------------------

def _load(path):
    ck = load_checkpoint(path)
    return ck.config, ck.tensors, ck.tokenizer


def test_cache_is_used_and_equal(tmp_path, monkeypatch):
    cfg = tiny_config("llama")
    path = write_gguf(tmp_path / "m.gguf", cfg, random_tensors(cfg))
    first = _load(path)
    cache = conversion_cache_path(path)
    assert cache.is_file() and cache.parent == tmp_path / "xdg" / "resa"
    assert not list(cache.parent.glob("*.tmp"))

    def refuse(_):
        raise AssertionError("the GGUF was converted again despite a valid cache")

    monkeypatch.setattr(loader, "load_gguf", refuse)
    second = _load(path)
    assert second[0] == first[0]
    assert all(torch.equal(second[1][k], v) for k, v in first[1].items())
    assert second[2].encode("<|im_start|>hello") == first[2].encode("<|im_start|>hello")
    assert second[2].chat_template == first[2].chat_template


def test_cache_invalidated_by_new_file_and_stale_entry_pruned(tmp_path):
    cfg = tiny_config("llama")
    path = write_gguf(tmp_path / "m.gguf", cfg, random_tensors(cfg, seed=1))
    _load(path)
    old = conversion_cache_path(path)
    tensors = random_tensors(cfg, seed=2)
    write_gguf(path, cfg, tensors)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    _, got, _ = _load(path)
    assert torch.equal(got["model.embed_tokens.weight"], tensors["model.embed_tokens.weight"])
    assert conversion_cache_path(path) != old and not old.exists() and conversion_cache_path(path).is_file()


def test_corrupt_cache_is_rebuilt(tmp_path):
    cfg = tiny_config("llama")
    path = write_gguf(tmp_path / "m.gguf", cfg, random_tensors(cfg))
    _load(path)
    cache = conversion_cache_path(path)
    cache.write_bytes(cache.read_bytes()[:100])
    with pytest.warns(UserWarning, match="unreadable GGUF conversion cache"):
        _, tensors, _ = _load(path)
    assert len(tensors) == len(random_tensors(cfg)) and cache.stat().st_size > 1000


def test_no_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("RESA_NO_CACHE", "1")
    cfg = tiny_config("llama")
    _load(write_gguf(tmp_path / "m.gguf", cfg, random_tensors(cfg)))
    assert not (tmp_path / "xdg").exists()


def _flip_payload_byte(cache: Path, from_end: int = 1000) -> None:
    """Damage one byte of tensor data (the payload sits after the safetensors header)."""
    data = bytearray(cache.read_bytes())
    data[-from_end] ^= 0x40
    cache.write_bytes(bytes(data))


def test_damaged_cache_payload_is_caught_and_rebuilt(tmp_path, monkeypatch):
    cfg = tiny_config("llama")
    tensors = random_tensors(cfg)
    path = write_gguf(tmp_path / "m.gguf", cfg, tensors)
    _load(path)
    cache = conversion_cache_path(path)
    _flip_payload_byte(cache)
    # The damaged entry still parses: only the checksum can tell.
    from safetensors.torch import load_file
    assert len(load_file(str(cache))) == len(tensors)
    with pytest.warns(UserWarning, match="is damaged .* does not match its checksum.*rebuilding"):
        _, got, _ = _load(path)
    assert all(torch.equal(got[k], v) for k, v in tensors.items())

    def refuse(_):
        raise AssertionError("the rebuilt cache entry was not used")

    monkeypatch.setattr(loader, "load_gguf", refuse)
    _, again, _ = _load(path)  # the rebuilt entry is valid: read without converting again
    assert all(torch.equal(again[k], v) for k, v in tensors.items())


def test_damaged_cache_metadata_is_caught(tmp_path):
    """The checksum covers the tokenizer and config strings too, not only the tensors."""
    cfg = tiny_config("llama")
    path = write_gguf(tmp_path / "m.gguf", cfg, random_tensors(cfg))
    _load(path)
    cache = conversion_cache_path(path)
    data = cache.read_bytes()
    cache.write_bytes(data.replace(b"<|im_start|>", b"<|im_stArt|>", 1))
    with pytest.warns(UserWarning, match="does not match its checksum"):
        _, _, tok = _load(path)
    assert tok.token_to_id("<|im_start|>") == 1


def test_cache_temp_files_are_written_next_to_the_entry_and_swept(tmp_path, monkeypatch):
    cfg = tiny_config("llama")
    path = write_gguf(tmp_path / "m.gguf", cfg, random_tensors(cfg))
    cache = conversion_cache_path(path)
    folder = cache.parent
    folder.mkdir(parents=True)
    seen = []
    real_save = loader.os.replace

    def spy(src, dst):
        seen.append(Path(src))
        return real_save(src, dst)

    monkeypatch.setattr(loader.os, "replace", spy)
    host = loader._host_tag()
    dead = subprocess_dead_pid()
    leftovers = {
        "dead-writer": folder / f"{cache.stem}.{host}.{dead}.abc123.tmp",  # killed part-way
        "old-legacy": folder / f"{cache.stem}xyz.tmp",                      # older code, an hour old
    }
    kept = {
        "live-writer": folder / f"{cache.stem}.{host}.{os.getppid()}.def456.tmp",  # still writing
        "fresh-legacy": folder / f"{cache.stem}uvw.tmp",                              # may be in use
        "other-host": folder / f"{cache.stem}.otherhost.{dead}.ghi789.tmp",
    }
    for f in [*leftovers.values(), *kept.values()]:
        f.write_bytes(b"x" * 100)
    old = os.stat(leftovers["old-legacy"]).st_mtime - loader.STALE_TEMP_SECONDS - 60
    os.utime(leftovers["old-legacy"], (old, old))
    _load(path)
    assert seen and seen[0].parent == folder and seen[0].name.startswith(f"{cache.stem}.{host}.{os.getpid()}.")
    for name, f in leftovers.items():
        assert not f.exists(), name
    for name, f in kept.items():
        assert f.exists(), name
    assert cache.is_file()


def subprocess_dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
