"""Summaries of finished cells: a table on screen, one JSON document, plots.

Scores are RULER's (0-100), averaged over samples per (method, budget, length, task); the suite average
is the mean over tasks. Attention mass is averaged over samples and decode steps per layer.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def _stderr(xs):
    xs = list(xs)
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def label(method: str, fraction) -> str:
    return method if fraction is None else f"{method}@{fraction:g}"


def summarize(cells: list[dict]) -> dict:
    """{"rows": [...]} with one row per (method, budget, length): per-task mean score, n, suite average."""
    groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    mass: dict[tuple, list[list[float]]] = defaultdict(list)
    oracle: dict[tuple, list[list[float]]] = defaultdict(list)
    for c in cells:
        key = (c["method"], c["topk_fraction"], c["context_length"])
        groups[key][c["task"]].append(float(c["score"]))
        if c.get("captured_mass"):
            mass[key].append(c["captured_mass"])
            oracle[key].append(c["oracle_mass"])
    rows = []
    for (method, fraction, length), per_task in sorted(groups.items(), key=lambda t: (t[0][2], str(t[0][0]), t[0][1] or 0)):
        tasks = {t: {"score": round(_mean(v), 2), "stderr": round(_stderr(v), 2), "n": len(v)}
                 for t, v in sorted(per_task.items())}
        row = {"method": method, "topk_fraction": fraction, "context_length": length, "tasks": tasks,
               "average": round(_mean(t["score"] for t in tasks.values()), 2),
               "samples": sum(t["n"] for t in tasks.values())}
        key = (method, fraction, length)
        if mass.get(key):
            layers = len(mass[key][0])
            row["captured_mass"] = [round(_mean(m[i] for m in mass[key]), 4) for i in range(layers)]
            row["oracle_mass"] = [round(_mean(m[i] for m in oracle[key]), 4) for i in range(layers)]
            row["mean_captured_mass"] = round(_mean(row["captured_mass"]), 4)
            row["mean_oracle_mass"] = round(_mean(row["oracle_mass"]), 4)
        rows.append(row)
    _add_paired_delta(rows, cells)
    return {"rows": rows}


def _add_paired_delta(rows: list[dict], cells: list[dict]) -> None:
    """Per row: its suite average minus dense's on the same samples, with a paired standard error.

    Samples are paired by (task, index) at the row's length; per task the mean difference and its
    variance / n, then the mean over tasks (each task weighs the same, as in the suite average). The
    paired error is much smaller than the unpaired spread of two averages: both methods see the same
    prompts, and most samples score the same under both."""
    dense = {(c["task"], c["context_length"], c["index"]): float(c["score"]) for c in cells if c["method"] == "dense"}
    by_row: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for c in cells:
        ref = dense.get((c["task"], c["context_length"], c["index"]))
        if c["method"] != "dense" and ref is not None:
            by_row[(c["method"], c["topk_fraction"], c["context_length"])][c["task"]].append(float(c["score"]) - ref)
    for row in rows:
        diffs = by_row.get((row["method"], row["topk_fraction"], row["context_length"]))
        if not diffs:
            continue
        means = [_mean(d) for d in diffs.values()]
        var = sum(_stderr(d) ** 2 for d in diffs.values()) / len(diffs) ** 2
        row["delta_vs_dense"] = round(_mean(means), 2)
        row["delta_stderr"] = round(math.sqrt(var), 2)
        row["delta_tasks"] = len(diffs)


def _delta(row: dict) -> str:
    if "delta_vs_dense" not in row:
        return "-"
    return f"{row['delta_vs_dense']:+.1f} ± {row['delta_stderr']:.1f}"


def _row_cells(row: dict, tasks: list[str]) -> list[str]:
    """A row's printed cells after length and method: per-task scores, average, paired delta, decode mass."""
    return [*[f"{row['tasks'][t]['score']:.1f}" if t in row["tasks"] else "-" for t in tasks],
            f"{row['average']:.1f}", _delta(row),
            f"{row['mean_captured_mass']:.3f}" if "mean_captured_mass" in row else "-"]


def format_table(summary: dict) -> str:
    rows = summary["rows"]
    if not rows:
        return "(no finished cells)"
    tasks = sorted({t for r in rows for t in r["tasks"]})
    header = ["length", "method", *tasks, "avg", "vs dense", "mass"]
    lines = [header]
    for r in rows:
        lines.append([str(r["context_length"]), label(r["method"], r["topk_fraction"]), *_row_cells(r, tasks)])
    widths = [max(len(l[i]) for l in lines) for i in range(len(header))]
    out = ["  ".join(c.rjust(w) if j >= 2 else c.ljust(w) for j, (c, w) in enumerate(zip(l, widths))) for l in lines]
    out.insert(1, "-" * len(out[0]))
    n = {r["tasks"][t]["n"] for r in rows for t in r["tasks"]}
    out.append(f"(scores: RULER string match, mean over {min(n)}-{max(n)} samples per cell; mass: mean share of "
               "dense attention mass on the attended keys over decode steps and layers; vs dense: paired "
               "difference of the suite average on the same samples ± its standard error)")
    return "\n".join(out)


def format_markdown(summary: dict) -> str:
    """The summary as a Markdown table (one row per length x method), for notes and the README."""
    rows = summary["rows"]
    if not rows:
        return "(no finished cells)"
    tasks = sorted({t for r in rows for t in r["tasks"]})
    lines = ["| length | method | " + " | ".join(t.replace("_", " ") for t in tasks) + " | avg | vs dense (paired) | decode mass |",
             "|---|---|" + "---|" * (len(tasks) + 3)]
    for r in rows:
        cells = [str(r["context_length"]), label(r["method"], r["topk_fraction"]), *_row_cells(r, tasks)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_table(summary: dict) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        print(format_table(summary))
        return
    rows = summary["rows"]
    tasks = sorted({t for r in rows for t in r["tasks"]})
    table = Table(title="kascade eval (RULER string-match score, 0-100)")
    for col in ["length", "method", *tasks, "avg", "vs dense", "mass"]:
        table.add_column(col, justify="left" if col in ("length", "method") else "right")
    for r in rows:
        table.add_row(str(r["context_length"]), label(r["method"], r["topk_fraction"]), *_row_cells(r, tasks))
    console = Console()
    if not console.is_terminal:
        # Piped or logged output: rich would squeeze the table into 80 columns and cut every cell.
        console = Console(width=max(120, 14 * (len(tasks) + 4)))
    console.print(table)


def write_json(path: Path, summary: dict, metadata: dict, cells: list[dict], extra: dict | None = None) -> None:
    doc = {"kind": "kascade-eval", "metadata": metadata, "summary": summary,
           "cells": [{k: v for k, v in c.items()} for c in cells]}
    if extra:
        doc.update(extra)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def plot(summary: dict, out_dir: Path, prefix: str = "eval") -> list[Path]:
    """score vs budget (one line per method; budget-free methods as horizontal lines) and per-task bars
    per method at each budget; one figure per context length. Returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return []
    written = []
    rows = summary["rows"]
    for length in sorted({r["context_length"] for r in rows}):
        rs = [r for r in rows if r["context_length"] == length]
        budgets = sorted({r["topk_fraction"] for r in rs if r["topk_fraction"] is not None})
        if len(budgets) > 1:
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for method in sorted({r["method"] for r in rs}):
                mr = sorted((r for r in rs if r["method"] == method), key=lambda r: r["topk_fraction"] or 0)
                if mr[0]["topk_fraction"] is None:
                    ax.axhline(mr[0]["average"], ls="--", color="k", label=method)
                elif len(mr) > 1:
                    ax.plot([100 * r["topk_fraction"] for r in mr], [r["average"] for r in mr], marker="o", label=method)
            ax.set_xscale("log")
            ax.minorticks_off()
            ax.set_xticks([100 * b for b in budgets], [f"{100 * b:g}%" for b in budgets])
            ax.set_xlabel("Top-k budget (fraction of keys)")
            ax.set_ylabel("suite average score")
            ax.set_title(f"score vs budget, {length} tokens")
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = out_dir / f"{prefix}_{length}_score_vs_budget.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
        for b in budgets:
            sel = [r for r in rs if r["topk_fraction"] in (None, b)]
            tasks = sorted({t for r in sel for t in r["tasks"]})
            if not tasks:
                continue
            fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(tasks) + 2), 4.5))
            width = 0.8 / len(sel)
            for i, r in enumerate(sel):
                xs = [j + i * width for j in range(len(tasks))]
                ax.bar(xs, [r["tasks"].get(t, {}).get("score", 0) for t in tasks], width, label=r["method"])
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks, rotation=30, ha="right")
            ax.set_ylabel("score")
            ax.set_title(f"per-task scores, {length} tokens, Top-k {100 * b:g}%")
            ax.legend(fontsize=7, ncol=2)
            fig.tight_layout()
            path = out_dir / f"{prefix}_{length}_tasks_{100 * b:g}pct.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
            massed = [r for r in sel if r.get("captured_mass") and r["topk_fraction"] is not None]
            if massed:
                fig, ax = plt.subplots(figsize=(7, 4.5))
                for r in massed:
                    ax.plot(r["captured_mass"], label=r["method"])
                ax.plot(massed[0]["oracle_mass"], "k--", label="oracle Top-k")
                ax.set_xlabel("layer")
                ax.set_ylabel("attention mass captured (decode)")
                ax.set_title(f"captured mass per layer, {length} tokens, Top-k {100 * b:g}%")
                ax.legend(fontsize=7)
                fig.tight_layout()
                path = out_dir / f"{prefix}_{length}_mass_{100 * b:g}pct.png"
                fig.savefig(path, dpi=120)
                plt.close(fig)
                written.append(path)
    return written
