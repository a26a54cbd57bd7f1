"""Summaries of finished cells: a table on screen, one JSON document, plots.

Scores are RULER's (0-100), averaged over samples per (method, budget, length, task); the suite average
is the mean over tasks. Attention mass is averaged over samples and decode steps per layer.

The Pareto chart (:func:`plot_pareto`, one figure per length) puts every (method, budget) row at its suite
average against its attended-key fraction and against its modelled decode speedup, with the front of the
rows no other row beats on both axes; the fields it reads are added by :func:`kascade.eval.speed_model.annotate`
and :func:`add_pareto`.
"""

from __future__ import annotations

import json
import math
import textwrap
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
    written += plot_pareto(summary, out_dir, prefix)
    return written


# ------------------------------------------------------------------------------------------ Pareto front
PARETO_AXES = {
    # summary field -> (whether a larger value is better, axis label)
    "mean_attended_fraction": (False, "attended-key fraction in decode (mean over layers and steps)"),
    "model_speedup": (True, "modelled decode attention speedup vs dense"),
}


def pareto_front(points: list[tuple[float, float]], *, larger_x_better: bool = False) -> list[int]:
    """Indices of the points (x, y) that no other point dominates, y always larger-is-better and x
    smaller-is-better unless ``larger_x_better``. A point dominates another when it is at least as good on
    both axes and better on one; equal points do not dominate each other (both stay). Sorted by x, best y
    first at equal x."""
    sign = -1.0 if larger_x_better else 1.0
    # cost = sign * x (smaller better), gain = y (larger better); sweep by cost, keep strict new maxima of y
    order = sorted(range(len(points)), key=lambda i: (sign * points[i][0], -points[i][1]))
    front, best, best_cost = [], -math.inf, None
    for i in order:
        cost, gain = sign * points[i][0], points[i][1]
        if gain > best:
            front.append(i)
            best, best_cost = gain, cost
        elif gain == best and cost == best_cost:
            front.append(i)  # the same point twice: neither dominates
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def add_pareto(summary: dict) -> dict:
    """``summary["pareto"]``: per context length and axis, the labels (``method@fraction``) of the rows on
    the front, in the order of the axis. Rows without the axis' field take no part in it."""
    fronts = []
    for length in sorted({r["context_length"] for r in summary["rows"]}):
        entry = {"context_length": length}
        for field, (larger, _) in PARETO_AXES.items():
            rs = [r for r in summary["rows"] if r["context_length"] == length and r.get(field) is not None]
            idx = pareto_front([(r[field], r["average"]) for r in rs], larger_x_better=larger)
            entry[field] = [label(rs[i]["method"], rs[i]["topk_fraction"]) for i in idx]
        fronts.append(entry)
    summary["pareto"] = fronts
    return summary


def format_pareto_markdown(summary: dict) -> str:
    """Per length, every row's suite average, paired delta, attended fractions and modelled speedup, and
    which fronts it is on (A: attended-key fraction, S: modelled speedup)."""
    fronts = {f["context_length"]: f for f in summary.get("pareto", [])}
    model = summary.get("decode_speed_model") or {}
    lines = ["| length | method | avg | vs dense (paired) | attended keys (decode) | attended pairs (prefill) | "
             "modelled decode speedup | on front |", "|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        lab = label(r["method"], r["topk_fraction"])
        f = fronts.get(r["context_length"], {})
        on = "".join(tag for tag, key in (("A", "mean_attended_fraction"), ("S", "model_speedup"))
                     if lab in f.get(key, []))
        att = r.get("mean_attended_fraction")
        pre = r.get("mean_prefill_attended_fraction")
        sp = r.get("model_speedup")
        lines.append(f"| {r['context_length']} | {lab} | {r['average']:.1f} | {_delta(r)} | "
                     f"{'-' if att is None else f'{100 * att:.1f} %'} | {'-' if pre is None else f'{100 * pre:.1f} %'} | "
                     f"{'-' if sp is None else f'{sp:.2f}x'} | {on or '-'} |")
    if model.get("source"):
        lines += ["", f"Modelled decode speedup: {_speed_caption(model)}"]
    elif model:
        lines += ["", f"Modelled decode speedup: {model.get('note')}"]
    for name, why in (model.get("methods") or {}).items():
        lines.append(f"- {name}: {why}")
    for lab, why in (model.get("not_modelled") or {}).items():
        lines.append(f"- {lab}: {why}")
    return "\n".join(lines)


def _speed_caption(model: dict) -> str:
    r = model["ratio_to_dense"]
    frac = "0.1" if "0.1" in r else next(iter(r))
    ratios = r[frac]
    return (f"kascade bench decode per-layer ratios to the best dense kernel, {model['source']} "
            f"({model['device']}, commit {model['git_commit']}, {model['context'] // 1024}K keys, batch {model['batch']}, "
            f"{model['heads']}/{model['kv_heads']}/{model['head_dim']} {model['dtype']}: {model['geometry']}); at Top-k "
            f"{100 * float(frac):g}%: layer-0 kernel {ratios['layer0']:.3g}, anchor {ratios['anchor']:.3g}, "
            f"reuse {ratios['reuse']:.3g} (dense 1); speedup = layers / sum of the layers' ratios.")


_STYLE = {  # method -> (colour, marker); others cycle through the rest
    "dense": ("black", "s"), "kascade": ("tab:red", "o"), "kascade_decode_only": ("tab:orange", "D"),
    "oracle": ("tab:gray", "*"), "omnikv": ("tab:blue", "^"), "lessismore": ("tab:green", "v"),
    "quest": ("tab:purple", "P"), "tidaldecode": ("tab:brown", "X"), "streamingllm": ("tab:pink", "<"),
}
_EXTRA = [("tab:olive", ">"), ("tab:cyan", "h"), ("goldenrod", "p"), ("teal", "d"), ("navy", "8"), ("maroon", "H")]


def plot_pareto(summary: dict, out_dir: Path, prefix: str = "eval", title: str | None = None) -> list[Path]:
    """One figure per context length: suite average vs attended-key fraction (left) and vs modelled decode
    speedup (right), every (method, budget) row one point with its paired standard error vs dense as an
    error bar, the Pareto front as a dashed staircase (the best score reachable at that attended fraction
    or speedup). Rows without a modelled speedup appear on the left only; the caption says how the speedup
    is modelled and which methods are not. Needs :func:`add_pareto` (called here when missing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "pareto" not in summary:
        add_pareto(summary)
    model = summary.get("decode_speed_model") or {}
    fronts = {f["context_length"]: f for f in summary["pareto"]}
    methods = sorted({r["method"] for r in summary["rows"]}, key=lambda m: (m not in _STYLE, list(_STYLE).index(m) if m in _STYLE else m))
    extra = iter(_EXTRA * 4)
    style = {m: _STYLE.get(m) or next(extra) for m in methods}
    written = []
    for length in sorted(fronts):
        rs = [r for r in summary["rows"] if r["context_length"] == length]
        if not any(r.get("mean_attended_fraction") is not None for r in rs):
            continue
        several = len({r["topk_fraction"] for r in rs if r["topk_fraction"] is not None}) > 1
        caption = _pareto_caption(summary, rs, model)
        n_lines = caption.count("\n") + 1
        # the caption sits under the panels: reserve its height (7-pt lines, ~0.125 in each) below them
        cap_in = 0.125 * n_lines + 0.15
        fig, axes = plt.subplots(1, 2, figsize=(13, 5.2 + cap_in), sharey=True)
        for ax, (field, (larger, xlabel)) in zip(axes, PARETO_AXES.items()):
            pts = [r for r in rs if r.get(field) is not None]
            for m in methods:
                mp = sorted((r for r in pts if r["method"] == m), key=lambda r: r[field])
                if not mp:
                    continue
                colour, marker = style[m]
                ax.errorbar([r[field] for r in mp], [r["average"] for r in mp],
                            yerr=[r.get("delta_stderr", 0.0) for r in mp], fmt=marker, color=colour, ms=7,
                            capsize=3, lw=1, ls="-" if len(mp) > 1 else "none", alpha=0.9, label=m)
                if several:
                    for r in mp:
                        if r["topk_fraction"] is not None:
                            ax.annotate(f"{100 * r['topk_fraction']:g}%", (r[field], r["average"]),
                                        textcoords="offset points", xytext=(5, -10), fontsize=7, color=colour)
            on = {lab: r for r in pts if (lab := label(r["method"], r["topk_fraction"])) in fronts[length][field]}
            front = [on[lab] for lab in fronts[length][field]]
            if front:
                xs, ys = [r[field] for r in front], [r["average"] for r in front]
                # staircase: from each front point the best score holds until the next, better-x point
                if larger:
                    xs, ys = xs[::-1], ys[::-1]
                ax.step(xs, ys, where="post", ls="--", color="k", lw=1, alpha=0.6, zorder=0,
                        label="Pareto front")
                ax.scatter(xs, ys, s=160, facecolors="none", edgecolors="k", lw=0.8, zorder=0)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            if field == "mean_attended_fraction":
                ax.set_xscale("log")
                ticks = [t for t in (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
                         if min(r[field] for r in pts) / 1.3 <= t <= 1.0]
                ax.set_xticks(ticks, [f"{100 * t:g}%" for t in ticks])
                ax.minorticks_off()
                ax.invert_xaxis()  # fewer keys to the right, like more speed on the right panel
                ax.set_title("score vs attended keys (better: up and right)", fontsize=10)
            else:
                ax.set_title("score vs modelled decode speedup (better: up and right)", fontsize=10)
                if not pts:
                    ax.text(0.5, 0.5, "no modelled speedup", ha="center", transform=ax.transAxes)
        axes[0].set_ylabel("suite average (0-100), bars: ± paired s.e. vs dense")
        handles, labels = axes[0].get_legend_handles_labels()
        axes[0].legend(handles, labels, fontsize=8, loc="lower left")
        fig.suptitle(title or _pareto_title(summary, rs, length), fontsize=11)
        height = 5.2 + cap_in
        fig.text(0.01, 0.01, caption, fontsize=7, va="bottom")
        fig.tight_layout(rect=(0, (cap_in + 0.05) / height, 1, 0.97))
        path = out_dir / f"{prefix}_{length}_pareto.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def _pareto_title(summary: dict, rows: list[dict], length: int) -> str:
    ev = (summary.get("decode_speed_model") or {}).get("eval_model") or {}
    tasks = {t for r in rows for t in r["tasks"]}
    n = {v["n"] for r in rows for v in r["tasks"].values()}
    who = f"{ev['name']} ({ev['num_layers']} layers), " if ev.get("name") else ""
    samples = f"{min(n)}" if min(n) == max(n) else f"{min(n)}-{max(n)}"
    return (f"{who}{length}-token prompts, {len(tasks)} tasks x {samples} samples: suite score vs "
            "attended keys and vs modelled decode speedup")


def _pareto_caption(summary: dict, rows: list[dict], model: dict) -> str:
    src = {r.get("attended_fraction_source") for r in rows} - {None}
    how = ("measured by the decode probe" if src == {"measured"} else "from each method's definition at every "
           "decode step's key count" if src == {"definition"} else "measured where cells have it, else from the definition")
    parts = [f"Attended keys: keys attended / row keys, {how}; dense = 100%."]
    if model.get("source"):
        parts.append("Speedup: " + _speed_caption(model))
        modelled = sorted({r["method"] for r in rows if r.get("model_speedup") is not None} - {"dense"})
        notm = [label(r["method"], r["topk_fraction"]) for r in rows if r.get("model_speedup") is None]
        methods = model.get("methods", {})
        grouped: dict[str, list[str]] = {}  # one line per distinct model (kascade and its decode-only share one)
        for m in modelled:
            if m in methods:
                grouped.setdefault(methods[m], []).append(m)
        parts += [f"{', '.join(ms)}: {how}." for how, ms in grouped.items()]
        if notm:
            parts.append("Left panel only (no measured kernel does their decode step, or no bench point at "
                         f"their budget): {', '.join(notm)}.")
    else:
        parts.append(f"Speedup: {model.get('note', 'not modelled')}.")
    return "\n".join(textwrap.fill(p, 225) for p in parts)
