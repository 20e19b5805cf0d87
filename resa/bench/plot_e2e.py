"""Plot decode tokens/s against context length from an e2e benchmark JSON.

    python -m resa.bench.plot_e2e benchmarks/e2e/h100.json benchmarks/e2e/h100.png
"""

from __future__ import annotations

import json
import sys


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({row["batch"] for row in result["rows"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        rows = sorted((r for r in result["rows"] if r["batch"] == batch), key=lambda r: r["context"])
        modes = [m for m in rows[0]["modes"] if m.endswith("+compile")] or list(rows[0]["modes"])
        for mode in modes:
            ctx = [r["context"] // 1024 for r in rows if mode in r["modes"]]
            tps = [r["modes"][mode]["tokens_per_s"] for r in rows if mode in r["modes"]]
            ax.plot(ctx, tps, marker="o", label=mode.replace("+compile", ""))
        peers = [p for p in result.get("hf_peer", []) if p.get("batch") == batch and "tokens_per_s" in p]
        if peers:
            ax.plot([p["context"] // 1024 for p in peers], [p["tokens_per_s"] for p in peers], "kx",
                    label="transformers generate")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (K tokens)")
        ax.set_ylabel("decode tokens/s (all rows)")
        ax.set_title(f"batch {batch}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['shape']} shapes, random weights, {result['card']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        raise SystemExit("usage: python -m resa.bench.plot_e2e RESULT.json OUT.png")
    with open(args[0], encoding="utf-8") as fh:
        plot(json.load(fh), args[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
