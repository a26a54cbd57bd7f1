"""Compare Kascade plans on held-out prompts: per-layer captured decode mass, KL and top-1 agreement.

For every prompt (RULER-style samples from ``kascade.eval.tasks``, seed different from the eval's), one
dense prefill is shared by every plan. The dense model then decodes ``--steps`` tokens greedily; each plan
replays the same tokens (teacher forcing) from a copy of the dense cache with decode-only Kascade
(``make_method("kascade_decode_only", plan, ...)``, dense prefill, sparse decode) through the eval runner's
``Dispatch`` probe, which measures per layer the share of the dense softmax on the attended keys and the
oracle's share (each head's own exact Top-k at the same budget). Per step, the plan's next-token
distribution is compared with the dense one: KL(dense || plan) and top-1 agreement.

    python scripts/compare_plans.py src/kascade/plans/qwen2.5-0.5b.json results/plan_study/plan_*.json \\
        --prompts 4 --steps 32 --length 4096 --out results/plan_study/compare.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

from kascade.decoding import decode_loop

DEFAULT_TASKS = ("vt", "qa_hotpotqa", "fwe", "niah_multikey")


def _label(path: str) -> str:
    return Path(path).stem


def _decode(model, past, tokens: torch.Tensor) -> torch.Tensor:
    """Feed ``tokens`` [1, D] one at a time onto ``past``; log-probs of each step's next token [D, V]."""
    return torch.stack([torch.log_softmax(logits[0].double(), -1) for logits in decode_loop(model, past, feed=tokens)])


@torch.no_grad()
def compare(model, plans: dict, inputs: list[tuple[str, torch.Tensor]], *, steps: int = 32,
            topk_fraction: float = 0.10, topk_floor: int = 128, progress: bool = True,
            decode_threads: int | None = None, on_prompt=None) -> dict:
    """Run the comparison. ``plans``: label -> Plan; ``inputs``: (label, token ids [1, n]) per prompt.

    Returns a JSON-able dict: per plan, per-layer captured and oracle mass (mean over prompts, steps,
    heads), their means over layers 1..L-1, mean KL(dense || plan) and top-1 agreement, and per-prompt rows.
    ``decode_threads``: torch threads for the decode steps (one is often faster on a busy CPU; prefill keeps
    the current setting); ``on_prompt(partial_result)`` is called after every prompt.
    """
    prefill_threads = torch.get_num_threads()
    import kascade
    from kascade.baselines import make_method
    from kascade.eval.runner import Dispatch
    from kascade.integrations.hf import model_spec

    spec = model_spec(model)
    L = spec.num_layers
    dispatch = Dispatch(L)
    kascade.enable(model, dispatch)
    dense = make_method("dense", None, spec)
    methods = {}
    for name, plan in plans.items():
        plan.check_model(spec)
        m = make_method("kascade_decode_only", plan, spec, topk_fraction, topk_floor, record_selection=True)
        m.name = name  # Dispatch accumulates mass per method name
        methods[name] = m
    rows = []
    agg = {n: {"kl": [], "top1": []} for n in plans}
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(inputs) * (1 + len(plans)), desc="compare_plans", dynamic_ncols=True)
        except ImportError:  # pragma: no cover
            bar = None
    try:
        for p_i, (label, ids) in enumerate(inputs):
            ids = ids.to(next(model.parameters()).device)
            t0 = time.perf_counter()
            dispatch.use(dense)
            torch.set_num_threads(prefill_threads)
            res = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            past = res.past_key_values
            # The dense greedy continuation: token 0 from the prefill, then `steps` decode steps.
            if decode_threads:
                torch.set_num_threads(decode_threads)
            fed = []  # the greedy tokens fed at each step (token 0: the prefill's argmax)
            ref = [torch.log_softmax(logits[0].double(), -1)
                   for logits in decode_loop(model, copy.deepcopy(past), res.logits, steps=steps, on_token=fed.append)]
            ref = torch.stack(ref)  # [D, V]
            feed = torch.stack(fed, dim=1)  # [1, D]
            row = {"prompt": label, "n_tokens": int(ids.shape[1]), "dense_seconds": round(time.perf_counter() - t0, 1),
                   "plans": {}}
            if bar is not None:
                bar.set_postfix_str(f"{label} dense")
                bar.update(1)
            for name, m in methods.items():
                t0 = time.perf_counter()
                m.reset()
                dispatch.use(m, probe=True, fresh=p_i == 0)
                before = copy.deepcopy(dispatch._acc[name])
                logp = _decode(model, copy.deepcopy(past), feed)
                kl = (ref.exp() * (ref - logp)).sum(-1)  # KL(dense || plan) per step
                top1 = (ref.argmax(-1) == logp.argmax(-1)).double()
                agg[name]["kl"].append(kl)
                agg[name]["top1"].append(top1)
                after = dispatch._acc[name]
                n = [max(1, c1 - c0) for c0, c1 in zip(before[2], after[2])]
                cap = [float(a1 - a0) / c for a0, a1, c in zip(before[0], after[0], n)]
                orc = [float(a1 - a0) / c for a0, a1, c in zip(before[1], after[1], n)]
                row["plans"][name] = {"kl": float(kl.mean()), "top1": float(top1.mean()),
                                      "mass_mean": sum(cap[1:]) / max(1, L - 1),
                                      "oracle_mean": sum(orc[1:]) / max(1, L - 1),
                                      "captured_mass": [round(x, 5) for x in cap],
                                      "oracle_mass": [round(x, 5) for x in orc],
                                      "seconds": round(time.perf_counter() - t0, 1)}
                if bar is not None:
                    bar.set_postfix_str(f"{label} {name}")
                    bar.update(1)
            rows.append(row)
            del past
            if on_prompt is not None:
                on_prompt(_result(dispatch, plans, agg, rows, steps, topk_fraction, topk_floor, L))
    finally:
        torch.set_num_threads(prefill_threads)
        kascade.disable(model)
        if bar is not None:
            bar.close()
    return _result(dispatch, plans, agg, rows, steps, topk_fraction, topk_floor, L)


def _result(dispatch, plans, agg, rows, steps, topk_fraction, topk_floor, L) -> dict:
    summary = {}
    for name, plan in plans.items():
        rep = dispatch.mass_report(name)
        kl = torch.cat(agg[name]["kl"]) if agg[name]["kl"] else torch.zeros(0)
        top1 = torch.cat(agg[name]["top1"]) if agg[name]["top1"] else torch.zeros(0)
        cap, orc = rep["captured_mass"], rep["oracle_mass"]
        summary[name] = {
            "anchor_layers": list(plan.anchor_layers),
            "captured_mass": cap, "oracle_mass": orc,
            "mass_mean": round(sum(cap[1:]) / max(1, L - 1), 5),
            "oracle_mean": round(sum(orc[1:]) / max(1, L - 1), 5),
            "kl_mean": float(kl.mean()) if kl.numel() else math.nan,
            "kl_median": float(kl.median()) if kl.numel() else math.nan,
            "top1": float(top1.mean()) if top1.numel() else math.nan,
        }
    return {"plans": summary, "prompts": list(rows), "steps": steps, "topk_fraction": topk_fraction,
            "topk_floor": topk_floor, "num_layers": L}


def format_table(result: dict) -> str:
    plans = result["plans"]
    names = list(plans)
    L = result["num_layers"]
    w = max(12, *(len(n) for n in names))
    lines = ["per-layer captured decode mass (oracle = each head's own exact Top-k)",
             "layer  " + "  ".join(f"{n:>{w}}" for n in names) + f"  {'oracle':>8}"]
    orc = plans[names[0]]["oracle_mass"]
    for j in range(L):
        marks = ["*" if j in plans[n]["anchor_layers"] else " " for n in names]
        lines.append(f"{j:>5}  " + "  ".join(f"{plans[n]['captured_mass'][j]:>{w - 1}.4f}{m}"
                                             for n, m in zip(names, marks)) + f"  {orc[j]:>8.4f}")
    lines.append("(* = anchor layer)")
    lines.append("")
    lines.append(f"{'plan':<{w}}  {'anchors':<22} {'mass 1..L-1':>11} {'mass 12..L-1':>12} {'mass 18..L-1':>12} "
                 f"{'KL mean':>9} {'KL med':>9} {'top-1':>6}")
    for n in names:
        p = plans[n]
        late = p["captured_mass"][12:]
        last = p["captured_mass"][18:]
        lines.append(f"{n:<{w}}  {str(p['anchor_layers']):<22} {p['mass_mean']:>11.4f} "
                     f"{sum(late) / max(1, len(late)):>12.4f} {sum(last) / max(1, len(last)):>12.4f} "
                     f"{p['kl_mean']:>9.4f} {p['kl_median']:>9.4f} {p['top1']:>6.3f}")
    lines.append(f"{'oracle':<{w}}  {'':<22} {plans[names[0]]['oracle_mean']:>11.4f} "
                 f"{sum(orc[12:]) / max(1, len(orc[12:])):>12.4f} {sum(orc[18:]) / max(1, len(orc[18:])):>12.4f}")
    lines.append("")
    lines.append("per prompt (mean mass 1..L-1 / KL / top-1):")
    for row in result["prompts"]:
        cells = [f"{n}: {row['plans'][n]['mass_mean']:.3f}/{row['plans'][n]['kl']:.3f}/{row['plans'][n]['top1']:.2f}"
                 for n in names]
        lines.append(f"  {row['prompt']:<24} " + "  ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("plans", nargs="+", help="plan JSON files (label = file stem)")
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    ap.add_argument("--prompts", type=int, default=4, help="prompts in all, cycling over --tasks (default 4)")
    ap.add_argument("--first", type=int, default=0,
                    help="index of the first prompt of the task cycle (to continue a cut run; default 0)")
    ap.add_argument("--length", type=int, default=4096, help="context length of the samples (default 4096)")
    ap.add_argument("--steps", type=int, default=32, help="teacher-forced decode steps per prompt (default 32)")
    ap.add_argument("--seed", type=int, default=7, help="task seed (default 7: not the eval's 0)")
    ap.add_argument("--topk-fraction", type=float, default=0.10)
    ap.add_argument("--topk-floor", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for prefill (default: torch's)")
    ap.add_argument("--decode-threads", type=int, default=1,
                    help="torch threads for the decode steps (default 1: several threads are slower there on a "
                         "shared 2-core CPU)")
    ap.add_argument("--out", default=None, help="JSON output path")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from kascade import models
    from kascade.eval import tasks as tasks_mod
    from kascade.plan import Plan

    plans = {}
    for p in args.plans:
        name = _label(p)
        if name in plans:
            name = f"{name}_{len(plans)}"
        plans[name] = Plan.load(p)
    model, tok = models.load(args.model)
    model.eval()
    inputs = []
    for i in range(args.first, args.first + args.prompts):
        task = args.tasks[i % len(args.tasks)]
        s = tasks_mod.generate_sample(task, tok, args.length, i // len(args.tasks), args.seed)
        ids = tok(s.prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        inputs.append((f"{task}#{i // len(args.tasks)}", ids))
    start = time.perf_counter()
    meta = {}

    def partial(res):  # written after every prompt, so a cut run leaves what it finished
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(dict(res, **meta, partial=True), indent=1))

    result = compare(model, plans, inputs, steps=args.steps, topk_fraction=args.topk_fraction,
                     topk_floor=args.topk_floor, decode_threads=args.decode_threads, on_prompt=partial)
    meta.update({"command": " ".join(["python", "scripts/compare_plans.py", *sys.argv[1:]] if argv is None
                                       else ["compare_plans", *argv]),
                   "plan_files": dict(zip(plans, args.plans)), "model": args.model, "tasks": args.tasks,
                   "length": args.length, "seed": args.seed, "seconds": round(time.perf_counter() - start, 1),
                   "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "decode_threads": args.decode_threads})
    result.update(meta)
    print(format_table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
