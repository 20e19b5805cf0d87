"""Command line: `resa generate | bench | eval`. Parses arguments and calls the library."""

from __future__ import annotations

import argparse
import sys

from .config import GROUP_POOLS

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
    p.add_argument("--mode", choices=("resa", "sparse", "dense"), default="resa")
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
    p.add_argument("-n", "--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="wrap the prompt in the model's chat template (default when it has one)")
    chat.add_argument("--no-chat", dest="chat", action="store_false")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--compile", action="store_true",
                   help="CUDA: torch.compile the layer halves of the decode step (fewer kernels; compiles once)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="CUDA: launch every kernel eagerly instead of replaying captured graphs")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto")
    p.add_argument("--quiet", action="store_true", help="no stats line")
    p.set_defaults(func=_generate)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = [p for p in args.prompt if p != "-"]
    for path in args.file or []:
        with open(path, encoding="utf-8") as fh:
            prompts.append(fh.read())
    if "-" in args.prompt or not prompts:
        if sys.stdin.isatty() and not prompts:
            raise SystemExit("resa generate: give a prompt, --file PATH, or pipe text on stdin")
        text = sys.stdin.read()
        if text.strip():
            prompts.append(text)
    if not prompts:
        raise SystemExit("resa generate: the prompt is empty")
    return prompts


def _generate(args: argparse.Namespace) -> int:
    from .config import ConfigError, ResaConfig
    from .engine import Engine, PromptTooLongError
    from .errors import LoaderError
    from .sampling import SamplingConfig

    try:
        resa = ResaConfig(
            mode=args.mode, block_size=args.block_size, active_ratio=args.active_ratio,
            min_blocks=args.min_blocks, local_blocks=args.local_blocks,
            rectify_every=args.rectify_every, rectify_variant=args.rectify_variant,
            prefill_chunk=args.prefill_chunk, group_pool=args.group_pool,
        )
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)
        prompts = _read_prompts(args)
        engine = Engine.load(args.model, device=args.device, backend=args.backend, cuda_graphs=args.cuda_graphs)
        if args.compile:
            engine.model.compile_decode()
        chat = args.chat if args.chat is not None else engine.tokenizer.chat_template is not None
        stream = len(prompts) == 1

        def on_text(row: int, piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        result = engine.generate(
            prompts, chat=chat, stop=args.stop, on_text=on_text if stream else None,
            resa=resa, sampling=sampling, max_new_tokens=args.max_new_tokens,
        )
    except (ConfigError, LoaderError, PromptTooLongError, ValueError) as exc:
        print(f"resa generate: error: {exc}", file=sys.stderr)
        return 2
    if stream:
        print()
    else:
        for i, text in enumerate(result.texts):
            print(f"=== [{i}] ({result.finish_reasons[i]})\n{text}")
    if not args.quiet:
        print(f"[{result.stats.summary()}]", file=sys.stderr)
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="speed benchmarks (GPU)")
    bsub = p.add_subparsers(dest="bench", required=True)
    k = bsub.add_parser("kernels", help="selection + sparse attention vs SDPA dense decode, per layer")

    def run_kernels(args: argparse.Namespace) -> int:
        from .bench import kernels

        return kernels.run(args) or 0

    from .bench import e2e as e2e_mod
    from .bench import kernels as kernels_mod

    kernels_mod.add_arguments(k)
    k.set_defaults(func=run_kernels)
    e = bsub.add_parser("e2e", help="end-to-end decode tokens/s: dense / sparse / ReSA vs transformers")
    e2e_mod.add_arguments(e)
    e.set_defaults(func=lambda args: (e2e_mod.run(args), 0)[1])


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from .eval.cli import register

    register(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resa", description="Rectified Sparse Attention: fast, near-lossless long-context decoding.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_bench(sub)
    _add_eval(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
