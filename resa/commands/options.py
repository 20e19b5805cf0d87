"""What `resa generate` and `resa chat` share: the model, ReSA, sampling and engine flags, their
checks (all before the model loads), loading the engine, and the prefill progress line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import GROUP_POOLS
from ..errors import UsageError

RESA_HELP = """\
ReSA settings (Rectified Sparse Attention):
  Decoding reads only the top --active-ratio of the KV cache's blocks of --block-size tokens,
  chosen per KV head by an upper bound of q.k from each block's key min/max (at least
  --min-blocks blocks, and always the newest --local-blocks), so contexts under
  min_blocks x block_size tokens stay dense. Every --rectify-every (f) generated tokens the last
  f tokens are re-encoded by one dense pass that overwrites their KV, so sparse errors cannot pile
  up. --mode sparse never rectifies; --mode dense is the baseline. --mode verify uses the dense
  pass as a checker instead: sparse steps draft up to --draft-max tokens, the dense pass keeps the
  ones dense decoding would have produced, so the output is dense decoding's.
"""


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    """ReSA and sampling settings, and the stop strings."""
    p.add_argument("--mode", choices=("resa", "sparse", "dense", "verify"), default="resa",
                   help="resa (sparse steps + rectification, default), sparse (never rectify), dense, or verify "
                        "(sparse steps draft, the dense pass checks them: output identical to dense)")
    p.add_argument("--active-ratio", type=float, default=0.1, help="fraction of blocks read per step (default 0.1)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    p.add_argument("--min-blocks", type=int, default=16, help="blocks always kept (default 16)")
    p.add_argument("--local-blocks", type=int, default=1, help="newest blocks always kept (default 1)")
    p.add_argument("-f", "--rectify-every", type=_rectify_every, default=32,
                   help="rectify every f tokens (default 32); auto: f moves with the measured drift")
    p.add_argument("--rectify-variant", choices=("paper", "fused"), default="paper",
                   help="paper: separate dense pass; fused: the dense pass also feeds the newest token")
    p.add_argument("--draft-min", type=int, default=2, help="--mode verify: shortest draft per dense check (default 2)")
    p.add_argument("--draft-max", type=int, default=64,
                   help="--mode verify: longest draft per dense check (default 64; the length adapts in between)")
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


def _rectify_every(text: str):
    if text.strip() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Device, KV pool and execution settings, and the stats line."""
    p.add_argument("--device", default="auto", help="auto (default: the GPU when there is one), cpu or cuda[:N]")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the layer halves of the decode step (fewer kernels; compiles once per "
                        "batch size, a few seconds). Default: on with a GPU, off on CPU")
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


def check_settings(args: argparse.Namespace):
    """Everything that can be checked without the model: returns (resa, sampling, stop)."""
    from .. import validate
    from ..config import ResaConfig
    from ..sampling import SamplingConfig

    resa = ResaConfig(
        mode=args.mode, block_size=args.block_size, active_ratio=args.active_ratio,
        min_blocks=args.min_blocks, local_blocks=args.local_blocks,
        rectify_every=args.rectify_every, rectify_variant=args.rectify_variant,
        prefill_chunk=args.prefill_chunk, group_pool=args.group_pool,
        draft_min=args.draft_min, draft_max=args.draft_max,
    )
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)
    validate.check_generation_args(resa=resa, sampling=sampling, max_new_tokens=args.max_new_tokens)
    stop = validate.check_stop(args.stop)
    validate.check_load_args(device=args.device, dtype=None, backend=args.backend)
    validate.check_pool_args(gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_gib=args.kv_cache_gib)
    check_model_path(args.model)
    return resa, sampling, stop


def load_engine(args: argparse.Namespace):
    """The engine of the checked settings, with a tokenizer (text commands need one)."""
    from .. import validate
    from ..engine import Engine

    device, _, backend = validate.check_load_args(device=args.device, dtype=None, backend=args.backend)
    engine = Engine.load(args.model, device=str(device), backend=backend, cuda_graphs=args.cuda_graphs,
                         compile=args.compile, prefix_caching=args.prefix_caching,
                         gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_gib=args.kv_cache_gib,
                         progress=progress_line("converting the GGUF file", "tensors", args))
    if engine.tokenizer is None:
        raise no_tokenizer(args.model)
    return engine


def check_model_path(model: str | None) -> None:
    """Fail before any loading when --model cannot be a model."""
    if model is None:
        return
    p = Path(model).expanduser()
    if not p.exists():
        raise UsageError(f"--model {model} does not exist; pass a Hugging Face model folder (config.json + "
                         "*.safetensors + tokenizer.json) or a .gguf file (or leave --model out for the default model)")
    if p.is_dir() and (p / "config.json").is_file() and not (p / "tokenizer.json").is_file():
        raise no_tokenizer(model)


def no_tokenizer(model: str | None) -> UsageError:
    return UsageError(f"the model {model} has no tokenizer (no tokenizer.json), so text prompts cannot be encoded; "
                      "save it into the folder (tokenizer.save_pretrained(folder)) or use the Python API's "
                      "generate_ids with token ids")


def progress_line(what: str, unit: str, args: argparse.Namespace, min_total: int = 0):
    """A progress(done, total) callback that keeps one line on stderr up to date (a terminal only,
    and only for totals above min_total); None when there is nothing to show."""
    if getattr(args, "quiet", False) or not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        if total > min_total:
            line = f"\r{what} {done}/{total} {unit} ({100 * done // total}%)"
            end = "\r" if done < total else "\r" + " " * (len(line) - 1) + "\r"
            print(line, end=end, file=sys.stderr, flush=True)

    return show


def prefill_bar(args: argparse.Namespace):
    """A progress line on stderr (a terminal only) for prefills of more than 4 chunks."""
    return progress_line("prefill", "tokens", args, 4 * args.prefill_chunk)
