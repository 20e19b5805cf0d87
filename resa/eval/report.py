"""Markdown tables and matplotlib plots from the run files of a results folder."""

from __future__ import annotations

import json
from pathlib import Path

from .stats import fmt_ci


def lm_sim_table(summary: list[dict]) -> str:
    """Top-1/top-3 accuracy and NLL per condition, with 95% intervals and the paired gap to dense
    (percentage points; NLL in nats)."""
    head = ("| condition | texts | top-1 % | top-3 % | top-3 gap vs dense (pp) | NLL | NLL gap | "
            "top-1 agrees with dense % |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in summary:
        lines.append(
            f"| {_cond_name(r['condition'])} | {r['texts']} | {fmt_ci(*r['top1'])} | {fmt_ci(*r['top3'])} | "
            f"{fmt_ci(*r['top3_gap'], digits=2)} | {fmt_ci(*r['nll'], scale=1, digits=3)} | "
            f"{fmt_ci(*r['nll_gap'], scale=1, digits=3)} | {fmt_ci(*r['agree_dense'])} |")
    return "\n".join(lines)


def _cond_name(cond: str) -> str:
    if cond == "dense":
        return "dense"
    parts = cond.split("/")
    ratio = parts[-1][1:]
    if parts[0] == "ub":
        return f"upper bound (all KV dense), active {ratio}"
    x = parts[0][1:]
    return f"x = {'L (sparse only)' if x == '0' else x}, active {ratio}"


def drift_table(summary: dict) -> str:
    """Per mode: NLL of the generated text under the dense model, agreement with the dense
    generation, repetition, with 95% cluster-bootstrap intervals over prompts."""
    lines = ["| mode | NLL under dense (nats/token) | NLL ratio to dense | tokens equal to dense's % | "
             "first divergence (median token) | repeated 4-grams % |", "|---|---|---|---|---|---|"]
    for mode, r in summary["modes"].items():
        lines.append(f"| {mode} | {fmt_ci(*r['nll'], scale=1, digits=3)} | {fmt_ci(*r['nll_ratio'], scale=1, digits=3)} | "
                     f"{fmt_ci(*r['agree'])} | {r['first_divergence']} | {fmt_ci(*r['repeat4'])} |")
    return "\n".join(lines)


def _cond_label(cond: str) -> str:
    return "dense" if cond == "dense" else f"ReSA active {cond.split('/r')[-1]}"


def retrieval_table(summary: dict) -> str:
    """Accuracy (%) per task and condition with 95% intervals, then the paired difference to dense
    (percentage points) with the number of samples ReSA scored higher / lower than dense."""
    conds = summary["conditions"]
    head = "| task | n | " + " | ".join(_cond_label(c) + " %" for c in conds) + " |"
    lines = [head, "|" + "---|" * (len(conds) + 2)]
    rows = list(summary["tasks"].items()) + [("**average**", summary["average"])]
    for task, rec in rows:
        n = next(iter(rec.values()))["n"]
        lines.append(f"| {task} | {n} | " + " | ".join(fmt_ci(*rec[c]["acc"]) for c in conds) + " |")
    others = [c for c in conds if c != "dense"]
    lines += ["", "| task | " + " | ".join(f"{_cond_label(c)} minus dense (pp)" for c in others) + " |",
              "|" + "---|" * (len(others) + 1)]
    for task, rec in rows:
        cells = []
        for c in others:
            r = rec[c]
            extra = f" ({r['better']}+/{r['worse']}-)" if "better" in r else ""
            cells.append(fmt_ci(*r["diff"]) + extra)
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    depth = summary.get("single_by_depth") or {}
    if depth:
        depths = sorted({d for m in depth.values() for d in m}, key=float)
        lines += ["", "Single needle, accuracy % by needle depth (0 = start of the haystack):", "",
                  "| condition | " + " | ".join(depths) + " |", "|" + "---|" * (len(depths) + 1)]
        for c in conds:
            m = depth.get(c, {})
            lines.append(f"| {_cond_label(c)} | " + " | ".join(
                f"{100 * m[d]:.0f}" if d in m else "" for d in depths) + " |")
    return "\n".join(lines)


def gsm8k_table(summary: dict) -> str:
    """Exact-match accuracy per condition (Wilson 95%) and the paired difference to dense."""
    lines = [f"Mean prompt: {summary['prompt_tokens_mean']} tokens.", "",
             "| condition | n | accuracy % | minus dense (pp) | right only here / only dense | mean answer tokens |",
             "|---|---|---|---|---|---|"]
    for cond, r in summary["conditions"].items():
        lines.append(f"| {_cond_label(cond)} | {r['n']} | {fmt_ci(*r['acc'])} | {fmt_ci(*r['diff'])} | "
                     f"{r['only_method']} / {r['only_dense']} | {r['mean_tokens']} |")
    return "\n".join(lines)


def selection_table(summary: dict) -> str:
    """Per block-selection variant: attention mass kept over all layers and KV groups, and needle
    attention kept in the groups that attend to the needle (95% intervals over samples)."""
    lines = [f"{summary['samples']} samples, {summary['retrieval_groups']} (step, layer, KV group) cells attend "
             "to the needle", "",
             "| selection | attention mass kept % | needle attention kept % | needle groups keeping >= 90% % |",
             "|---|---|---|---|"]
    for v, r in summary["variants"].items():
        lines.append(f"| {v} | {fmt_ci(*r['mass_kept'])} | {fmt_ci(*r['needle_kept'])} | {fmt_ci(*r['needle_kept_90'])} |")
    return "\n".join(lines)


def _load_runs(out: Path) -> list[dict]:
    runs = []
    for f in sorted(out.glob("*.json")):
        if ".stale-" in f.name:
            continue
        d = json.loads(f.read_text(encoding="utf-8"))
        if "summary" in d:
            d["_file"] = f.name
            runs.append(d)
    return runs


def write_report(out: Path) -> Path:
    """Write out/REPORT.md (tables of every finished run) and out/*.png plots."""
    runs = _load_runs(out)
    parts = ["# ReSA quality evaluation: measured results", "",
             "Generated by `resa eval report` from the JSON run files in this folder. Intervals are 95% "
             "(cluster bootstrap over texts/prompts; Wilson for proportions). Gaps are paired: the same "
             "texts under dense and under the method.", ""]
    for d in runs:
        s, meta = d["settings"], d["meta"]
        parts.append(f"## {d['task']}: `{d['_file']}`")
        parts.append(f"model `{meta['model']}` (sha256 `{meta['model_sha256'][:16]}...`), "
                     f"torch {meta['versions']['torch']}, cell time {d['timings'].get('total_cell_seconds', '?')} s")
        parts.append("")
        parts.append("settings: `" + json.dumps({k: v for k, v in s.items() if k != 'model'}) + "`")
        parts.append("")
        if d["task"] == "lm-sim":
            parts.append(lm_sim_table(d["summary"]))
            png = _plot_lm_sim(out, d)
        elif d["task"] == "drift":
            parts.append(drift_table(d["summary"]))
            png = _plot_drift(out, d)
        elif d["task"] == "retrieval":
            parts.append(retrieval_table(d["summary"]))
            png = _plot_bars(out, d, "retrieval")
        elif d["task"] == "gsm8k":
            parts.append(gsm8k_table(d["summary"]))
            png = _plot_bars(out, d, "gsm8k")
        elif d["task"] == "selection":
            parts.append(selection_table(d["summary"]))
            png = None
        else:
            png = None
        if png:
            parts += ["", f"![{d['task']}]({png})"]
        parts.append("")
    path = out / "REPORT.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _pyplot():
    """matplotlib.pyplot on the file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(plt, fig, out: Path, d: dict) -> str:
    """Write the figure next to its run file (same stem, .png); returns the file name."""
    name = d["_file"].replace(".json", ".png")
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def _plot_lm_sim(out: Path, d: dict) -> str | None:
    plt = _pyplot()
    if plt is None:
        return None
    summ = d["summary"]
    L = d["settings"]["length"]
    dense = next((r for r in summ if r["condition"] == "dense"), None)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ratios = sorted({float(r["condition"].split("/")[-1][1:]) for r in summ if r["condition"] != "dense"})
    # The paired NLL gap to dense: between-text variance cancels, unlike absolute accuracy.
    for i, ratio in enumerate(ratios):
        pts = sorted((int(r["condition"].split("/")[0][1:]) or L, r["nll_gap"]) for r in summ
                     if r["condition"].startswith("x") and float(r["condition"].split("/")[-1][1:]) == ratio)
        ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts],
                    yerr=[[p[1][0] - p[1][1] for p in pts], [p[1][2] - p[1][0] for p in pts]],
                    marker="o", capsize=3, label=f"KV sparse-made, active {ratio}", color=f"C{i}")
        ub = next((r for r in summ if r["condition"] == f"ub/r{ratio}"), None)
        if ub:
            ax.axhline(ub["nll_gap"][0], ls=":", color=f"C{i}", label=f"upper bound (KV dense), active {ratio}")
    ax.axhline(0.0, color="k", label="dense")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("x: tokens whose KV is sparse-made (L = sparse only)")
    ax.set_ylabel("NLL gap to dense, last 32 tokens (nats/token)")
    ax.set_title(f"LM simulation, {d['meta']['model']}, L={L}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(plt, fig, out, d)


def _plot_drift(out: Path, d: dict) -> str | None:
    plt = _pyplot()
    if plt is None:
        return None
    summ = d["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, (mode, r) in enumerate(summ["modes"].items()):
        b = r["buckets"]
        xs = [x["end"] for x in b]
        axes[0].plot(xs, [x["nll"][0] for x in b], marker="o", label=mode, color=f"C{i}")
        axes[1].plot(xs, [x["agree"][0] * 100 for x in b], marker="o", label=mode, color=f"C{i}")
    axes[0].set_ylabel("NLL under the dense model (nats/token)")
    axes[1].set_ylabel("tokens equal to the dense generation (%)")
    for ax in axes:
        ax.set_xlabel("generated tokens")
        ax.legend(fontsize=7)
    fig.suptitle(f"Drift in greedy generation, {d['meta']['model']}")
    fig.tight_layout()
    return _save(plt, fig, out, d)


def _plot_bars(out: Path, d: dict, task: str) -> str | None:
    """Accuracy per condition (bars with 95% intervals), grouped by retrieval task, or one group."""
    plt = _pyplot()
    if plt is None:
        return None
    summ = d["summary"]
    if task == "retrieval":
        groups = {**summ["tasks"], "average": summ["average"]}
        conds = summ["conditions"]
    else:
        groups = {"GSM8K": summ["conditions"]}
        conds = list(summ["conditions"])
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(groups) + 1.5), 4.0))
    width = 0.8 / len(conds)
    for i, c in enumerate(conds):
        xs, ys, lo, hi = [], [], [], []
        for g, (name, rec) in enumerate(groups.items()):
            m, a, b = rec[c]["acc"]
            xs.append(g + (i - (len(conds) - 1) / 2) * width)
            ys.append(100 * m)
            # max(0, .): matplotlib rejects negative error bars, whatever interval a summary holds.
            lo.append(max(0.0, 100 * (m - a)) if a == a else 0)
            hi.append(max(0.0, 100 * (b - m)) if b == b else 0)
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=_cond_label(c), color=f"C{i}")
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    title = (f"Retrieval, L={d['settings']['length']}" if task == "retrieval" else "GSM8K few-shot CoT")
    ax.set_title(f"{title}, {d['meta']['model']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(plt, fig, out, d)
