"""Plot decode tokens/s against context length from an e2e benchmark JSON.

    python -m resa.bench.plot_e2e benchmarks/e2e/h100.json benchmarks/e2e/h100.png
"""

from __future__ import annotations

import json
import sys


def _panels(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """One panel per batch size timed at two or more contexts, plus one of the largest batch
    that fits at each context (where that differs)."""
    contexts = sorted({r["context"] for r in rows})
    panels = []
    for batch in sorted({r["batch"] for r in rows}):
        sel = sorted((r for r in rows if r["batch"] == batch), key=lambda r: r["context"])
        if len(sel) >= 2:
            panels.append((f"batch {batch}", sel))
    largest = [max((r for r in rows if r["context"] == n), key=lambda r: r["batch"]) for n in contexts]
    if any(all(r is not p for p in panel) for _, panel in panels for r in largest):
        panels.append(("largest batch that fits", largest))
    return panels


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(result["rows"])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels):
        modes = [m for m in rows[0]["modes"] if m.endswith("+compile")] or list(rows[0]["modes"])
        for mode in modes:
            ctx = [r["context"] // 1024 for r in rows if mode in r["modes"]]
            tps = [r["modes"][mode]["tokens_per_s"] for r in rows if mode in r["modes"]]
            ax.plot(ctx, tps, marker="o", label=mode.replace("+compile", ""))
        if title.startswith("largest"):
            top = max(max(m["tokens_per_s"] for m in r["modes"].values()) for r in rows)
            for r in rows:
                ax.annotate(f"B{r['batch']}", (r["context"] // 1024, top), ha="center", fontsize=8)
        batch = rows[0]["batch"]
        peers = [p for p in result.get("hf_peer", []) if p.get("batch") == batch and "tokens_per_s" in p
                 and not title.startswith("largest")]
        if peers:
            ax.plot([p["context"] // 1024 for p in peers], [p["tokens_per_s"] for p in peers], "kx",
                    label="transformers generate")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (K tokens)")
        ax.set_ylabel("decode tokens/s (all rows)")
        ax.set_title(title)
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
