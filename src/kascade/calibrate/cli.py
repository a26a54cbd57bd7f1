"""`kascade calibrate`: statistics over a development set -> anchors (DP) -> head map -> plan JSON."""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate", help="choose anchor layers and head maps for a model; write a plan JSON",
        description="Run the model densely over a development set, collect tile-pooled post-softmax Top-k "
                    "statistics and layer importance, pick anchors with the dynamic program (prints the best "
                    "sets for 3..8 anchors) and write the plan.",
    )
    p.add_argument("--model", default="smollm2-135m",
                   help="a kascade.models name (smollm2-135m, qwen2.5-0.5b, qwen2.5-1.5b) or a local HF model directory")
    p.add_argument("--data", nargs="*", default=None, metavar="FILE",
                   help="development-set files (.jsonl with a 'prompt'/'text' field, or text files, one prompt "
                        "each); default: multi-hop QA prompts built from HotpotQA/SQuAD")
    p.add_argument("--samples", type=int, default=24, help="number of prompts (default 24)")
    p.add_argument("--max-tokens", type=int, default=2048, help="tokens per prompt (default 2048)")
    p.add_argument("--seed", type=int, default=0, help="seed of the default development set")
    p.add_argument("--anchors", type=_anchors, default=5,
                   help="number of anchor layers M, layer 0 included (default 5), or 'auto': the fewest anchors "
                        "whose best set reaches --quality-target")
    p.add_argument("--quality-target", type=float, default=None, metavar="T",
                   help="with --anchors auto: the share in (0, 1] of the all-anchor objective the anchor set must "
                        "reach (the table's 'relative' column)")
    p.add_argument("--topk-fraction", type=float, default=0.10, help="plan's Top-k fraction (default 0.10)")
    p.add_argument("--topk-floor", type=int, default=128, help="plan's minimum k (default 128)")
    p.add_argument("--tile-size", type=int, default=32, help="plan's prefill query tile (default 32)")
    p.add_argument("--stats-k", type=int, default=64, help="k of the Top-k similarity statistics that choose the anchors and head "
                        "map (default 64); not the plan's budget, which is --topk-fraction/--topk-floor")
    p.add_argument("--aggregate", choices=("min", "mean", "decode"), default="min",
                   help="per-prompt aggregation of the similarity over query tiles (default min, the paper's; mean), "
                        "or 'decode': the mean over the prompts' last 64 positions as single GQA-pooled queries "
                        "at the plan's decode budget (what decode reuses)")
    p.add_argument("--stats-budget", action="store_true",
                   help="score the similarity at the plan's per-tile Top-k budget (--topk-fraction/--topk-floor) "
                        "instead of the fixed --stats-k")
    p.add_argument("--weighting", choices=("importance", "uniform"), default="importance",
                   help="layer weights of the anchor objective: importance w_j (default, the paper's) or uniform")
    p.add_argument("--tp", type=_tp_sizes, default=(), metavar="N[,N...]",
                   help="tensor-parallel sizes the plan must be valid for (e.g. 2,4): each reuse head maps only to "
                        "anchor heads of its own shard (for the least common multiple of the sizes, which must divide "
                        "the KV heads); the plan records them. Works with --from-stats (no model run)")
    p.add_argument("--layer-budgets", action="store_true",
                   help="also write per-layer budget scales (layer_budget_scale, read by the kascade_layer_budget "
                        "eval method): layers whose reused selection captures less mass get more keys, the mean "
                        "over layers 1..L-1 stays the plan's budget")
    p.add_argument("--layer-budget-power", type=float, default=0.5,
                   help="scale ~ ((1 - reuse similarity) + miss floor) ** power (default 0.5)")
    p.add_argument("--layer-budget-miss-floor", type=float, default=0.05,
                   help="the miss assumed even for a layer's own Top-k (default 0.05)")
    p.add_argument("--layer-budget-range", type=float, nargs=2, default=(0.5, 2.0), metavar=("LO", "HI"),
                   help="bounds of the per-layer scales (default 0.5 2.0)")
    p.add_argument("--out", default=None, help="plan path (default: <model>.plan.json)")
    p.add_argument("--save-stats", default=None, metavar="PATH", help="also save the raw statistics (.pt)")
    p.add_argument("--from-stats", default=None, metavar="PATH",
                   help="skip the model runs: re-plan from statistics saved with --save-stats")
    p.add_argument("--no-chat-template", action="store_true", help="feed prompts without the chat template")
    p.set_defaults(func=main)


def _anchors(text: str) -> int | None:
    """--anchors: a positive count, or 'auto' (None)."""
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"--anchors {text!r}: expected a positive number of anchor layers or 'auto'")
    return value


def _decode_speedups(spec, sizes, topk_fraction: float, topk_floor: int) -> tuple[dict[int, float], str]:
    """Modelled decode speedup of each number of anchors (the `kascade bench decode` model: layers x dense /
    (layer 0 + (M - 1) anchors + (L - M) reuse layers)) from the committed bench point the eval's speed model
    uses (128K, batch 64, the measured geometry nearest the model's); ({}, why) where there is none."""
    from ..eval import speed_model as sm

    path = sm.default_bench_path()
    if path is None:
        return {}, "no committed decode bench (benchmarks/results/decode_b64.json) next to this install"
    try:
        costs = sm.load_decode_costs(path, spec)
    except ValueError as exc:
        return {}, str(exc)
    r = costs.ratios(topk_fraction)
    if r is None or topk_floor != 128:
        return {}, f"{costs.path} did not measure Top-k {topk_fraction:g} with floor {topk_floor}"
    L = spec.num_layers
    out = {m: L / (r["layer0"] + (m - 1) * r["anchor"] + (L - m) * r["reuse"]) for m in sizes if 1 <= m <= L}
    why = (f"decode x: modelled decode speedup of a {L}-layer model from {costs.path} ({costs.context // 1024}K, "
           f"batch {costs.batch}, {costs.heads}/{costs.kv_heads}/{costs.head_dim}: layer 0 {r['layer0']:.3f}, "
           f"anchor {r['anchor']:.3f}, reuse {r['reuse']:.3f} of a dense layer)")
    return out, why


def _tp_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tp {text!r}: expected comma-separated positive integers, e.g. 2,4") from None
    if not sizes or any(t < 1 for t in sizes):
        raise argparse.ArgumentTypeError(f"--tp {text!r}: expected comma-separated positive integers, e.g. 2,4")
    return tuple(sorted(set(sizes)))


# Options that shape the collected statistics (not the planning): recorded with them for --from-stats.
COLLECT_ARGS = ("model", "data", "samples", "max_tokens", "seed", "no_chat_template")


def _canonical_command(args) -> str:
    parts = ["kascade", "calibrate", "--model", args.model]
    if args.data:
        parts += ["--data", *args.data]
    parts += ["--samples", str(args.samples), "--max-tokens", str(args.max_tokens), "--seed", str(args.seed),
              "--anchors", "auto" if args.anchors is None else str(args.anchors),
              *(["--quality-target", str(args.quality_target)] if args.anchors is None else []),
              "--topk-fraction", str(args.topk_fraction),
              "--topk-floor", str(args.topk_floor), "--tile-size", str(args.tile_size),
              "--stats-k", str(args.stats_k)]
    if args.aggregate != "min":
        parts += ["--aggregate", args.aggregate]
    if args.stats_budget:
        parts.append("--stats-budget")
    if args.weighting != "importance":
        parts += ["--weighting", args.weighting]
    if args.no_chat_template:
        parts.append("--no-chat-template")
    if getattr(args, "tp", ()):
        parts += ["--tp", ",".join(str(t) for t in args.tp)]
    if getattr(args, "layer_budgets", False):
        parts += ["--layer-budgets", "--layer-budget-power", str(args.layer_budget_power),
                  "--layer-budget-miss-floor", str(args.layer_budget_miss_floor),
                  "--layer-budget-range", *(str(x) for x in args.layer_budget_range)]
    if args.out:
        parts += ["--out", args.out]
    return shlex.join(parts)


def _load_model(name: str):
    from pathlib import Path

    from .. import models

    if name in models.MODELS:
        return models.load(name)
    if Path(name).is_dir():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval()
        return model, tok
    raise SystemExit(f"--model {name!r}: expected one of {sorted(models.MODELS)} or a local model directory")


def _machine() -> str:
    import os

    import torch

    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, "
            f"{torch.get_num_threads()} torch threads"
            + (f", CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))


def _check_tp(tp_sizes, num_kv_heads: int) -> None:
    if tp_sizes:
        from .dp import shard_tp_size

        try:
            shard_tp_size(num_kv_heads, tp_sizes)
        except ValueError as exc:
            raise SystemExit(f"--tp: {exc}") from None


def main(args: argparse.Namespace) -> int:
    from . import CalibrationStats, collect, format_table, make_plan
    from .devset import default_devset, encode, file_devset

    provenance = {}
    if args.from_stats:
        stats = CalibrationStats.load(args.from_stats)
        _check_tp(args.tp, stats.spec.num_kv_heads)
        print(f"statistics from {args.from_stats}: {stats.num_prompts} prompts, {stats.num_tokens} tokens")
        collect_args = stats.info.get("collect_args")
        if collect_args:  # the command that rebuilds this plan from scratch names the collection's settings
            for key, value in collect_args.items():
                setattr(args, key, value)
            command = _canonical_command(args)
        else:  # statistics saved before collect_args were recorded: only the re-plan is reproducible
            command = _canonical_command(args) + " --from-stats " + shlex.quote(args.from_stats)
        provenance["replanned_from"] = args.from_stats
    else:
        command = _canonical_command(args)
        model, tokenizer = _load_model(args.model)
        from ..integrations.hf import model_spec

        _check_tp(args.tp, model_spec(model).num_kv_heads)  # before the (long) statistics runs
        if args.data:
            devset = file_devset(args.data, args.samples)
        else:
            devset = default_devset(tokenizer, args.samples, args.max_tokens, args.seed)
        print(f"development set: {devset.description}")
        inputs = [encode(tokenizer, p, args.max_tokens, chat=not args.no_chat_template) for p in devset.prompts]
        start = time.perf_counter()
        import torch

        info = {
            "model": args.model,
            "model_name": getattr(model.config, "_name_or_path", args.model),
            "data": devset.description,
            "chat_template": not args.no_chat_template,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "environment": f"python {platform.python_version()}, torch {torch.__version__}, "
                           f"transformers {__import__('transformers').__version__}",
            # when and where the statistics were collected (collect_seconds depends on both)
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": _machine(),
            # what --from-stats needs to write the from-scratch command into a re-planned plan
            "collect_args": {k: getattr(args, k) for k in COLLECT_ARGS},
        }

        def checkpoint(collector):  # partial statistics after every prompt: an interrupted run can re-plan
            if args.save_stats:
                partial = collector.result(info)
                partial.info["partial"] = True
                partial.save(args.save_stats)

        stats = collect(model, inputs, stats_k=args.stats_k, tile_size=args.tile_size, total=len(inputs), info=info,
                        budget=(args.topk_fraction, args.topk_floor), on_prompt=checkpoint)
        stats.info["collect_seconds"] = round(time.perf_counter() - start, 1)
        if args.save_stats:
            stats.save(args.save_stats)
            print(f"statistics saved to {args.save_stats}")
    if args.anchors is None and args.quality_target is None:
        print("kascade calibrate: --anchors auto needs --quality-target T (e.g. 0.9)", file=sys.stderr)
        return 2
    if args.anchors is not None and args.quality_target is not None:
        print("kascade calibrate: --quality-target applies to --anchors auto only", file=sys.stderr)
        return 2
    if args.quality_target is not None and not 0.0 < args.quality_target <= 1.0:
        print(f"kascade calibrate: --quality-target {args.quality_target:g} must be in (0, 1]", file=sys.stderr)
        return 2
    plan, table = make_plan(stats, args.anchors, quality_target=args.quality_target, topk_fraction=args.topk_fraction, topk_floor=args.topk_floor,
                            tile_size=args.tile_size, provenance={"command": command, **provenance},
                            aggregate=args.aggregate,
                            stats_budget=args.stats_budget, weighting=args.weighting, tp_sizes=args.tp,
                            layer_budgets=args.layer_budgets, layer_budget_power=args.layer_budget_power,
                            layer_budget_miss_floor=args.layer_budget_miss_floor,
                            layer_budget_range=tuple(args.layer_budget_range))
    print(f"best anchor sets ({'importance-weighted' if args.weighting == 'importance' else 'unweighted'} similarity; "
          "relative = score / score with every layer an anchor):")
    speedups, speed_note = _decode_speedups(stats.spec, [len(c.anchor_layers) for c in table], args.topk_fraction,
                                            args.topk_floor)
    print(format_table(table, speedups))
    print(speed_note)
    print("layer importance w_j: " + " ".join(f"{w:.3f}" for w in stats.importance))
    rule = f" (the fewest reaching relative {args.quality_target:g})" if args.anchors is None else ""
    print(f"chosen: {len(plan.anchor_layers)} anchors {list(plan.anchor_layers)}{rule}")
    if plan.layer_budget_scale:
        print("per-layer budget scales: " + " ".join(f"{x:.2f}" for x in plan.layer_budget_scale))
    if plan.tp_sizes:
        print(f"head map constrained to tensor-parallel shards: valid for TP sizes {list(plan.tp_sizes)}")
    out = args.out or f"{args.model.replace('/', '_')}.plan.json"
    plan.save(out)
    print(f"plan written to {out}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="kascade")
    register(parser.add_subparsers())
    ns = parser.parse_args(["calibrate", *sys.argv[1:]])
    sys.exit(ns.func(ns))
