"""Bad inputs, table-driven: every one gets resa's own error with a message naming the problem.

Three tables: the command line (`resa.cli.main(argv)`, plus a few real subprocesses for the
no-traceback guarantee), the argument checks of `resa.validate`, and damaged files the tests
write themselves (NaN weights, malformed config files, a tokenizer of another model).
Command-line cases that can fail before a model is loaded must: loading is forbidden there.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from resa import cli, validate
from resa.config import ConfigError, ModelConfig, ResaConfig
from resa.errors import LoaderError, ResaError, UnsupportedModelError, UsageError
from resa.loader import load_checkpoint
from resa.sampling import SamplingConfig
from tests.checkpoints import VOCAB, hf_config_dict, random_tensors, write_gguf, write_hf_folder
from tests.checkpoints import tiny_config as gguf_tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("RESA_NO_CACHE", raising=False)
    monkeypatch.delenv("RESA_DEBUG", raising=False)


# ---- files the cases use ----------------------------------------------------------------------

def hf_folder(tmp_path: Path, *, config: object = None, tokenizer: bool = True, poison: str | None = None,
              dtype=torch.float32, files: dict | None = None, **overrides) -> Path:
    """A tiny llama HF folder; `config` replaces config.json's content (any JSON), `poison` puts a
    NaN into that tensor, `files` adds or replaces files."""
    raw = hf_config_dict("llama", **overrides)
    cfg = ModelConfig.from_hf(hf_config_dict("llama"))
    tensors = random_tensors(cfg, dtype=dtype)
    if poison:
        tensors[poison].view(-1)[3] = float("nan")
    folder = write_hf_folder(tmp_path / "model", raw, tensors, tokenizer=tokenizer, extra_files=files)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def gguf_file(tmp_path: Path, *, poison: str | None = None, value: float = float("nan"), quant=None) -> Path:
    cfg = gguf_tiny_config("llama")
    tensors = random_tensors(cfg)
    if poison:
        tensors[poison].view(-1)[5] = value
    return write_gguf(tmp_path / "m.gguf", cfg, tensors, quant={poison: quant} if quant else None)


def hf_with(tmp_path: Path, **fields) -> Path:
    """A folder whose config.json has `fields` set (None deletes the field)."""
    raw = hf_config_dict("llama")
    for key, value in fields.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    return hf_folder(tmp_path, config=raw)


# ---- the command line -------------------------------------------------------------------------

class FakeEngine:
    """Stands in for a loaded model: streams two pieces, then does `then` (raise or return)."""

    def __init__(self, then: BaseException | None) -> None:
        self.then = then
        self.tokenizer = SimpleNamespace(chat_template=None)
        self.model = SimpleNamespace(compile_decode=lambda: None)

    def generate(self, prompts, *, on_text=None, **kwargs):
        for piece in ("Hello", ", wor"):
            for row in range(len(prompts)):
                on_text(row, piece)
        if self.then is not None:
            raise self.then
        stats = SimpleNamespace(summary=lambda: "stats")
        return SimpleNamespace(texts=["Hello, wor"] * len(prompts), finish_reasons=["length"] * len(prompts),
                               stats=stats)


def _no_loading(*args, **kwargs):
    raise AssertionError("a model was loaded, but this bad input must be rejected before loading")


def _fake(then):
    return lambda *args, **kwargs: FakeEngine(then)


NOT_UTF8 = b"caf\xe9 \xff\xfe"

# (id, argv, stdin bytes, Engine.load stand-in (None: the real one), exit status, message regex)
CLI_CASES = [
    ("device-mps", ["generate", "--device", "mps", "hi"], None, _no_loading, 2, r"device 'mps' is not supported.*'cpu' or 'cuda'"),
    ("device-empty", ["generate", "--device", "", "hi"], None, _no_loading, 2, r"device is empty; use 'auto', 'cpu'"),
    ("device-meta", ["generate", "--device", "meta", "hi"], None, _no_loading, 2, r"device 'meta' is not supported"),
    ("device-foo", ["generate", "--device", "foo", "hi"], None, _no_loading, 2, r"device 'foo' is not a device name"),
    ("device-cuda99", ["generate", "--device", "cuda:99", "hi"], None, _no_loading, 2, r"cuda:99"),
    ("file-missing", ["generate", "--file", "{tmp}/nope.txt"], None, _no_loading, 2, r"--file .*nope.txt: no such file"),
    ("file-is-folder", ["generate", "--file", "{tmp}"], None, _no_loading, 2, r"--file .* is a folder; pass a text file"),
    ("file-not-utf8", ["generate", "--file", "{tmp}/latin1.txt"], None, _no_loading, 2,
     r"--file .*latin1.txt is not valid UTF-8 text \(byte 0xe9 at offset 3\)"),
    ("stdin-not-utf8", ["generate"], NOT_UTF8, _no_loading, 2, r"stdin is not valid UTF-8 text \(byte 0xe9"),
    ("stdin-dash-not-utf8", ["generate", "-"], NOT_UTF8, _no_loading, 2, r"stdin is not valid UTF-8"),
    ("stdin-empty", ["generate"], b"  \n", _no_loading, 2, r"the prompt is empty"),
    ("seed-negative", ["generate", "--seed", "-1", "hi"], None, _no_loading, 2, r"seed must be None or an integer in \[0, 2\*\*64 - 1\], got -1"),
    ("seed-huge", ["generate", "--seed", str(2**64), "hi"], None, _no_loading, 2, r"seed must be .* got 18446744073709551616"),
    ("seed-not-int", ["generate", "--seed", "1.5", "hi"], None, _no_loading, 2, r"--seed: invalid int value: '1.5'"),
    ("temperature-negative", ["generate", "--temperature", "-0.5", "hi"], None, _no_loading, 2, r"temperature must be a number >= 0"),
    ("temperature-inf", ["generate", "--temperature", "inf", "hi"], None, _no_loading, 2, r"temperature must be .* got inf"),
    ("top-p-zero", ["generate", "--top-p", "0", "hi"], None, _no_loading, 2, r"top_p must be a number in \(0, 1\]"),
    ("kv-cache-negative", ["generate", "--kv-cache-gib", "-1", "hi"], None, _no_loading, 2,
     r"kv_cache_gib must be a positive number of GiB"),
    ("gpu-memory-over-1", ["generate", "--gpu-memory-utilization", "1.5", "hi"], None, _no_loading, 2,
     r"gpu_memory_utilization must be a fraction in \(0, 1\], got 1.5"),
    ("top-p-nan", ["generate", "--top-p", "nan", "hi"], None, _no_loading, 2, r"top_p must be .* got nan"),
    ("top-k-negative", ["generate", "--top-k", "-3", "hi"], None, _no_loading, 2, r"top_k must be an integer >= 0"),
    ("active-ratio-zero", ["generate", "--active-ratio", "0", "hi"], None, _no_loading, 2, r"active_ratio must be a number > 0"),
    ("active-ratio-nan", ["generate", "--active-ratio", "nan", "hi"], None, _no_loading, 2, r"active_ratio must be .* got nan"),
    ("block-size-zero", ["generate", "--block-size", "0", "hi"], None, _no_loading, 2, r"block_size must be a positive integer"),
    ("local-over-min", ["generate", "--min-blocks", "2", "--local-blocks", "3", "hi"], None, _no_loading, 2,
     r"local_blocks must be an integer in \[1, min_blocks=2\], got 3"),
    ("rectify-negative", ["generate", "-f", "-1", "hi"], None, _no_loading, 2, r"rectify_every \(f\) must be an integer >= 0"),
    ("prefill-chunk-zero", ["generate", "--prefill-chunk", "0", "hi"], None, _no_loading, 2, r"prefill_chunk must be a positive"),
    ("max-new-zero", ["generate", "-n", "0", "hi"], None, _no_loading, 2, r"max_new_tokens must be >= 1, got 0"),
    ("max-new-float", ["generate", "-n", "2.5", "hi"], None, _no_loading, 2, r"--max-new-tokens: invalid int value: '2.5'"),
    ("stop-empty", ["generate", "--stop", "", "hi"], None, _no_loading, 2, r"stop\[0\] is an empty string"),
    ("model-missing", ["generate", "--model", "{tmp}/nope", "hi"], None, _no_loading, 2,
     r"--model .*nope does not exist; pass a Hugging Face model folder"),
    ("model-no-tokenizer", ["generate", "--model", "{notok}", "hi"], None, _no_loading, 2,
     r"has no tokenizer \(no tokenizer.json\), so text prompts cannot be encoded"),
    ("model-not-gguf", ["generate", "--model", "{tmp}/latin1.txt", "hi"], None, None, 1, r"latin1.txt is not a GGUF file"),
    ("model-nan-weights", ["generate", "--model", "{nan}", "hi"], None, None, 1,
     r"model.safetensors: tensor model.layers.1.mlp.down_proj.weight holds 1 non-finite value"),
    ("model-config-list", ["generate", "--model", "{cfglist}", "hi"], None, None, 1,
     r"config.json: must hold a JSON object .* got a JSON list"),
    ("model-zero-heads", ["generate", "--model", "{zeroheads}", "hi"], None, None, 1,
     r"config.json: field 'num_attention_heads' must be a positive integer, got 0"),
    ("interrupted", ["generate", "hi"], None, _fake(KeyboardInterrupt()), 130, r"resa generate: interrupted$"),
    ("out-of-memory", ["generate", "hi"], None, _fake(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")),
     1, r"out of memory \(CUDA out of memory.*\); use fewer or shorter prompts, a smaller -n/--max-new-tokens"),
    ("internal-error", ["generate", "hi"], None, _fake(RuntimeError("boom")), 1,
     r"internal error: RuntimeError: boom \(rerun with --debug"),
    ("too-long-prompt", ["generate", "hi"], None, _fake(ValueError("prompt of 9000 tokens exceeds the context")), 2,
     r"prompt of 9000 tokens exceeds"),
    ("eval-threads-zero", ["eval", "lm-sim", "--threads", "0"], None, _no_loading, 2, r"argument --threads: must be >= 1, got 0"),
    ("eval-threads-text", ["eval", "drift", "--threads", "two"], None, _no_loading, 2, r"--threads: expected a whole number"),
    ("eval-unknown-model", ["eval", "lm-sim", "--model", "qwen", "--out", "{tmp}/o"], None, _no_loading, 2,
     r"--model qwen: unknown model name; use one of smollm2, qwen-coder"),
    ("eval-missing-gguf", ["eval", "gsm8k", "--model", "{tmp}/x.gguf", "--out", "{tmp}/o"], None, _no_loading, 2,
     r"x.gguf: no such file or folder"),
    ("eval-out-is-file", ["eval", "retrieval", "--out", "{tmp}/latin1.txt"], None, _no_loading, 2,
     r"--out .*latin1.txt is a file, not a folder"),
    ("eval-out-under-file", ["eval", "selection", "--out", "{tmp}/latin1.txt/sub"], None, _no_loading, 2,
     r"--out .*latin1.txt/sub: cannot create the folder"),
    ("eval-report-missing-out", ["eval", "report", "--out", "{tmp}/none"], None, _no_loading, 2,
     r"--out .*none: no such folder"),
    ("eval-compare-bad-spec", ["eval", "compare", "nofile", "{tmp}/latin1.txt:x32"], None, _no_loading, 2,
     r"expected FILE:CONDITION with an existing lm-sim run file, got 'nofile'"),
    ("eval-compare-not-run-file", ["eval", "compare", "{tmp}/latin1.txt:a", "{tmp}/latin1.txt:b"], None, _no_loading, 2,
     r"latin1.txt is not an lm-sim run file"),
    ("eval-bad-ratios", ["eval", "lm-sim", "--ratios", "0.1,x"], None, _no_loading, 2, r"--ratios: expected comma-separated"),
]


@pytest.fixture
def cli_files(tmp_path):
    (tmp_path / "latin1.txt").write_bytes(NOT_UTF8)
    folders = {}
    for key, kwargs in (("notok", dict(tokenizer=False)), ("nan", dict(poison="model.layers.1.mlp.down_proj.weight")),
                        ("cfglist", dict(config=[{"model_type": "llama"}])),
                        ("zeroheads", dict(num_attention_heads=0))):
        sub = tmp_path / key
        sub.mkdir()
        folders[key] = str(hf_folder(sub, **kwargs))
    return {"tmp": str(tmp_path), **folders}


def run_cli(argv, stdin, monkeypatch, capsys):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv,stdin,load,code,message", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(argv, stdin, load, code, message, cli_files, monkeypatch, capsys):
    if "cuda" in " ".join(argv) and torch.cuda.is_available():
        pytest.skip("this case needs a machine without 99 GPUs; fine on CPU")
    import resa.engine

    if load is not None:
        monkeypatch.setattr(resa.engine.Engine, "load", staticmethod(load))
    argv = [a.format(**cli_files) for a in argv]
    try:
        got, out, err = run_cli(argv, stdin, monkeypatch, capsys)
    except SystemExit as exc:  # argparse's own usage errors
        got = exc.code
        out, err = capsys.readouterr()
    assert got == code, err
    line = err.strip().splitlines()[-1]
    assert re.search(message, line), f"{line!r} does not match {message!r}"
    assert line.startswith(f"resa {argv[0]}"), line
    assert "Traceback" not in err and "Traceback" not in out


def test_cli_interrupt_keeps_streamed_text(monkeypatch, capsys):
    import resa.engine

    monkeypatch.setattr(resa.engine.Engine, "load", staticmethod(_fake(KeyboardInterrupt())))
    code, out, err = run_cli(["generate", "hi"], None, monkeypatch, capsys)
    assert code == 130 and out == "Hello, wor\n" and err == "resa generate: interrupted\n"
    # A batch is not streamed; what each row had when interrupted is still printed.
    code, out, err = run_cli(["generate", "a", "b"], None, monkeypatch, capsys)
    assert code == 130 and out.count("(interrupted)\nHello, wor") == 2
    # With --json, each row's text so far is a JSON line with finish_reason "interrupted".
    code, out, err = run_cli(["generate", "--json", "a", "b"], None, monkeypatch, capsys)
    assert code == 130 and [json.loads(line) for line in out.splitlines()] == [
        {"index": i, "text": "Hello, wor", "finish_reason": "interrupted"} for i in range(2)]


@pytest.mark.parametrize("how", ["flag-first", "flag-after-command", "env"])
def test_debug_lets_the_traceback_through(how, monkeypatch):
    import resa.engine

    monkeypatch.setattr(resa.engine.Engine, "load", staticmethod(_fake(RuntimeError("boom"))))
    argv = {"flag-first": ["--debug", "generate", "hi"], "flag-after-command": ["generate", "--debug", "hi"],
            "env": ["generate", "hi"]}[how]
    if how == "env":
        monkeypatch.setenv("RESA_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(argv)


@pytest.mark.parametrize("args,stdin,code,message", [
    (["generate", "--device", "mps", "hi"], b"", 2, "device 'mps' is not supported"),
    (["generate"], NOT_UTF8, 2, "stdin is not valid UTF-8"),
    (["eval", "lm-sim", "--model", "nosuchmodel"], b"", 2, "unknown model name"),
], ids=["device", "stdin", "eval-model"])
def test_cli_subprocess_has_no_traceback(args, stdin, code, message, tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    env.pop("RESA_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "resa", *args], input=stdin, capture_output=True, cwd=ROOT,
                          env=env, timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == code, err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


# ---- resa.validate ----------------------------------------------------------------------------

V = 50  # vocabulary size for the prompt_ids cases

# (id, call, error type, message regex)
VALIDATE_CASES = [
    ("prompts-str", lambda: validate.check_prompts("Hi"), r"got a single str; pass \[prompt\] for one prompt"),
    ("prompts-bytes", lambda: validate.check_prompts(b"Hi"), r"prompts must be a list of strings, got bytes"),
    ("prompts-int", lambda: validate.check_prompts(3), r"prompts must be a list of strings, got int"),
    ("prompts-empty", lambda: validate.check_prompts([]), r"prompts is empty"),
    ("prompts-item-int", lambda: validate.check_prompts(["a", 7]), r"prompts\[1\] is int, not str; token ids go to generate_ids"),
    ("prompts-item-none", lambda: validate.check_prompts(["a", "b", None]), r"prompts\[2\] is NoneType, not str"),
    ("prompts-dict", lambda: validate.check_prompts({"a": 1}), r"got dict"),
    ("ids-str", lambda: validate.check_prompt_ids("1 2 3", V), r"got a str; text prompts go to generate"),
    ("ids-flat", lambda: validate.check_prompt_ids([1, 2, 3], V), r"flat list of ints; pass \[ids\] for one prompt"),
    ("ids-empty", lambda: validate.check_prompt_ids([], V), r"prompt_ids is empty"),
    ("ids-empty-row", lambda: validate.check_prompt_ids([[1], []], V), r"prompt_ids\[1\] is empty; every prompt needs"),
    ("ids-bool", lambda: validate.check_prompt_ids([[1, True]], V), r"prompt_ids\[0\]\[1\] is True \(bool\)"),
    ("ids-float", lambda: validate.check_prompt_ids([[1, 2.0]], V), r"prompt_ids\[0\]\[1\] is 2.0 \(float\)"),
    ("ids-too-big", lambda: validate.check_prompt_ids([[1, 2], [3, 50]], V),
     r"prompt_ids\[1\]\[1\] = 50 is outside the model's vocabulary of 50 ids \[0, 50\)"),
    ("ids-negative", lambda: validate.check_prompt_ids([[-1]], V), r"prompt_ids\[0\]\[0\] = -1 is outside"),
    ("ids-row-str", lambda: validate.check_prompt_ids([[1], "ab"], V), r"prompt_ids\[1\] must be a sequence of token ids, got str"),
    ("ids-float-tensor", lambda: validate.check_prompt_ids([torch.ones(3)], V), r"prompt_ids\[0\] must be a 1-D integer tensor"),
    ("ids-tensor-1d", lambda: validate.check_prompt_ids(torch.arange(3), V), r"must be 2-D \[batch, tokens\]"),
    ("stop-items-int", lambda: validate.check_stop(["a", 3]), r"stop\[1\] is int, not str"),
    ("stop-empty-str", lambda: validate.check_stop(""), r"stop\[0\] is an empty string"),
    ("stop-number", lambda: validate.check_stop(5), r"stop must be a string or a list of strings, got int"),
    ("resa-dict", lambda: validate.check_generation_args(resa={"mode": "dense"}, sampling=SamplingConfig(), max_new_tokens=4),
     r"resa must be a ResaConfig, got a dict; pass resa=ResaConfig\(\*\*d\)"),
    ("sampling-dict", lambda: validate.check_generation_args(resa=ResaConfig(), sampling={"temperature": 1}, max_new_tokens=4),
     r"sampling must be a SamplingConfig, got a dict; pass sampling=SamplingConfig\(\*\*d\)"),
    ("resa-str", lambda: validate.check_generation_args(resa="dense", sampling=SamplingConfig(), max_new_tokens=4),
     r"resa must be a ResaConfig, got str"),
    ("max-new-float", lambda: validate.check_generation_args(resa=ResaConfig(), sampling=SamplingConfig(), max_new_tokens=2.5),
     r"max_new_tokens must be an integer, got 2.5 \(float\)"),
    ("max-new-bool", lambda: validate.check_generation_args(resa=ResaConfig(), sampling=SamplingConfig(), max_new_tokens=True),
     r"max_new_tokens must be an integer, got True \(bool\)"),
    ("max-new-zero", lambda: validate.check_generation_args(resa=ResaConfig(), sampling=SamplingConfig(), max_new_tokens=0),
     r"max_new_tokens must be >= 1, got 0"),
    ("sync-every-zero", lambda: validate.check_generation_args(resa=ResaConfig(), sampling=SamplingConfig(), max_new_tokens=1,
                                                               sync_every=0), r"sync_every must be >= 1, got 0"),
    ("eos-int", lambda: validate.check_token_ids("eos_token_ids", 2, V), r"got the int 2; pass \[2\]"),
    ("eos-out-of-vocab", lambda: validate.check_token_ids("eos_token_ids", [1, 99], V),
     r"eos_token_ids\[1\] = 99 is outside the model's vocabulary of 50 ids"),
    ("eos-str", lambda: validate.check_token_ids("eos_token_ids", ["</s>"], V), r"eos_token_ids\[0\] is '</s>' \(str\)"),
    ("dtype-str-bad", lambda: validate.check_load_args(device="cpu", dtype="float8", backend="auto"),
     r"dtype 'float8' is not supported; use one of float32, bfloat16, float16"),
    ("dtype-int", lambda: validate.check_load_args(device="cpu", dtype=torch.int64, backend="auto"),
     r"dtype torch.int64 is not supported"),
    ("dtype-float64", lambda: validate.check_load_args(device="cpu", dtype=torch.float64, backend="auto"),
     r"dtype torch.float64 is not supported"),
    ("dtype-number", lambda: validate.check_load_args(device="cpu", dtype=16, backend="auto"), r"dtype must be a torch dtype"),
    ("backend-foo", lambda: validate.check_load_args(device="cpu", dtype=None, backend="foo"),
     r"backend must be one of auto, torch, triton, got 'foo'"),
    ("device-int", lambda: validate.check_load_args(device=0, dtype=None, backend="auto"), r"device must be a str"),
    ("device-mps", lambda: validate.check_load_args(device="mps", dtype=None, backend="auto"), r"'mps' is not supported"),
    ("seed-float", lambda: SamplingConfig(temperature=1.0, seed=2.5), r"seed must be None or an integer"),
    ("seed-bool", lambda: SamplingConfig(seed=True), r"seed must be None or an integer .* got True"),
    ("seed-str", lambda: SamplingConfig(seed="7"), r"seed must be .* got '7'"),
    ("temperature-str", lambda: SamplingConfig(temperature="0.7"), r"temperature must be a number"),
    ("block-size-bool", lambda: ResaConfig(block_size=True), r"block_size must be a positive integer, got True"),
    ("min-blocks-float", lambda: ResaConfig(min_blocks=4.0), r"min_blocks must be an integer >= 1, got 4.0"),
    ("mode-list", lambda: ResaConfig(mode=["resa"]), r"mode must be one of dense, sparse, resa"),
]


@pytest.mark.parametrize("call,message", [c[1:] for c in VALIDATE_CASES], ids=[c[0] for c in VALIDATE_CASES])
def test_validate_rejects(call, message):
    with pytest.raises(UsageError, match=message) as info:
        call()
    assert isinstance(info.value, ValueError) and isinstance(info.value, ResaError)


def test_validate_accepts_and_normalises():
    assert validate.check_prompts(("a", "b")) == ["a", "b"]
    assert validate.check_prompt_ids([(1, 2), np.array([3, 4]), torch.tensor([5])], V) == [[1, 2], [3, 4], [5]]
    assert validate.check_prompt_ids(torch.tensor([[1, 2], [3, 4]]), V) == [[1, 2], [3, 4]]
    assert validate.check_stop("###") == ("###",) and validate.check_stop(None) == ()
    assert validate.check_stop(["a", "bc"]) == ("a", "bc")
    assert validate.check_load_args(device="cpu", dtype="bfloat16", backend="torch") == \
        (torch.device("cpu"), torch.bfloat16, "torch")
    assert validate.check_load_args(device=torch.device("cpu"), dtype=None, backend="auto")[1] is None
    validate.check_generation_args(resa=ResaConfig(), sampling=SamplingConfig(seed=2**64 - 1), max_new_tokens=1)
    assert SamplingConfig(seed=0).seed == 0
    assert validate.check_token_ids("eos_token_ids", None, V) is None
    assert validate.check_token_ids("eos_token_ids", (), V) == () and validate.check_token_ids("e", [0, 49], V) == (0, 49)


# ---- damaged files ----------------------------------------------------------------------------

def _tok_config(tmp_path, content):
    folder = hf_folder(tmp_path)
    (folder / "tokenizer_config.json").write_text(json.dumps(content))
    return folder


def _shrunk_vocab(tmp_path):
    """A tokenizer whose ids run past config.json's vocab_size (it belongs to a bigger model)."""
    raw = hf_config_dict("llama", vocab_size=VOCAB - 2)
    cfg = ModelConfig.from_hf(raw)
    return write_hf_folder(tmp_path / "model", raw, random_tensors(cfg))


def _bad_index(tmp_path):
    folder = hf_folder(tmp_path)
    (folder / "model.safetensors.index.json").write_text(json.dumps(["model.safetensors"]))
    return folder


# (id, builder(tmp_path) -> path, error type, message regex)
FILE_CASES = [
    ("nan-fp32", lambda p: hf_folder(p, poison="model.layers.0.self_attn.q_proj.weight"), LoaderError,
     r"model.safetensors: tensor model.layers.0.self_attn.q_proj.weight holds 1 non-finite value\(s\) of 1024 "
     r"\(first: nan at flat index 3\); the weights are corrupt"),
    ("nan-bf16", lambda p: hf_folder(p, poison="model.norm.weight", dtype=torch.bfloat16), LoaderError,
     r"tensor model.norm.weight holds 1 non-finite"),
    ("inf-gguf-f32", lambda p: gguf_file(p, poison="model.layers.1.mlp.up_proj.weight", value=float("inf")), LoaderError,
     r"m.gguf: tensor blk.1.ffn_up.weight \(model.layers.1.mlp.up_proj.weight\) holds 1 non-finite value\(s\) .* inf"),
    ("nan-gguf-q8", lambda p: gguf_file(p, poison="model.embed_tokens.weight", quant=gguf.GGMLQuantizationType.Q8_0),
     LoaderError, r"tensor token_embd.weight \(model.embed_tokens.weight\) holds \d+ non-finite"),
    ("config-list", lambda p: hf_folder(p, config=[1, 2]), LoaderError, r"config.json: must hold a JSON object .* got a JSON list"),
    ("config-string", lambda p: hf_folder(p, config="llama"), LoaderError, r"config.json: must hold a JSON object .* got a JSON str"),
    ("zero-heads", lambda p: hf_with(p, num_attention_heads=0), LoaderError,
     r"config.json: field 'num_attention_heads' must be a positive integer, got 0"),
    ("heads-as-string", lambda p: hf_with(p, num_attention_heads="4"), LoaderError,
     r"config.json: field 'num_attention_heads' must be a positive integer, got '4'"),
    ("zero-kv-heads", lambda p: hf_with(p, num_key_value_heads=0), LoaderError, r"field 'num_key_value_heads' must be a positive"),
    ("vocab-as-float", lambda p: hf_with(p, vocab_size=262.0), LoaderError, r"field 'vocab_size' must be a positive integer, got 262.0"),
    ("layers-missing", lambda p: hf_with(p, num_hidden_layers=None), LoaderError, r"config.json: required field 'num_hidden_layers' is missing"),
    ("hidden-not-multiple", lambda p: hf_with(p, hidden_size=30, num_attention_heads=4), LoaderError,
     r"hidden_size 30 is not a multiple of num_attention_heads 4"),
    ("eps-string", lambda p: hf_with(p, rms_norm_eps="1e-5"), LoaderError, r"field 'rms_norm_eps' must be a number > 0"),
    ("rope-theta-string", lambda p: hf_with(p, rope_theta="1e4"), LoaderError, r"field 'rope_theta' must be a number > 0"),
    ("rope-scaling-string", lambda p: hf_with(p, rope_scaling="linear"), LoaderError, r"field 'rope_scaling' must be a JSON object"),
    ("eos-string", lambda p: hf_with(p, eos_token_id="</s>"), LoaderError, r"field 'eos_token_id' must be a token id"),
    ("sliding-window-string", lambda p: hf_with(p, sliding_window="4k"), LoaderError, r"field 'sliding_window' must be an integer"),
    ("tokenizer-config-list", lambda p: _tok_config(p, ["<s>"]), LoaderError,
     r"tokenizer_config.json: must hold a JSON object .* got a JSON list"),
    ("generation-config-list", lambda p: hf_folder(p, files={"generation_config.json": "[2]"}), LoaderError,
     r"generation_config.json: must hold a JSON object"),
    ("generation-eos-string", lambda p: hf_folder(p, files={"generation_config.json": '{"eos_token_id": "x"}'}), LoaderError,
     r"generation_config.json: field 'eos_token_id' must be a token id"),
    ("tokenizer-bigger-than-vocab", _shrunk_vocab, LoaderError,
     rf"the tokenizer has token ids up to {VOCAB - 1} .* but the model's vocab_size is {VOCAB - 2}; the tokenizer does not belong"),
    ("index-not-object", _bad_index, LoaderError, r"model.safetensors.index.json: not a valid safetensors index"),
    ("unsupported-arch", lambda p: hf_with(p, model_type="gemma2"), UnsupportedModelError,
     r"config.json: unsupported model_type 'gemma2' in config.json; resa supports llama, mistral, qwen2, qwen3"),
    ("softcapping", lambda p: hf_with(p, final_logit_softcapping=30.0), UnsupportedModelError,
     r"soft-capped attention is not supported"),
]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # quantizing the NaN case
@pytest.mark.parametrize("build,error,message", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_damaged_file_rejected(build, error, message, tmp_path):
    path = build(tmp_path)
    with pytest.raises(error, match=message) as info:
        load_checkpoint(path)
    assert isinstance(info.value, ResaError)


def test_error_family_exit_codes():
    assert issubclass(ConfigError, UsageError) and issubclass(LoaderError, ValueError)
    assert issubclass(UnsupportedModelError, ConfigError)
    assert UsageError.exit_code == ConfigError.exit_code == 2 and LoaderError.exit_code == ResaError.exit_code == 1
    import resa.config

    assert resa.config.ConfigError is ConfigError  # the old import path still works



def test_closed_stdout_ends_quietly(monkeypatch, capsys):
    """`resa generate ... | head`: the reader went away; exit 141 without an error message."""
    import resa.engine

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(resa.engine.Engine, "load", staticmethod(_fake(None)))
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    code = cli.main(["generate", "hi"])
    assert code == 141 and capsys.readouterr().err == ""


# ---- the engine's public methods call the checks first (nothing runs before the error) ----

def _tiny_text_engine():
    from tests.tiny import tiny_engine

    return tiny_engine()


ENGINE_CASES = [
    ("generate-str", lambda e: e.generate("Hi"), r"single str; pass \[prompt\]"),
    ("ids-out-of-vocab", lambda e: e.generate_ids([[1, 2, 97]]), r"prompt_ids\[0\]\[2\] = 97 is outside"),
    ("ids-flat", lambda e: e.generate_ids([1, 2, 3]), "flat list of ints"),
    ("resa-dict", lambda e: e.generate_ids([[1, 2]], resa={"mode": "dense"}), r"ResaConfig\(\*\*d\)"),
    ("max-new-float", lambda e: e.generate_ids([[1, 2]], max_new_tokens=2.5), "max_new_tokens must be an integer"),
    ("eos-out-of-vocab", lambda e: e.generate_ids([[1, 2]], eos_token_ids=[500]), "eos_token_ids"),
    ("decode-not-a-runner", lambda e: e.decode(object(), torch.zeros(1, 97)), "resa.Runner"),
    ("decode-logits-shape", lambda e: e.decode(e.open(2, 8, 4), torch.zeros(1, 97)), r"logits must be \[2, 97\]"),
    ("too-long", lambda e: e.generate_ids([[1] * 4000], max_new_tokens=200), "context of 4096"),
]


@pytest.mark.parametrize("case,call,message", ENGINE_CASES, ids=[c[0] for c in ENGINE_CASES])
def test_engine_methods_reject_bad_arguments(case, call, message):
    with pytest.raises(UsageError, match=message):
        call(_tiny_text_engine())


def test_engine_load_rejects_bad_device_dtype_backend_before_loading():
    from resa.engine import Engine

    for kwargs, message in ((dict(device="mps"), "not supported"), (dict(dtype="float8"), "dtype"),
                            (dict(backend="foo"), "backend must be one of")):
        with pytest.raises(UsageError, match=message):
            Engine.load("/nonexistent/model.gguf", **kwargs)  # fails on the argument, not the path


def test_cli_json_prints_one_object_per_prompt(monkeypatch, capsys):
    """--json: one JSON line per prompt with text, finish reason, token counts and stats (no
    streaming); the stats line on stderr ends with the finish reasons."""
    import json

    import resa.engine
    from resa.generate import GenerationStats

    class JsonEngine(FakeEngine):
        def generate(self, prompts, *, on_text=None, **kwargs):
            for row in range(len(prompts)):
                on_text(row, "Hi")
            stats = GenerationStats("resa", "paper", [5, 7], new_tokens=[2, 1], decode_steps=1,
                                    prefill_seconds=0.25, decode_seconds=0.5, prefix_cached_tokens=4)
            n = len(prompts)
            return resa.engine.GenerationResult([[1, 2], [3]][:n], ["Hi!", "Hi"][:n], ["eos", "length"][:n], stats)

    monkeypatch.setattr(resa.engine.Engine, "load", staticmethod(lambda *a, **k: JsonEngine(None)))
    code, out, err = run_cli(["generate", "--json", "a", "b"], None, monkeypatch, capsys)
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["index"], r["text"], r["finish_reason"], r["prompt_tokens"], r["completion_tokens"]) for r in rows] \
        == [(0, "Hi!", "eos", 5, 2), (1, "Hi", "length", 7, 1)]
    assert rows[0]["stats"]["time_to_first_token_s"] == 0.25 and rows[0]["stats"]["prefix_cached_tokens"] == 4
    assert "ttft=0.25s" in err and err.strip().endswith("finish=eos,length]")
    # One prompt with --json is not streamed either: stdout is exactly one JSON line.
    code, out, _ = run_cli(["generate", "--json", "a"], None, monkeypatch, capsys)
    assert code == 0 and len(out.splitlines()) == 1 and json.loads(out)["text"] == "Hi!"


def test_help_does_not_import_torch():
    """`resa --help` and `resa generate --help` answer at once: nothing on that path loads torch
    (the benchmark subcommands, whose modules do, are built only for `resa bench`)."""
    for argv in (["--help"], ["generate", "--help"], ["chat", "--help"], ["serve", "--help"],
                 ["eval", "--help"]):
        code = ("import sys, runpy; sys.argv = ['resa'] + %r\n"
                "try:\n    runpy.run_module('resa', run_name='__main__')\n"
                "except SystemExit:\n    pass\n"
                "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')") % (argv,)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.stdout.strip().endswith("NO-TORCH"), (argv, out.stdout[-300:], out.stderr[-300:])


class ChatEngine(FakeEngine):
    """A stand-in with a chat template that renders `role:content` turns; replies R1, R2, ..."""

    def __init__(self, template="t"):
        super().__init__(None)
        self.prompts = []
        self.tokenizer = SimpleNamespace(
            chat_template=template,
            apply_chat_template=lambda msgs: "|".join(f"{m['role']}:{m['content']}" for m in msgs))

    def generate(self, prompts, *, on_text=None, chat=None, **kwargs):
        import resa.engine
        from resa.generate import GenerationStats

        assert chat is False  # the conversation is rendered by the command, not by the engine
        self.prompts.append(prompts[0])
        reply = f"R{len(self.prompts)}"
        on_text(0, reply)
        return resa.engine.GenerationResult([[1]], [reply], ["eos"], GenerationStats("resa", "paper", [3], [1]))


def test_chat_renders_the_whole_conversation_each_turn(monkeypatch, capsys):
    import resa.engine

    engine = ChatEngine()
    monkeypatch.setattr(resa.engine.Engine, "load", staticmethod(lambda *a, **k: engine))
    code, out, err = run_cli(["chat", "--system", "be brief"], b"hello\n\nagain\n/reset\nnew\n", monkeypatch, capsys)
    assert code == 0 and out == "R1\nR2\nR3\n"
    assert engine.prompts == ["system:be brief|user:hello",
                              "system:be brief|user:hello|assistant:R1|user:again",
                              "system:be brief|user:new"]
    assert err.count("finish=eos]") == 3
    monkeypatch.setattr(resa.engine.Engine, "load", staticmethod(lambda *a, **k: ChatEngine(template=None)))
    code, out, err = run_cli(["chat"], b"hello\n", monkeypatch, capsys)
    assert code == 2 and "no chat template" in err and "Traceback" not in err
