"""`resa serve`: the OpenAI-compatible HTTP server with continuous batching (docs/server.md).

Flags: the model, ReSA and engine flags of `resa generate` (the sampling flags and -n are the
defaults of requests that leave those fields out), plus the server's own, named as vLLM names
them where they mean the same. Nothing heavy is imported before the arguments are parsed.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from ..errors import UsageError
from . import options


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server (continuous batching, streaming, /metrics)",
        description="Serve the model over HTTP: POST /v1/completions and /v1/chat/completions (streaming or not), "
                    "GET /v1/models, /health and /metrics. Request fields left out take the sampling flags below "
                    "(-n is the default max_tokens); a request's \"resa\" object overrides the ReSA flags. "
                    "SIGTERM stops admitting, lets running requests finish (at most --shutdown-timeout s) and "
                    "exits 0. " + options.RESA_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    options.add_model_args(p)
    p.add_argument("--random-weights", metavar="SHAPE", default=None,
                   help="serve a model of a named shape with random weights (speed benchmarks; text is "
                        "meaningless): qwen2.5-7b, llama-3.1-8b or qwen2.5-0.5b")
    p.add_argument("--tokenizer", metavar="PATH", default=None,
                   help="with --random-weights: the tokenizer of this HF folder (tokenizer.json) or .gguf file "
                        "(default: the default model's)")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model name(s) requests may ask for (default: the --model argument, or the default "
                        "model's name); the first is the one responses report")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: none; "
                        "also read from RESA_API_KEY)")
    s.add_argument("--max-num-seqs", type=int, default=16, help="requests decoding at once (default 16)")
    s.add_argument("--max-model-len", type=int, default=None,
                   help="most tokens (prompt + max_tokens) of one request (default: the model's context)")
    s.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="prompt tokens prefilled per iteration across requests: lower keeps running streams "
                        "smooth while long prompts arrive, higher gives a shorter time to first token (default 2048)")
    s.add_argument("--max-waiting", type=int, default=1024,
                   help="requests queued beyond the running ones before new ones get 503 (default 1024)")
    s.add_argument("--max-body-bytes", type=int, default=8 << 20,
                   help="largest request body; larger ones get 413 (default 8 MiB)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds running requests may take to finish before they are cancelled "
                        "(default 30)")
    options.add_decoding_args(p)
    options.add_engine_args(p)
    p.set_defaults(func=run)


def check_server_args(args: argparse.Namespace) -> None:
    from .. import validate

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting", "max_body_bytes"):
        validate._positive_int(f"--{name.replace('_', '-')}", getattr(args, name))
    if args.max_model_len is not None:
        validate._positive_int("--max-model-len", args.max_model_len)
    if not args.shutdown_timeout >= 0:
        raise UsageError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if args.tokenizer is not None:
        if args.random_weights is None:
            raise UsageError("--tokenizer goes with --random-weights (a model brings its own tokenizer)")
        if not Path(args.tokenizer).expanduser().exists():
            raise UsageError(f"--tokenizer {args.tokenizer} does not exist; pass an HF folder with tokenizer.json "
                             "or a .gguf file")
    if args.random_weights is not None:
        if args.model is not None:
            raise UsageError("--random-weights and --model exclude each other")
        from ..random_model import SHAPES

        if args.random_weights not in SHAPES:
            raise UsageError(f"--random-weights {args.random_weights!r} is not a known shape; known: "
                             f"{', '.join(SHAPES)}")


def load_random_engine(args: argparse.Namespace):
    """A random-weight model of a named shape, with the default model's tokenizer."""
    import torch

    from .. import validate
    from ..default_model import default_model_path
    from ..engine import Engine, compile_by_default
    from ..random_model import random_model

    device, _, backend = validate.check_load_args(device=args.device, dtype=None, backend=args.backend)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model(args.random_weights, device=device, dtype=dtype, backend=backend)
    tokenizer = load_tokenizer(args.tokenizer if args.tokenizer is not None else default_model_path())
    engine = Engine(model, tokenizer, cuda_graphs=args.cuda_graphs, prefix_caching=args.prefix_caching,
                    gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_gib=args.kv_cache_gib)
    if compile_by_default(args.compile, device):
        engine.model.compile_decode()
    return engine


def load_tokenizer(path):
    """The tokenizer of an HF folder or a GGUF file (its header only: no weights are read)."""
    from ..gguf_loader import open_gguf
    from ..tokenizer import Tokenizer

    path = Path(path).expanduser()
    return Tokenizer.from_hf_folder(path) if path.is_dir() else Tokenizer.from_gguf(open_gguf(path))


def model_names(args: argparse.Namespace) -> list[str]:
    if args.served_model_name:
        return list(args.served_model_name)
    if args.random_weights is not None:
        return [args.random_weights]
    return [args.model if args.model is not None else "SmolLM2-135M-Instruct"]


def run(args: argparse.Namespace) -> int:
    import os

    resa, sampling, stop = options.check_settings(args)
    check_server_args(args)
    api_key = args.api_key if args.api_key is not None else os.environ.get("RESA_API_KEY") or None

    import uvicorn

    from ..server.app import ServerSettings, create_app

    log = logging.getLogger("resa.server")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    logging.getLogger("resa.server.access").disabled = args.quiet

    engine = load_random_engine(args) if args.random_weights is not None else options.load_engine(args)
    settings = ServerSettings(
        model_names=model_names(args), resa=resa, sampling=sampling, max_tokens=args.max_new_tokens, stop=stop,
        api_key=api_key, max_body_bytes=args.max_body_bytes, max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
        max_waiting=args.max_waiting, drain_timeout=args.shutdown_timeout)
    app = create_app(engine, settings)
    server_state = app.state.server

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            server_state.draining = True  # stop admitting at once; uvicorn then waits for running responses
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, access_log=False, log_level="info",
                            timeout_graceful_shutdown=args.shutdown_timeout, lifespan="on")
    # uvicorn re-raises the signal it caught once it has shut down; with a handler of our own in
    # place that is a no-op, so a SIGTERM ends in exit status 0.
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: None)
    try:
        log.info("serving %s on http://%s:%d (mode=%s, max_num_seqs=%d, max_model_len=%d)", settings.model_names[0],
                 args.host, args.port, resa.mode, args.max_num_seqs, app.state.batcher.max_model_len)
        Server(config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
