"""`resa eval <task>`: argument parsing for the evaluation harness; the work is in the task modules.

Arguments are checked before any model is loaded: sizes and --threads are positive integers
(argparse reports the bad one), --model is a known short name or an existing path, --out is a
folder (created when missing). Errors then pass through the command line's one error boundary
(`resa.cli.run_guarded`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import GROUP_POOLS
from ..errors import UsageError

MODEL_NAMES = ("smollm2", "qwen-coder")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.05,0.1, got {text!r}") from None
    if not values or not all(0 < v and v == v and v != float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers > 0, got {text!r}")
    return values


def _xs(text: str) -> tuple[int, ...]:
    """'32,64,L' -> (32, 64, 0); 0 stands for L (sparse only)."""
    try:
        values = tuple(0 if v.strip().upper() == "L" else int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts or L, such as 32,64,L, "
                                         f"got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts >= 1 or L, got {text!r}")
    return values


def check_model(name: str | None) -> None:
    """--model must be a short name or an existing .gguf file / HF folder."""
    if name in (None, "") or name in MODEL_NAMES:
        return
    p = Path(name).expanduser()
    if not p.exists():
        looks_like_path = any(c in name for c in "/\\.") or name.endswith(".gguf")
        what = "no such file or folder" if looks_like_path else "unknown model name"
        raise UsageError(f"--model {name}: {what}; use one of {', '.join(MODEL_NAMES)}, a .gguf file or a "
                         "Hugging Face model folder")


def check_out(out: str, create: bool) -> Path:
    """--out: a folder; created (with its parents) when create, else it must exist."""
    p = Path(out).expanduser()
    if p.exists() and not p.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder; pass a folder for the results")
    if not p.exists():
        if not create:
            raise UsageError(f"--out {out}: no such folder; pass the results folder the evals wrote "
                             "(default evals/)")
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--out {out}: cannot create the folder ({exc.strerror or exc}); pass a "
                             "writable folder") from exc
    return p


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="smollm2 (default, the installed SmolLM2-135M-Instruct), qwen-coder, or a .gguf path")
    p.add_argument("--out", default="evals", help="results folder (default evals/)")
    p.add_argument("--name", default=None, help="run file name (default: task + size)")
    p.add_argument("--quick", action="store_true", help="tiny sizes on built-in text (CI smoke test)")
    p.add_argument("--threads", type=_positive, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")


def _blocks(p: argparse.ArgumentParser) -> None:
    p.add_argument("--block-size", type=_positive, default=16, help="KV block size in tokens (default 16)")
    p.add_argument("--min-blocks", type=_positive, default=16, help="fewest blocks a sparse step keeps (default 16)")


def _block_tag(s) -> str:
    """'' for the default block settings, else '_bs<size>_mb<min>' (such runs get their own file)."""
    return "" if (s.block_size, s.min_blocks) == (16, 16) else f"_bs{s.block_size}_mb{s.min_blocks}"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `eval` command and its tasks to the top-level parser."""
    p = sub.add_parser("eval", help="quality of ReSA against dense on real models and text")
    tasks = p.add_subparsers(dest="task", required=True)

    lm = tasks.add_parser("lm-sim", help="next-token accuracy with the last x tokens' KV sparse-made")
    _common(lm)
    lm.add_argument("--length", type=_positive, default=8192, help="L, tokens of context (default 8192)")
    lm.add_argument("--xs", type=_xs, default=(32, 64, 128, 256, 1024, 0),
                    help="sparse suffix lengths, L = sparse only (default 32,64,128,256,1024,L)")
    lm.add_argument("--ratios", type=_floats, default=(0.05, 0.1, 0.2), help="active ratios")
    lm.add_argument("--sequences", type=_positive, default=8)
    lm.add_argument("--batch", type=_positive, default=8, help="texts run together")
    lm.add_argument("--corpora", default="essays,bible,shakespeare,code")
    lm.set_defaults(func=_lm_sim)

    dr = tasks.add_parser("drift", help="free greedy generation: dense vs sparse vs ReSA")
    _common(dr)
    dr.add_argument("--prompt-tokens", type=_positive, default=2048)
    dr.add_argument("--new-tokens", type=_positive, default=1024)
    dr.add_argument("--prompts", type=_positive, default=4)
    dr.add_argument("--ratio", type=float, default=0.1)
    dr.add_argument("--rectify-every", type=int, default=32)
    dr.add_argument("--modes", default="dense,sparse,resa-paper,resa-fused",
                    help="comma-separated: dense, sparse, resa-paper, resa-fused, resa-auto (rectify_every=auto), verify")
    dr.add_argument("--corpora", default="essays,bible,shakespeare,code")
    dr.set_defaults(func=_drift)

    rt = tasks.add_parser("retrieval", help="RULER-style retrieval in essays: dense vs ReSA answers")
    _common(rt)
    rt.add_argument("--length", type=_positive, default=4096, help="tokens per sample, prompt + answer (default 4096)")
    rt.add_argument("--tasks", default="single,multikey,multivalue,vt,cwe")
    rt.add_argument("--samples", type=_positive, default=20, help="samples per task")
    rt.add_argument("--batch", type=_positive, default=1,
                    help="samples prefilled and decoded together (default 1; rows keep their own lengths)")
    rt.add_argument("--ratios", type=_floats, default=(0.05, 0.1, 0.2), help="ReSA active ratios")
    rt.add_argument("--rectify-every", type=int, default=32)
    rt.add_argument("--no-chat", action="store_true", help="plain prompts instead of the chat template")
    rt.add_argument("--seed", type=int, default=0)
    rt.add_argument("--group-pool", choices=GROUP_POOLS, default="mean",
                    help="ReSA block score of a KV group: mean query bound (the paper's) or max of the heads' bounds")
    _blocks(rt)
    rt.set_defaults(func=_retrieval)

    gs = tasks.add_parser("gsm8k", help="few-shot chain-of-thought GSM8K: dense vs ReSA, exact match")
    _common(gs)
    gs.add_argument("--items", type=_positive, default=64, help="scored test items")
    gs.add_argument("--shots", type=int, default=8, help="worked examples (first test items, not scored)")
    gs.add_argument("--batch", type=_positive, default=16)
    gs.add_argument("--max-new", type=_positive, default=256)
    gs.add_argument("--ratios", type=_floats, default=(0.1,), help="ReSA active ratios")
    gs.add_argument("--rectify-every", type=int, default=32)
    gs.set_defaults(func=_gsm8k)

    se = tasks.add_parser("selection", help="attention mass and needle kept by the block selection (why retrieval "
                                            "succeeds or fails)")
    _common(se)
    se.add_argument("--length", type=_positive, default=4096, help="tokens per sample, as in retrieval (default 4096)")
    se.add_argument("--tasks", default="single", help="needle tasks: single, multikey, multivalue")
    se.add_argument("--samples", type=_positive, default=10, help="samples per task")
    se.add_argument("--ratio", type=float, default=0.1, help="active ratio (the budget of every variant)")
    se.add_argument("--steps", type=_positive, default=4, help="dense answer steps analysed per sample")
    se.add_argument("--seed", type=int, default=0)
    _blocks(se)
    se.set_defaults(func=_selection)

    cp = tasks.add_parser("compare", help="paired gap of two lm-sim conditions, possibly from two run files")
    cp.add_argument("a", help="run file and condition, FILE:COND, e.g. evals/lm_sim_L4096_sparse_only.json:x0/r0.1")
    cp.add_argument("b", help="the condition subtracted, FILE:COND, e.g. evals/lm_sim_L4096.json:x32/r0.1")
    cp.set_defaults(func=_compare)

    rep = tasks.add_parser("report", help="markdown report and plots from the results folder")
    rep.add_argument("--out", default="evals")
    rep.set_defaults(func=_report)


def _open(args: argparse.Namespace, task: str, settings: dict, default_name: str):
    from .models import file_sha256, load_engine, resolve_model
    from .store import RunStore, versions

    check_model(args.model)
    check_out(args.out, create=True)
    path = resolve_model(args.model)
    engine = load_engine(path, args.threads)
    meta = {"model": path.name, "model_sha256": file_sha256(path), "versions": versions()}
    store = RunStore(Path(args.out), args.name or default_name, task, {**settings, "model": path.name}, meta)
    return engine, store


def _lm_sim(args: argparse.Namespace) -> int:
    from . import lm_sim

    if args.quick:
        s = lm_sim.LMSimSettings(length=320, xs=(32, 96), ratios=(0.1,), sequences=2, batch=2,
                                 corpora=("code", "sample"), min_blocks=4)
    else:
        s = lm_sim.LMSimSettings(length=args.length, xs=args.xs, ratios=args.ratios, sequences=args.sequences,
                                 batch=args.batch, corpora=tuple(args.corpora.split(",")))
    name = f"lm_sim_L{s.length}{_model_tag(args)}" + ("_quick" if args.quick else "")
    return _execute(args, "lm-sim", lm_sim, s, name, "lm_sim_table")


def _drift(args: argparse.Namespace) -> int:
    from . import drift

    if args.quick:
        s = drift.DriftSettings(prompt_tokens=96, new_tokens=48, prompts=2, ratio=0.1, rectify_every=16,
                                min_blocks=2, corpora=("code", "sample"))
    else:
        s = drift.DriftSettings(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, prompts=args.prompts,
                                ratio=args.ratio, rectify_every=args.rectify_every,
                                modes=tuple(args.modes.split(",")), corpora=tuple(args.corpora.split(",")))
    name = f"drift_P{s.prompt_tokens}_G{s.new_tokens}{_model_tag(args)}" + ("_quick" if args.quick else "")
    return _execute(args, "drift", drift, s, name, "drift_table")


def _execute(args: argparse.Namespace, task: str, module, settings, name: str, table: str) -> int:
    """Open (or resume) the run file, run the task's missing cells, summarise, print its table."""
    from . import report

    engine, store = _open(args, task, module.settings_dict(settings), name)
    module.run(engine, store, settings, progress=not args.no_progress)
    summary = module.summarize(store.cells(), store.data["settings"])
    store.finish(summary)
    print(getattr(report, table)(summary))
    print(f"wrote {store.path}")
    return 0


def _model_tag(args: argparse.Namespace) -> str:
    """'' for the default model, else a short name for run file names."""
    if args.model in (None, "", "smollm2"):
        return ""
    return "_" + (args.model if args.model == "qwen-coder" else Path(args.model).stem)


def _retrieval(args: argparse.Namespace) -> int:
    from . import retrieval

    if args.quick:
        s = retrieval.RetrievalSettings(length=384, samples=1, batch=1, ratios=(0.1,), haystack="sample",
                                        words="code", min_blocks=4)
    else:
        s = retrieval.RetrievalSettings(length=args.length, tasks=tuple(args.tasks.split(",")),
                                        samples=args.samples, batch=args.batch, ratios=args.ratios,
                                        rectify_every=args.rectify_every, chat=not args.no_chat, seed=args.seed,
                                        block_size=args.block_size, min_blocks=args.min_blocks,
                                        group_pool=args.group_pool)
    tag = _block_tag(s) + ("" if s.group_pool == "mean" else f"_pool-{s.group_pool}")
    name = f"retrieval_L{s.length}{_model_tag(args)}" + ("_quick" if args.quick else tag)
    return _execute(args, "retrieval", retrieval, s, name, "retrieval_table")


def _gsm8k(args: argparse.Namespace) -> int:
    from . import gsm8k

    if args.quick:
        s = gsm8k.GSM8KSettings(items=1, shots=2, batch=1, max_new=24, source="builtin", min_blocks=2)
    else:
        s = gsm8k.GSM8KSettings(items=args.items, shots=args.shots, batch=args.batch, max_new=args.max_new,
                                ratios=args.ratios, rectify_every=args.rectify_every)
    name = f"gsm8k{_model_tag(args)}" + ("_quick" if args.quick else "")
    return _execute(args, "gsm8k", gsm8k, s, name, "gsm8k_table")


def _selection(args: argparse.Namespace) -> int:
    from . import selection

    if args.quick:
        s = selection.SelectionSettings(length=384, samples=1, steps=2, haystack="sample", words="code", min_blocks=4)
    else:
        s = selection.SelectionSettings(length=args.length, tasks=tuple(args.tasks.split(",")), samples=args.samples,
                                        ratio=args.ratio, steps=args.steps, seed=args.seed,
                                        block_size=args.block_size, min_blocks=args.min_blocks)
    name = f"selection_L{s.length}_r{s.ratio}{_model_tag(args)}" + ("_quick" if args.quick else _block_tag(s))
    return _execute(args, "selection", selection, s, name, "selection_table")


def _compare(args: argparse.Namespace) -> int:
    import json

    from .lm_sim import paired_gap
    from .stats import fmt_ci

    sides = []
    for spec in (args.a, args.b):
        path, sep, cond = spec.rpartition(":")
        if not sep or not Path(path).is_file():
            raise UsageError(f"expected FILE:CONDITION with an existing lm-sim run file, got {spec!r}")
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            cells = data["cells"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise UsageError(f"{path} is not an lm-sim run file ({type(exc).__name__}: {exc})") from exc
        sides.append((cells, cond))
    gap = paired_gap(sides[0][0], sides[0][1], sides[1][0], sides[1][1])
    if not gap["texts"]:
        raise UsageError("the two conditions share no scored texts")
    print(f"{args.a} minus {args.b}, {gap['texts']} shared texts: top-1 {fmt_ci(*gap['top1'])} pp, "
          f"top-3 {fmt_ci(*gap['top3'])} pp, NLL {fmt_ci(*gap['nll'], scale=1, digits=3)} nats/token")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    path = write_report(check_out(args.out, create=False))
    print(f"wrote {path}")
    return 0
