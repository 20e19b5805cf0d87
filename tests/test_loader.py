"""Loading Hugging Face safetensors folders: configs, tensors, shards, and every failure mode."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from resa.config import ConfigError, ModelConfig
from resa.errors import LoaderError
from resa.loader import Checkpoint, load_checkpoint
from resa.weights_table import check_tensors, expected_parameters
from tests.checkpoints import VOCAB, hf_config_dict, make_checkpoint, random_tensors, write_hf_folder

















# ---- happy paths ------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,tied,shards", [
    ("llama", False, 1), ("llama", True, 3), ("mistral", False, 2), ("mistral", True, 1),
    ("qwen2", False, 1), ("qwen2", True, 2), ("qwen3", False, 3), ("qwen3", True, 1),
])
def test_hf_folder_loads(tmp_path, arch, tied, shards):
    folder, cfg, tensors = make_checkpoint(tmp_path, arch, tied, shards)
    ck = load_checkpoint(folder)
    assert isinstance(ck, Checkpoint) and ck.source == str(folder)
    assert ck.config.arch == arch and ck.config.tie_word_embeddings == tied
    assert ck.config.attention_bias == (arch == "qwen2") and ck.config.qk_norm == (arch == "qwen3")
    assert ck.config.head_dim == (16 if arch == "qwen3" else 8)
    assert list(ck.tensors) == list(expected_parameters(cfg))
    for name, t in tensors.items():
        assert torch.equal(ck.tensors[name], t), name
    assert ("lm_head.weight" in ck.tensors) == (not tied)


def test_tied_checkpoint_with_redundant_lm_head_is_accepted(tmp_path):
    raw = hf_config_dict("llama", tied=True)
    cfg = ModelConfig.from_hf(raw)
    tensors = random_tensors(cfg)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    ck = load_checkpoint(write_hf_folder(tmp_path / "m", raw, tensors))
    assert "lm_head.weight" not in ck.tensors and len(ck.tensors) == len(expected_parameters(cfg))


def test_file_dtype_is_kept(tmp_path):
    raw = hf_config_dict("qwen2")
    cfg = ModelConfig.from_hf(raw)
    ck = load_checkpoint(write_hf_folder(tmp_path / "m", raw, random_tensors(cfg, dtype=torch.bfloat16)))
    assert {t.dtype for t in ck.tensors.values()} == {torch.bfloat16}


def test_tokenizer_and_stop_tokens(tmp_path):
    folder, _, _ = make_checkpoint(tmp_path)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    ck = load_checkpoint(folder)
    tok = ck.require_tokenizer()
    assert tok.encode("<|im_start|>hello") == [1] + tok.encode("hello")
    assert tok.decode(tok.encode("hello the world")) == "hello the world"
    assert tok.eos_token_ids == (2, 0)
    assert ck.config.eos_token_ids == (2, 0)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_folder_without_tokenizer_loads_weights_only(tmp_path):
    raw = hf_config_dict("llama")
    cfg = ModelConfig.from_hf(raw)
    ck = load_checkpoint(write_hf_folder(tmp_path / "m", raw, random_tensors(cfg), tokenizer=False))
    assert ck.tokenizer is None
    with pytest.raises(LoaderError, match="no tokenizer.json"):
        ck.require_tokenizer()


def test_chat_template_jinja_file_wins(tmp_path):
    folder, _, _ = make_checkpoint(tmp_path)
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert load_checkpoint(folder).tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) == "x!"


# ---- failure modes ----------------------------------------------------------------------------

def test_missing_path(tmp_path):
    with pytest.raises(LoaderError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_no_config_json_points_at_gguf(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(LoaderError, match="no config.json.*model.gguf"):
        load_checkpoint(tmp_path)


def test_no_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict("llama")))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(LoaderError, match="no \\*.safetensors.*pytorch_model.bin"):
        load_checkpoint(tmp_path)


def test_missing_tensor(tmp_path):
    folder, cfg, tensors = make_checkpoint(tmp_path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(LoaderError, match="missing.*model.layers.1.mlp.up_proj.weight"):
        load_checkpoint(folder)


def test_wrong_shape(tmp_path):
    folder, cfg, tensors = make_checkpoint(tmp_path)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(LoaderError, match=r"k_proj.weight has shape \[8, 32\], expected \[16, 32\]"):
        load_checkpoint(folder)


def test_extra_tensor(tmp_path):
    folder, cfg, tensors = make_checkpoint(tmp_path)
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)  # llama without attention_bias
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(LoaderError, match="unexpected.*q_proj.bias"):
        load_checkpoint(folder)


def test_unknown_architecture(tmp_path):
    folder, _, _ = make_checkpoint(tmp_path)
    (folder / "config.json").write_text(json.dumps(hf_config_dict("llama", model_type="gpt_neox")))
    with pytest.raises(ConfigError, match="gpt_neox"):
        load_checkpoint(folder)


def test_sliding_window_mistral_rejected(tmp_path):
    folder, _, _ = make_checkpoint(tmp_path, "mistral")
    (folder / "config.json").write_text(json.dumps(hf_config_dict("mistral", sliding_window=64)))
    with pytest.raises(ConfigError, match="sliding-window"):
        load_checkpoint(folder)


def test_quantized_config_rejected(tmp_path):
    folder, _, _ = make_checkpoint(tmp_path)
    (folder / "config.json").write_text(json.dumps(
        hf_config_dict("llama", quantization_config={"quant_method": "gptq"})))
    with pytest.raises(LoaderError, match="gptq-quantized"):
        load_checkpoint(folder)


@pytest.mark.parametrize("cut", [10, 1000, -100], ids=["header", "mid", "tail"])
def test_truncated_safetensors(tmp_path, cut):
    folder, _, _ = make_checkpoint(tmp_path)
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:cut])
    with pytest.raises(LoaderError, match="model.safetensors.*truncated or corrupt"):
        load_checkpoint(folder)


def test_corrupt_safetensors_header(tmp_path):
    folder, _, _ = make_checkpoint(tmp_path)
    f = folder / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"\xff" * 8  # garbage where the JSON header starts
    f.write_bytes(bytes(data))
    with pytest.raises(LoaderError, match="truncated or corrupt"):
        load_checkpoint(folder)


def test_missing_shard(tmp_path):
    folder, _, _ = make_checkpoint(tmp_path, shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(LoaderError, match="model-00002-of-00002.safetensors.*missing"):
        load_checkpoint(folder)


def test_integer_tensor_rejected(tmp_path):
    folder, cfg, tensors = make_checkpoint(tmp_path)
    tensors["model.norm.weight"] = torch.ones(32, dtype=torch.int8)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(LoaderError, match="model.norm.weight has dtype torch.int8"):
        load_checkpoint(folder)


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\x00" * 64)
    with pytest.raises(LoaderError, match="not a GGUF file"):
        load_checkpoint(f)


def test_check_tensors_reports_expected_and_got():
    cfg = ModelConfig.from_hf(hf_config_dict("qwen3"))
    tensors = random_tensors(cfg)
    assert list(check_tensors(cfg, tensors)) == list(tensors)
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)
    with pytest.raises(LoaderError, match=r"q_norm.weight has shape \[8\], expected \[16\]"):
        check_tensors(cfg, tensors)


# ---- integrity ----------------------------------------------------------------------------------

def test_huge_but_finite_weights_are_accepted(tmp_path):
    """The finite check sums first; a sum that overflows from finite values must not be taken for a NaN."""
    raw = hf_config_dict("llama")
    cfg = ModelConfig.from_hf(raw)
    tensors = random_tensors(cfg)
    tensors["model.embed_tokens.weight"].fill_(3e38)  # the sum overflows to inf, every value is finite
    ck = load_checkpoint(write_hf_folder(tmp_path / "m", raw, tensors))
    assert float(ck.tensors["model.embed_tokens.weight"][0, 0]) == pytest.approx(3e38)


def test_nan_in_a_shard_names_that_shard(tmp_path):
    raw = hf_config_dict("llama")
    cfg = ModelConfig.from_hf(raw)
    tensors = random_tensors(cfg)
    tensors["model.layers.1.input_layernorm.weight"][0] = float("-inf")
    folder = write_hf_folder(tmp_path / "m", raw, tensors, shards=3)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    shard = index["model.layers.1.input_layernorm.weight"]
    with pytest.raises(LoaderError, match=rf"{shard}: tensor model.layers.1.input_layernorm.weight holds 1 "
                                          r"non-finite value\(s\) of 32 \(first: -inf at flat index 0\)"):
        load_checkpoint(folder)


def test_model_vocabulary_larger_than_the_tokenizer_is_fine(tmp_path):
    """Padded embedding tables (vocab_size > tokenizer ids) are common and valid."""
    raw = hf_config_dict("llama", vocab_size=VOCAB + 30)
    cfg = ModelConfig.from_hf(raw)
    ck = load_checkpoint(write_hf_folder(tmp_path / "m", raw, random_tensors(cfg)))
    assert ck.config.vocab_size == VOCAB + 30 and ck.tokenizer.vocab_size == VOCAB


def test_tokenizer_eos_outside_vocabulary(tmp_path):
    folder, _, _ = make_checkpoint(tmp_path)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, VOCAB + 5]}))
    with pytest.raises(LoaderError, match=rf"EOS token id {VOCAB + 5} is outside the model's vocabulary of {VOCAB}"):
        load_checkpoint(folder)


def test_malformed_config_errors_name_the_file(tmp_path):
    folder, _, _ = make_checkpoint(tmp_path)
    (folder / "config.json").write_text(json.dumps(hf_config_dict("llama", num_hidden_layers=-2)))
    with pytest.raises(LoaderError, match=r"ckpt[/\\]config.json: field 'num_hidden_layers' must be a positive integer, got -2"):
        load_checkpoint(folder)
