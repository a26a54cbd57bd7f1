"""`kascade eval`: the offline long-context accuracy suite (RULER-style tasks, every method side by side).

Example (the SmolLM2 4K run quoted in the README):
  kascade eval --model smollm2-135m --lengths 4096 --samples 10 --tasks niah_single niah_multikey vt qa_squad \\
      --methods dense kascade kascade_decode_only streamingllm quest omnikv lessismore tidaldecode --out results/eval_smollm2
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from ..cli import DeprecatedFlag


def register(subparsers) -> None:
    from ..baselines import DEFAULT_METHODS, METHODS
    from .tasks import DEFAULT_TASKS, TASKS

    p = subparsers.add_parser(
        "eval", help="accuracy of Kascade and the baselines on offline RULER-style tasks",
        description="Generate RULER-style tasks (fixed seeds, token lengths measured with the model's tokenizer), "
                    "run every method at the same Top-k budget, score with RULER's string match and write a table, "
                    "JSON and plots. Finished cells are cached in OUT/cells.jsonl: rerunning resumes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"tasks: {', '.join(TASKS)}\nmethods: {', '.join(METHODS)}",
    )
    p.add_argument("--model", default="smollm2-135m", help="a kascade.models name (smollm2-135m, qwen2.5-0.5b, qwen2.5-1.5b)")
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), metavar="TASK", help="default: the 9 RULER tasks")
    p.add_argument("--lengths", nargs="+", type=int, default=[4096], metavar="TOKENS",
                   help="context lengths in tokens of the model's input (default 4096)")
    p.add_argument("--samples", type=int, default=10, help="samples per task and length (default 10)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="METHOD",
                   help="default: all but the reuse-gap variants (kascade_sinks_window, kascade_layer_budget, "
                        "kascade_top_p; these take options as name:key=value,...)")
    p.add_argument("--topk-fractions", dest="budgets", nargs="+", type=float, default=[0.10], metavar="FRACTION",
                   help="Top-k fractions to evaluate, one run each (default 0.10; the sweep is 0.025 0.05 0.1 0.2); "
                        "stored as 'budgets' in the run's metadata and 'topk_fraction' in each cell")
    p.add_argument("--budgets", dest="budgets", nargs="+", type=float, metavar="FRACTION", action=DeprecatedFlag,
                   use="--topk-fractions", default=argparse.SUPPRESS, help="deprecated spelling of --topk-fractions")
    p.add_argument("--topk-floor", type=int, default=128, help="minimum k (default 128)")
    p.add_argument("--seed", type=int, default=0, help="task seed (default 0)")
    p.add_argument("--plan", default=None, help="plan JSON for the Kascade methods (default: the shipped plan)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="cap on generated tokens per sample (default: RULER's per-task length)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="samples of one task generated together, left-padded (default 8)")
    p.add_argument("--no-mass", action="store_true", help="do not measure captured attention mass (faster)")
    p.add_argument("--no-chat-template", action="store_true", help="feed tasks without the chat template")
    p.add_argument("--out", default="results/eval", help="output directory (default results/eval)")
    p.add_argument("--name", default=None, help="result file stem (default eval_<model>)")
    p.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--report-only", action="store_true",
                   help="do not run anything: summarize the cells already cached in OUT/cells.jsonl")
    p.add_argument("--decode-heavy", action="store_true",
                   help="also (or with --tasks none, only) run the teacher-forced long-continuation measurement")
    p.add_argument("--prefill-heavy", action="store_true",
                   help="also run the prefill-heavy measurement: each method's own prefill of the --dh-* texts in one "
                        "pass, the continuation's predictions scored against dense (what a sparse prefill costs)")
    p.add_argument("--dh-context", type=int, default=4096, help="decode-heavy context tokens (default 4096)")
    p.add_argument("--dh-tokens", type=int, default=1024, help="decode-heavy scored tokens (default 1024)")
    p.add_argument("--dh-samples", type=int, default=2, help="decode-heavy samples (default 2)")
    p.add_argument("--dh-source", default="essays", choices=["essays", "kjv"], help="decode-heavy text")
    p.add_argument("--speed-bench", default=None, metavar="JSON",
                   help="`kascade bench decode` JSON whose per-layer kernel ratios model each method's decode speedup "
                        "for the Pareto chart (default: benchmarks/results/decode_b64.json of the checkout; 'none': "
                        "no speedup panel data)")
    p.add_argument("--speed-context", type=int, default=131072, metavar="TOKENS",
                   help="the bench point's context (default 131072, the issue's 128K batch-64 point)")
    p.add_argument("--speed-batch", type=int, default=64, help="the bench point's batch (default 64)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import torch

    from . import report
    from .runner import EvalConfig, Runner

    command = "kascade " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["eval"] else None
    tasks = [] if args.tasks == ["none"] else args.tasks
    cfg = EvalConfig(model=args.model, tasks=tuple(tasks), lengths=tuple(args.lengths), num_samples=args.samples,
                     methods=tuple(args.methods), budgets=tuple(args.budgets), topk_floor=args.topk_floor,
                     seed=args.seed, out_dir=args.out, plan=args.plan, max_new_tokens=args.max_new_tokens,
                     probe_mass=not args.no_mass, batch_size=args.batch_size, chat=not args.no_chat_template)
    out = Path(args.out)
    stem = args.name or f"eval_{args.model}"
    extra = {"command": command, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.report_only:
        from .runner import config_plan, load_cells, plan_id, select_cells

        plan = config_plan(cfg)[0]
        cells = select_cells(load_cells(out / "cells.jsonl").values(), cfg, plan=plan_id(plan))
        summary = report.summarize(cells)
        report.print_table(summary)
        _pareto_fields(args, summary, cells, plan, plan.model if plan else None, out, stem)
        report.write_json(out / f"{stem}.json", summary, {"config": _config_dict(cfg), "report_only": True}, cells, extra)
        (out / f"{stem}.md").write_text(report.format_markdown(summary) + "\n")
        plots = report.plot(summary, out, stem)
        print(f"wrote {out / f'{stem}.json'} ({len(cells)} cached cells) and {len(plots)} plots")
        return 0
    from .. import models

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = models.load(args.model, dtype=getattr(torch, args.dtype))
    model = model.to(device)
    runner = Runner(cfg, model, tokenizer)
    summary = {"rows": []}
    cells = []
    if tasks:
        cells = runner.run()
        summary = report.summarize(cells)
        report.print_table(summary)
        _pareto_fields(args, summary, cells, runner.plan, runner.spec, out, stem)
    from . import decode_heavy as heavy

    # decode-heavy (a shared dense prefill, then teacher-forced decode steps) and prefill-heavy (each method's
    # own prefill of the same texts): one list of blocks in the JSON and one Markdown file each
    for wanted, key, run in ((args.decode_heavy, "decode_heavy", heavy.run_decode_heavy),
                             (args.prefill_heavy, "prefill_heavy", heavy.run_prefill_heavy)):
        if not wanted:
            continue
        for fraction in args.budgets:
            res = run(runner, list(runner.methods), fraction, context_tokens=args.dh_context,
                      continuation_tokens=args.dh_tokens, num_samples=args.dh_samples, source=args.dh_source)
            print(heavy.format_decode_heavy(res))
            extra.setdefault(key, []).append(res[key])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}_{key}.md").write_text(
            "\n\n".join(heavy.format_decode_heavy_markdown(d) for d in extra[key])
            + (f"\n\nCommand: `{command}`" if command else "") + "\n")
    path = out / f"{stem}.json"
    report.write_json(path, summary, runner.metadata(), cells, extra)
    if summary["rows"]:
        (out / f"{stem}.md").write_text(report.format_markdown(summary) + "\n")
    plots = report.plot(summary, out, stem) if summary["rows"] else []
    print(f"wrote {path}" + (f" and {len(plots)} plots" if plots else ""))
    return 0


def _pareto_fields(args, summary: dict, cells: list[dict], plan, spec, out: Path, stem: str) -> None:
    """Attended-key fractions, modelled decode speedups and Pareto fronts into ``summary`` (for the JSON and
    the Pareto chart), and their table as OUT/<stem>_pareto.md. The speedup needs the bench JSON: an
    explicit --speed-bench that cannot be used is an error; a missing default only leaves the speedup out."""
    from . import report, speed_model

    if not summary["rows"]:
        return
    if spec is None:
        print("no plan for this model, so no model shape: attended-key fractions and speedups need --plan")
        return
    costs, note = None, None
    if args.speed_bench != "none":
        path = args.speed_bench or speed_model.default_bench_path()
        if path is None:
            note = (f"{speed_model.DEFAULT_BENCH} not found (not run from a kascade checkout): no modelled speedup; "
                    "pass --speed-bench")
            print(note)
        else:
            try:
                costs = speed_model.load_decode_costs(path, spec, context=args.speed_context, batch=args.speed_batch)
            except (OSError, ValueError, KeyError) as exc:
                raise SystemExit(f"--speed-bench {path}: {exc}") from exc
    else:
        note = "--speed-bench none: no modelled speedup"
    speed_model.annotate(summary, cells, plan=plan, spec=spec, costs=costs, topk_floor=args.topk_floor,
                         costs_note=note)
    report.add_pareto(summary)
    (out / f"{stem}_pareto.md").write_text(report.format_pareto_markdown(summary) + "\n")


def _config_dict(cfg) -> dict:
    from dataclasses import asdict

    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}

