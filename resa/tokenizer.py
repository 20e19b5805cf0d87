"""Tokenizer: a thin wrapper over `tokenizers.Tokenizer` plus chat templates and streaming decode.

Built either from a Hugging Face folder (tokenizer.json + tokenizer_config.json) or from the
vocabulary a GGUF file embeds (`Tokenizer.from_gguf`).
BOS handling is done here, not by the backend's post-processor, so `encode(add_bos=...)` means the
same thing for every source.
"""

from __future__ import annotations

import datetime
import json
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from resa.errors import LoaderError

# Literal end-of-turn markers: when a chat template emits one of these, generation must stop on it
# even if the checkpoint's own eos id names a different token.
END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>", "<|end|>",
               "<end_of_turn>", "</s>", "<|eom_id|>")

# GGUF token types (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes as the model families define them (Llama 3 splits digits in runs of up
# to three; Qwen2 one digit at a time). Used with ByteLevel(use_regex=False).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


class Tokenizer:
    """Text <-> token ids for one model.

    bos_token_id: id prepended by `encode(add_bos=True)`, or None.
    eos_token_ids: every id that ends generation (primary eos first, then end-of-turn markers
        the chat template uses, then extra ids from generation_config / GGUF eot/eom).
    chat_template: the Jinja chat template, or None.
    add_bos: whether `encode` prepends BOS when not told otherwise (the model's own default).
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token_id: int | None,
                 eos_token_ids: Sequence[int], chat_template: str | None, add_bos: bool) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(dict.fromkeys(int(i) for i in eos_token_ids))
        self.chat_template = chat_template or None
        self.add_bos = bool(add_bos) and bos_token_id is not None
        if chat_template:
            markers = [backend.token_to_id(m) for m in END_MARKERS if m in chat_template]
            self.eos_token_ids = tuple(dict.fromkeys([*self.eos_token_ids, *(m for m in markers if m is not None)]))

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> "Tokenizer":
        """Load `tokenizer.json` (required) and tokenizer_config / generation_config / config.json
        and `chat_template.jinja` (optional) from a Hugging Face model folder."""
        folder = Path(path)
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise LoaderError(f"{folder}: no tokenizer.json; save the fast tokenizer into the folder "
                              "(tokenizer.save_pretrained(folder)) to use it with resa")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as exc:  # the backend raises a bare Exception on malformed JSON
            raise LoaderError(f"{tok_file}: cannot parse the tokenizer ({exc})") from exc
        tcfg = _read_json(folder / "tokenizer_config.json")
        mcfg = _read_json(folder / "config.json")
        gcfg = _read_json(folder / "generation_config.json")

        bos_id = _token_id(backend, tcfg.get("bos_token"))
        if bos_id is None:
            bos = _ids_field(folder / "config.json", "bos_token_id", mcfg.get("bos_token_id"))
            bos_id = bos[0] if bos else None
        eos: list[int] = []
        eos_token = _token_id(backend, tcfg.get("eos_token"))
        eos += [] if eos_token is None else [eos_token]
        eos += _ids_field(folder / "config.json", "eos_token_id", mcfg.get("eos_token_id"))
        eos += _ids_field(folder / "generation_config.json", "eos_token_id", gcfg.get("eos_token_id"))

        template = _hf_chat_template(folder, tcfg)
        if template is not None and not isinstance(template, str):
            raise LoaderError(f"{folder}: the chat template must be a string, got {type(template).__name__}; "
                              "fix chat_template in tokenizer_config.json")
        add_bos = tcfg.get("add_bos_token")
        if add_bos is None:
            # No explicit flag: follow what the backend's post-processor would do.
            with_special = backend.encode("a", add_special_tokens=True).ids
            add_bos = bos_id is not None and bool(with_special) and with_special[0] == bos_id
        return cls(backend, bos_token_id=bos_id, eos_token_ids=eos, chat_template=template, add_bos=add_bos)

    @classmethod
    def from_gguf(cls, reader: Any) -> "Tokenizer":
        """Build from the vocabulary embedded in a GGUF file (`gguf.GGUFReader`).

        tokenizer.ggml.model "gpt2" -> byte-level BPE from tokens + merges, pre-tokenizer chosen by
        tokenizer.ggml.pre; "llama" -> SentencePiece-style BPE with byte fallback, merges derived
        from the scored vocabulary. Control tokens become special added tokens (skipped by
        decode), user-defined tokens become literal added tokens.
        """
        model = _field(reader, "tokenizer.ggml.model")
        tokens = _field(reader, "tokenizer.ggml.tokens")
        if model is None or tokens is None:
            raise LoaderError("the GGUF file carries no tokenizer (tokenizer.ggml.model/tokens missing)")
        types = _field(reader, "tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
        if model == "gpt2":
            backend = _byte_level_bpe(tokens, _field(reader, "tokenizer.ggml.merges") or [],
                                      _field(reader, "tokenizer.ggml.pre", "default"))
        elif model == "llama":
            scores = _field(reader, "tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
            backend = _sentencepiece_bpe(tokens, scores, types)
        else:
            raise LoaderError(f"GGUF tokenizer model {model!r} is not supported (supported: gpt2, llama); "
                              "load the original Hugging Face folder instead")
        specials = [AddedToken(t, special=True, normalized=False)
                    for t, k in zip(tokens, types) if k == _CONTROL and t]
        literals = [AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == _USER_DEFINED and t]
        backend.add_special_tokens(specials)
        backend.add_tokens(literals)

        bos = _field(reader, "tokenizer.ggml.bos_token_id")
        eos = [_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        add_bos = _field(reader, "tokenizer.ggml.add_bos_token", model == "llama")
        return cls(backend, bos_token_id=bos, eos_token_ids=[i for i in eos if i is not None],
                   chat_template=_field(reader, "tokenizer.chat_template"), add_bos=add_bos)

    def to_json(self) -> str:
        """Serialize everything (backend included) to one JSON string; inverse of `from_json`."""
        return json.dumps({"backend": self.backend.to_str(), "bos_token_id": self.bos_token_id,
                           "eos_token_ids": list(self.eos_token_ids),
                           "chat_template": self.chat_template, "add_bos": self.add_bos})

    @classmethod
    def from_json(cls, text: str) -> "Tokenizer":
        """Rebuild a Tokenizer serialized by `to_json`."""
        d = json.loads(text)
        return cls(tokenizers.Tokenizer.from_str(d["backend"]), bos_token_id=d["bos_token_id"],
                   eos_token_ids=d["eos_token_ids"], chat_template=d["chat_template"], add_bos=d["add_bos"])

    # ---- encode / decode ----------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (added tokens included)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (e.g. "<|im_start|>"), or None if it is not in the vocabulary."""
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`. Special tokens written literally (e.g. "<|im_start|>") map to their
        single id. add_bos: None = the model's default; True prepends BOS unless the text already
        starts with it (as chat templates that emit `bos_token` do); False never adds it."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        want = self.add_bos if add_bos is None else add_bos
        if want:
            if self.bos_token_id is None:
                raise LoaderError("add_bos=True but this tokenizer has no BOS token")
            if not ids or ids[0] != self.bos_token_id:
                ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; control/special tokens are dropped when `skip_special_tokens`."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ---- chat ---------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **variables: Any) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the model's chat template.

        Rendered like transformers does (sandboxed Jinja, trim_blocks + lstrip_blocks,
        `raise_exception`); `variables` are passed to the template (e.g. enable_thinking=False).
        The result still has to be encoded; templates that emit BOS make `encode(add_bos=True)` a no-op.
        """
        if self._template is None:
            raise LoaderError("this model has no chat template; encode plain text instead")
        context = {"bos_token": self._id_to_text(self.bos_token_id),
                   "eos_token": self._id_to_text(self.eos_token_ids[0] if self.eos_token_ids else None),
                   **variables}
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **context)

    @cached_property
    def _template(self) -> Any:
        if self.chat_template is None:
            return None
        return _compile_chat_template(self.chat_template)

    def _id_to_text(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.backend.id_to_token(token_id) or "")


class StreamDecoder:
    """Incremental detokenizer: feed generated ids one at a time, get back only new text.

    Text is released once it decodes cleanly: a multi-byte UTF-8 character split across tokens
    is held back until its last byte arrives. Decoding re-runs over a short window of recent ids
    (not the whole sequence), so each push is O(1) and decoders that depend on context
    (leading-space stripping, byte fallback) behave as in a full `decode`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the decoding window
        self._read = 0    # ids before this index have been released as text

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly "")."""
        self._ids.append(int(token_id))
        before = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        after = self._tok.decode(self._ids[self._prefix:], self._skip)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        # Dropping the window front keeps memory bounded on long generations.
        if self._prefix > 64:
            del self._ids[:self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return after[len(before):]

    def flush(self) -> str:
        """Release whatever is still held back (an incomplete character decodes as U+FFFD)."""
        before = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        after = self._tok.decode(self._ids[self._prefix:], self._skip)
        self._prefix = self._read = len(self._ids)
        return after[len(before):]


# ---- GGUF vocabularies ------------------------------------------------------------------------

def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str) -> tokenizers.Tokenizer:
    vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}  # first id wins on duplicates
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = tokenizers.Tokenizer(BPE(vocab, pairs, ignore_merges=pre in ("llama-bpe", "llama3")))
    tok.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    if pre in ("qwen2", "deepseek-r1-qwen"):
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    return tok


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in ("smollm", "starcoder", "refact"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in ("gpt2", "default"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    regex = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT,
             "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}.get(pre)
    if regex is None:
        raise LoaderError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: gpt2, smollm, "
                          "starcoder, llama-bpe, qwen2, deepseek-r1-qwen); load the original Hugging "
                          "Face folder instead")
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _sentencepiece_bpe(tokens: list[str], scores: list[float], types: list[int]) -> tokenizers.Tokenizer:
    """SentencePiece BPE (Llama 2 / Mistral style): merge order = score of the merged piece."""
    vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}
    ranked: list[tuple[float, int, int, str, str]] = []
    for piece, pid in vocab.items():
        if types[pid] != _NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[pid], vocab[left], vocab[right], left, right))
    ranked.sort()
    unk = next((t for t, k in zip(tokens, types) if k == _UNKNOWN), None)
    model = BPE(vocab, [(r[3], r[4]) for r in ranked], unk_token=unk, fuse_unk=True, byte_fallback=True)
    tok = tokenizers.Tokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return tok


# ---- chat templates ---------------------------------------------------------------------------

class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks): render
    the body unchanged, so templates that use it still work."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template the way transformers renders them (sandboxed, trimmed blocks)."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.datetime.now().strftime(fmt)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise LoaderError(f"the chat template does not compile: {exc}") from exc


# ---- helpers ----------------------------------------------------------------------------------

def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _read_json(path: Path) -> dict:
    """An optional JSON object file of an HF folder ({} when absent); LoaderError naming the
    file when it is not valid JSON or not an object."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoaderError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise LoaderError(f"{path}: must hold a JSON object ({{...}}), got a JSON {type(data).__name__}; "
                          "save the tokenizer again (tokenizer.save_pretrained(folder)) or delete the file")
    return data


def _ids_field(path: Path, key: str, value: Any) -> list[int]:
    """A token id field (`eos_token_id`: an int, a list of ints or null) of a config file."""
    ids = value if isinstance(value, list) else ([] if value is None else [value])
    for i in ids:
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise LoaderError(f"{path}: field {key!r} must be a token id or a list of token ids, got {value!r}")
    return ids


def _token_id(backend: tokenizers.Tokenizer, token: Any) -> int | None:
    if isinstance(token, dict):  # {"content": "<s>", ...} in older tokenizer_config files
        token = token.get("content")
    return backend.token_to_id(token) if isinstance(token, str) else None


def _hf_chat_template(folder: Path, tcfg: dict) -> str | None:
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tcfg.get("chat_template") or _read_json(folder / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template
