"""`resa chat`: an interactive multi-turn conversation with the model's chat template.

Each line read from stdin is a user turn; the reply streams to stdout. The whole conversation is
rendered with the template every turn, so the prefix cache of the KV pool reuses the blocks of
the turns before (only the new turn and the reply are computed). `/reset` starts over, `/exit`
(or the end of input) ends the chat.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import UsageError
from . import options


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat", help="interactive multi-turn chat with the model's chat template",
        description="Chat with the model: one user turn per line of stdin, replies stream to stdout; /reset "
                    "starts over, /exit or end of input ends. " + options.RESA_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    options.add_model_args(p)
    p.add_argument("--system", default=None, help="system message that opens the conversation")
    options.add_decoding_args(p)
    options.add_engine_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    resa, sampling, stop = options.check_settings(args)
    engine = options.load_engine(args)
    if engine.tokenizer.chat_template is None:
        raise UsageError("this model has no chat template, so it cannot chat; use `resa generate --no-chat` "
                         "for plain-text prompts")
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    interactive = sys.stdin is not None and sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline() if sys.stdin is not None else ""
        if not line:
            return 0
        turn = line.strip()
        if turn in ("/exit", "/quit"):
            return 0
        if turn == "/reset":
            messages = list(start)
            continue
        if not turn:
            continue
        messages.append({"role": "user", "content": turn})
        text = engine.tokenizer.apply_chat_template(messages)

        def on_text(row: int, piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        result = engine.generate([text], chat=False, stop=stop, on_text=on_text, on_prefill=options.prefill_bar(args),
                                 resa=resa, sampling=sampling, max_new_tokens=args.max_new_tokens)
        print(flush=True)
        messages.append({"role": "assistant", "content": result.texts[0]})
        if not args.quiet:
            print(f"[{result.stats.summary()} finish={result.finish_reasons[0]}]", file=sys.stderr)
