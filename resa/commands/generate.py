"""`resa generate`: text for one prompt (streamed) or a batch of prompts, from arguments, files or
stdin; `--json` for one JSON object per prompt."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ResaError, UsageError
from . import options


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="generate text with dense / sparse / ReSA decoding",
        description="Generate text. " + options.RESA_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("prompt", nargs="*", help="prompt(s); several make a batch; '-' or none reads stdin")
    p.add_argument("--file", help="read one prompt per file (whole file is one prompt)", action="append")
    options.add_model_args(p)
    options.add_decoding_args(p)
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="wrap the prompt in the model's chat template (default when it has one)")
    chat.add_argument("--no-chat", dest="chat", action="store_false", help="feed the prompt as plain text")
    options.add_engine_args(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt (text, finish reason, token counts, the batch's stats) "
                        "instead of text")
    p.set_defaults(func=run)


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


def run(args: argparse.Namespace) -> int:
    # Everything that can be checked without the model is checked first.
    resa, sampling, stop = options.check_settings(args)
    prompts = _read_prompts(args)
    engine = options.load_engine(args)
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
            prompts, chat=chat, stop=stop, on_text=on_text, on_prefill=options.prefill_bar(args),
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
        if s.mode == "verify":
            obj["stats"].update(verify_windows=s.windows, acceptance_rate=_finite(s.acceptance_rate),
                                tokens_per_window=_finite(s.tokens_per_window), draft_lengths=s.row_draft_lengths)
    return json.dumps(obj, ensure_ascii=False)


def _finite(x: float) -> float | None:
    return x if x == x else None
