"""Command line: `resa generate | chat | serve | bench | eval`. Parses arguments and calls the library
(the commands live in `resa.commands`, the evaluations in `resa.eval.cli`).

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
from typing import Callable

from .commands import chat as chat_command
from .commands import generate as generate_command
from .commands import serve as serve_command
from .errors import ResaError

EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 1, 2, 130, 141

def _add_bench(sub: argparse._SubParsersAction, full: bool = True) -> None:
    """The `bench` command. Its subcommands' arguments come from the benchmark modules, which
    load torch, so they are only built when `bench` is on the command line (full)."""
    p = sub.add_parser("bench", help="speed benchmarks (GPU): kernels, e2e, paging, serve")
    if not full:
        return
    bsub = p.add_subparsers(dest="bench", required=True)
    k = bsub.add_parser("kernels", help="selection + sparse attention vs SDPA dense decode, per layer")
    e = bsub.add_parser("e2e", help="end-to-end decode tokens/s: dense / sparse / ReSA vs transformers")
    pg = bsub.add_parser("paging", help="paged KV pool: concurrent requests that fit, prefix-cache time to first token")
    sv = bsub.add_parser("serve", help="open-loop load (Poisson arrivals) against a running `resa serve`: TTFT, ITL")
    try:
        from .bench import e2e as e2e_mod
        from .bench import kernels as kernels_mod
        from .bench import paging as paging_mod
        from .bench import serve as serve_mod
    except Exception as exc:  # noqa: BLE001 -- a broken benchmark module must not break `resa generate`
        reason = f"{type(exc).__name__}: {exc}"

        def unavailable(args: argparse.Namespace) -> int:
            raise ResaError(f"the benchmarks cannot be loaded ({reason}); reinstall resa with its GPU extra "
                            "(pip install -e '.[gpu]')")

        for parser in (k, e, pg, sv):
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

    def run_serve(args: argparse.Namespace) -> int:
        rep = serve_mod.run(args)
        return 1 if rep["failed"] else 0

    serve_mod.add_arguments(sv)
    sv.set_defaults(func=run_serve)


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
    generate_command.add(sub)
    chat_command.add(sub)
    serve_command.add(sub)
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
