"""Command line: `resa generate | bench | eval`. Parses arguments and calls the library.

Every command runs inside one error boundary (`run_guarded`): resa's own errors, unreadable
files, undecodable input and out-of-memory end as one line on stderr and exit 2 (a usage
error: a bad argument, setting or input) or 1 (anything else); Ctrl-C exits 130 and keeps the
text already written; a closed stdout (`| head`) ends it quietly with 141. `--debug` (or
RESA_DEBUG=1) lets the exception through with its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

from .config import GROUP_POOLS
from .errors import ResaError, UsageError

EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 1, 2, 130, 141

RESA_HELP = """\
ReSA settings (Rectified Sparse Attention):
  Decoding reads only the top --active-ratio of the KV cache's blocks of --block-size tokens,
  chosen per KV head by an upper bound of q.k from each block's key min/max (at least
  --min-blocks blocks, and always the newest --local-blocks), so contexts under
  min_blocks x block_size tokens stay dense. Every --rectify-every (f) generated tokens the last
  f tokens are re-encoded by one dense pass that overwrites their KV, so sparse errors cannot pile
  up. --mode sparse never rectifies; --mode dense is the baseline.
"""


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="generate text with dense / sparse / ReSA decoding",
        description="Generate text. " + RESA_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("prompt", nargs="*", help="prompt(s); several make a batch; '-' or none reads stdin")
    p.add_argument("--file", help="read one prompt per file (whole file is one prompt)", action="append")
    p.add_argument("--model", help="HF folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--mode", choices=("resa", "sparse", "dense"), default="resa",
                   help="resa (sparse steps + rectification, default), sparse (never rectify) or dense")
    p.add_argument("--active-ratio", type=float, default=0.1, help="fraction of blocks read per step (default 0.1)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    p.add_argument("--min-blocks", type=int, default=16, help="blocks always kept (default 16)")
    p.add_argument("--local-blocks", type=int, default=1, help="newest blocks always kept (default 1)")
    p.add_argument("-f", "--rectify-every", type=int, default=32, help="rectify every f tokens (default 32)")
    p.add_argument("--rectify-variant", choices=("paper", "fused"), default="paper",
                   help="paper: separate dense pass; fused: the dense pass also feeds the newest token")
    p.add_argument("--prefill-chunk", type=int, default=1024, help="tokens per prefill chunk")
    p.add_argument("--group-pool", choices=GROUP_POOLS, default="mean",
                   help="block score of a KV group: mean = the bound of the heads' mean query (the paper's), "
                        "max = the largest of the heads' own bounds")
    p.add_argument("-n", "--max-new-tokens", type=int, default=128, help="tokens to generate per prompt (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all, default)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample from the smallest set of tokens whose probability reaches p (default 1.0 = all)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling (default: a fresh one each run)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="wrap the prompt in the model's chat template (default when it has one)")
    chat.add_argument("--no-chat", dest="chat", action="store_false", help="feed the prompt as plain text")
    p.add_argument("--device", default="auto", help="auto (default: the GPU when there is one), cpu or cuda[:N]")
    p.add_argument("--compile", action="store_true",
                   help="CUDA: torch.compile the layer halves of the decode step (fewer kernels; compiles once)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, metavar="FRACTION",
                   help="CUDA: share of the GPU's memory weights, KV pool and activations may use (default 0.9)")
    p.add_argument("--kv-cache-gib", type=float, default=None, metavar="GIB",
                   help="size the KV pool to this many GiB at once (default: grow on demand up to the limit)")
    p.add_argument("--no-prefix-cache", dest="prefix_caching", action="store_false",
                   help="compute every prompt in full instead of reusing the cached blocks of a common prefix")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="CUDA: launch every kernel eagerly instead of replaying captured graphs")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                   help="attention code: auto (Triton kernels on CUDA, torch references on CPU), torch or triton")
    p.add_argument("--quiet", action="store_true", help="no stats line")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt (text, finish reason, token counts, the batch's stats) "
                        "instead of text")
    p.set_defaults(func=_generate)


def _decode_text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} is not valid UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                         "convert it to UTF-8 (e.g. iconv -t UTF-8)") from exc


def _read_file(path: str) -> str:
    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"--file {path}: no such file")
    if p.is_dir():
        raise UsageError(f"--file {path} is a folder; pass a text file (one prompt per file)")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ResaError(f"--file {path}: cannot read it ({exc.strerror or exc})") from exc
    return _decode_text(data, f"--file {path}")


def _read_stdin() -> str:
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # a text stream without bytes underneath (e.g. io.StringIO)
        try:
            return sys.stdin.read()
        except UnicodeDecodeError as exc:
            raise UsageError(f"stdin is not valid UTF-8 text ({exc.reason} at offset {exc.start}); "
                             "convert it to UTF-8") from exc
    return _decode_text(buffer.read(), "stdin")


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = [p for p in args.prompt if p != "-"]
    for path in args.file or []:
        prompts.append(_read_file(path))
    if "-" in args.prompt or not prompts:
        if sys.stdin is None or (sys.stdin.isatty() and not prompts):
            raise UsageError("give a prompt, --file PATH, or pipe text on stdin")
        text = _read_stdin()
        if text.strip():
            prompts.append(text)
    if not prompts:
        raise UsageError("the prompt is empty; give a prompt, --file PATH, or pipe text on stdin")
    return prompts


def _check_model_path(model: str | None) -> None:
    """Fail before any loading when --model cannot be a model."""
    if model is None:
        return
    p = Path(model).expanduser()
    if not p.exists():
        raise UsageError(f"--model {model} does not exist; pass a Hugging Face model folder (config.json + "
                         "*.safetensors + tokenizer.json) or a .gguf file (or leave --model out for the default model)")
    if p.is_dir() and (p / "config.json").is_file() and not (p / "tokenizer.json").is_file():
        raise _no_tokenizer(model)


def _no_tokenizer(model: str | None) -> UsageError:
    return UsageError(f"the model {model} has no tokenizer (no tokenizer.json), so text prompts cannot be encoded; "
                      "save it into the folder (tokenizer.save_pretrained(folder)) or use the Python API's "
                      "generate_ids with token ids")


def _generate(args: argparse.Namespace) -> int:
    from . import validate
    from .config import ResaConfig
    from .engine import Engine
    from .sampling import SamplingConfig

    # Everything that can be checked without the model is checked first.
    resa = ResaConfig(
        mode=args.mode, block_size=args.block_size, active_ratio=args.active_ratio,
        min_blocks=args.min_blocks, local_blocks=args.local_blocks,
        rectify_every=args.rectify_every, rectify_variant=args.rectify_variant,
        prefill_chunk=args.prefill_chunk, group_pool=args.group_pool,
    )
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)
    validate.check_generation_args(resa=resa, sampling=sampling, max_new_tokens=args.max_new_tokens)
    stop = validate.check_stop(args.stop)
    device, _, backend = validate.check_load_args(device=args.device, dtype=None, backend=args.backend)
    validate.check_pool_args(gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_gib=args.kv_cache_gib)
    _check_model_path(args.model)
    prompts = _read_prompts(args)

    engine = Engine.load(args.model, device=str(device), backend=backend, cuda_graphs=args.cuda_graphs,
                         prefix_caching=args.prefix_caching, gpu_memory_utilization=args.gpu_memory_utilization,
                         kv_cache_gib=args.kv_cache_gib)
    if engine.tokenizer is None:
        raise _no_tokenizer(args.model)
    if args.compile:
        engine.model.compile_decode()
    chat = args.chat if args.chat is not None else engine.tokenizer.chat_template is not None
    stream = len(prompts) == 1 and not args.json
    partial = [[] for _ in prompts]

    def on_text(row: int, piece: str) -> None:
        partial[row].append(piece)
        if stream:
            sys.stdout.write(piece)
            sys.stdout.flush()

    try:
        result = engine.generate(
            prompts, chat=chat, stop=stop, on_text=on_text, on_prefill=_prefill_bar(args),
            resa=resa, sampling=sampling, max_new_tokens=args.max_new_tokens,
        )
    except BaseException:
        # Interrupted or failed part-way: what was generated is not lost.
        if stream:
            if partial[0]:
                print(flush=True)
        elif any(partial):
            for i, pieces in enumerate(partial):
                if args.json:
                    print(_json_line(i, "".join(pieces), "interrupted"))
                else:
                    print(f"=== [{i}] (interrupted)\n{''.join(pieces)}")
            sys.stdout.flush()
        raise
    if args.json:
        for i, text in enumerate(result.texts):
            print(_json_line(i, text, result.finish_reasons[i], result))
    elif stream:
        print()
    else:
        for i, text in enumerate(result.texts):
            print(f"=== [{i}] ({result.finish_reasons[i]})\n{text}")
    if not args.quiet:
        print(f"[{result.stats.summary()} finish={','.join(result.finish_reasons)}]", file=sys.stderr)
    return 0


def _prefill_bar(args: argparse.Namespace):
    """A progress line on stderr (a terminal only) for prefills of more than 4 chunks."""
    if args.quiet or not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        if total > 4 * args.prefill_chunk:
            end = "\r" if done < total else "\r" + " " * 40 + "\r"
            print(f"\rprefill {done}/{total} tokens ({100 * done // total}%)", end=end, file=sys.stderr, flush=True)

    return show


def _json_line(i: int, text: str, finish: str, result=None) -> str:
    """Prompt i's result as a JSON line (with token counts and stats when the generation ended)."""
    import json

    obj = {"index": i, "text": text, "finish_reason": finish}
    if result is not None:
        s = result.stats
        tps = s.tokens_per_second
        obj.update(prompt_tokens=s.prompt_tokens[i], completion_tokens=len(result.token_ids[i]),
                   stats={"mode": s.mode, "rectify_variant": s.rectify_variant,
                          "time_to_first_token_s": s.prefill_seconds, "decode_seconds": s.decode_seconds,
                          "tokens_per_second": tps if tps == tps else None,
                          "kv_read_fraction": s.kv_read_fraction, "rectifications": s.rectifications,
                          "prefix_cached_tokens": s.prefix_cached_tokens})
    return json.dumps(obj, ensure_ascii=False)


def _add_bench(sub: argparse._SubParsersAction, full: bool = True) -> None:
    """The `bench` command. Its subcommands' arguments come from the benchmark modules, which
    load torch, so they are only built when `bench` is on the command line (full)."""
    p = sub.add_parser("bench", help="speed benchmarks (GPU): kernels, e2e, paging")
    if not full:
        return
    bsub = p.add_subparsers(dest="bench", required=True)
    k = bsub.add_parser("kernels", help="selection + sparse attention vs SDPA dense decode, per layer")
    e = bsub.add_parser("e2e", help="end-to-end decode tokens/s: dense / sparse / ReSA vs transformers")
    pg = bsub.add_parser("paging", help="paged KV pool: concurrent requests that fit, prefix-cache time to first token")
    try:
        from .bench import e2e as e2e_mod
        from .bench import kernels as kernels_mod
        from .bench import paging as paging_mod
    except Exception as exc:  # noqa: BLE001 -- a broken benchmark module must not break `resa generate`
        reason = f"{type(exc).__name__}: {exc}"

        def unavailable(args: argparse.Namespace) -> int:
            raise ResaError(f"the benchmarks cannot be loaded ({reason}); reinstall resa with its GPU extra "
                            "(pip install -e '.[gpu]')")

        for parser in (k, e, pg):
            parser.add_argument("rest", nargs=argparse.REMAINDER)
            parser.set_defaults(func=unavailable)
        return

    def run_kernels(args: argparse.Namespace) -> int:
        return kernels_mod.run(args) or 0

    def run_e2e(args: argparse.Namespace) -> int:
        e2e_mod.run(args)
        return 0

    kernels_mod.add_arguments(k)
    k.set_defaults(func=run_kernels)
    e2e_mod.add_arguments(e)
    e.set_defaults(func=run_e2e)

    def run_paging(args: argparse.Namespace) -> int:
        paging_mod.run(args)
        return 0

    paging_mod.add_arguments(pg)
    pg.set_defaults(func=run_paging)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from .eval.cli import register

    register(sub)


def build_parser(bench: bool = True) -> argparse.ArgumentParser:
    """The command line's parser; bench=False leaves out the benchmark subcommands' arguments
    (they import torch), which `main` builds only when the command is `bench`."""
    parser = argparse.ArgumentParser(
        prog="resa", description="Rectified Sparse Attention: fast, near-lossless long-context decoding.",
        epilog="Errors end as one line on stderr (exit 2: bad argument or input, 1: other failure, "
               "130: interrupted); --debug or RESA_DEBUG=1 shows the traceback.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="let errors through with their Python traceback (also: RESA_DEBUG=1); "
                             "accepted anywhere before --")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_bench(sub, bench)
    _add_eval(sub)
    return parser


def _command_name(args: argparse.Namespace) -> str:
    parts = ["resa", getattr(args, "command", None), getattr(args, "task", None), getattr(args, "bench", None)]
    return " ".join(p for p in parts if p)


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "(no message)"


def _oom_message(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else "out of memory"
    return (f"out of memory ({_one_line(first)[:200]}); use fewer or shorter prompts, a smaller "
            "-n/--max-new-tokens or --prefill-chunk, or a machine with more memory")


def error_line(exc: BaseException) -> tuple[str, int]:
    """The one line the command line prints for `exc`, and the exit status."""
    import torch

    if isinstance(exc, ResaError):
        return _one_line(exc), exc.exit_code
    if isinstance(exc, UnicodeDecodeError):
        return _one_line(f"input is not valid UTF-8 text ({exc.reason} at offset {exc.start}); convert it to "
                         "UTF-8"), EXIT_USAGE
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return _oom_message(exc), EXIT_RUNTIME
    if isinstance(exc, ValueError):  # argument errors of code outside resa's family (e.g. too long a prompt)
        return _one_line(exc), EXIT_USAGE
    if isinstance(exc, OSError):
        name = f"{exc.filename}: " if exc.filename else ""
        return _one_line(f"{name}{exc.strerror or exc}"), EXIT_RUNTIME
    if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower():
        return _oom_message(exc), EXIT_RUNTIME
    return _one_line(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback "
                     "and report it)"), EXIT_RUNTIME


def run_guarded(name: str, fn: Callable[[], int | None], debug: bool = False) -> int:
    """Run one command: its errors become one line on stderr and an exit status (see the module
    docstring); with debug they propagate unchanged."""
    if debug:
        return fn() or 0
    try:
        return fn() or 0
    except KeyboardInterrupt:
        _flush()
        print(f"{name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout went away (`resa generate ... | head`): stop quietly, as the
        # shell's own tools do, and keep Python from complaining again when it flushes at exit.
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 -- the boundary: nothing escapes as a traceback
        _flush()
        message, code = error_line(exc)
        print(f"{name}: error: {message}", file=sys.stderr)
        return code


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _flush() -> None:
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass


def _split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """Take every --debug before a '--' out of argv, so it works after the subcommand too."""
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end]
    return [a for i, a in enumerate(argv) if not (i < end and a == "--debug")], debug


def main(argv: list[str] | None = None) -> int:
    argv, debug = _split_debug(list(sys.argv[1:] if argv is None else argv))
    debug = debug or os.environ.get("RESA_DEBUG", "") not in ("", "0")
    args = build_parser(bench="bench" in argv).parse_args(argv)
    return run_guarded(_command_name(args), lambda: args.func(args), debug)


if __name__ == "__main__":
    sys.exit(main())
