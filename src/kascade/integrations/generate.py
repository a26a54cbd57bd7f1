"""`kascade generate`: one prompt through a Hugging Face model with Kascade (or dense) attention."""

from __future__ import annotations

import argparse
import sys
import time


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from a prompt with Kascade attention",
                              description="Generate with a kascade.models model (or a local HF directory) and a "
                                          "plan; prints the output and the time taken.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--file", help="read the prompt from this file ('-' for stdin)")
    p.add_argument("--model", default="smollm2-135m", help="kascade.models name or local HF model directory")
    p.add_argument("--plan", default=None,
                   help="plan JSON (default: the plan shipped for --model; required for other models)")
    p.add_argument("--variant", default="kascade",
                   help="kascade, all_heads_pooled, no_remap, pre_softmax, oracle or dense (default kascade)")
    p.add_argument("--dense-prefill", action="store_true", help="sparse decode only (dense prefill)")
    p.add_argument("--topk-fraction", type=float, default=None, help="override the plan's Top-k fraction")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample (temperature/top-p) instead of greedy")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat-template", action="store_true", help="feed the raw prompt, no chat template")
    p.add_argument("--compare-dense", action="store_true", help="also generate densely and print both")
    p.set_defaults(func=main)


def _plan(args, model_name: str):
    from ..plan import Plan
    from ..plans import load_shipped, shipped

    if args.plan:
        plan = Plan.load(args.plan)
    elif model_name in shipped():
        plan = load_shipped(model_name)
    else:
        raise SystemExit(f"--model {model_name!r} has no shipped plan ({shipped()}); pass --plan (make one with "
                         "`kascade calibrate`)")
    return plan.with_budget(topk_fraction=args.topk_fraction) if args.topk_fraction else plan


def _generate(model, tokenizer, ids, args):
    import torch

    torch.manual_seed(args.seed)
    kwargs = dict(max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    if args.sample:
        kwargs.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
    else:
        kwargs.update(do_sample=False)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    elapsed = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True), elapsed, int(new.shape[0])


def main(args: argparse.Namespace) -> int:
    from ..calibrate.cli import _load_model
    from ..calibrate.devset import encode
    from . import hf

    text = args.prompt if args.prompt is not None else (
        sys.stdin.read() if args.file == "-" else open(args.file).read())
    model, tokenizer = _load_model(args.model)
    plan = _plan(args, args.model)
    limit = getattr(model.config, "max_position_embeddings", 1 << 30) - args.max_new_tokens
    ids = encode(tokenizer, text, limit, chat=not args.no_chat_template)
    print(f"prompt: {ids.shape[1]} tokens; plan anchors {list(plan.anchor_layers)}, "
          f"Top-k {plan.topk_fraction:.0%}, variant {args.variant}", file=sys.stderr)
    if args.compare_dense:
        dense, dense_s, n = _generate(model, tokenizer, ids, args)
        print(f"--- dense ({n} tokens, {dense_s:.2f} s)\n{dense}")
    hf.enable(model, plan, variant=args.variant, sparse_prefill=not args.dense_prefill)
    out, secs, n = _generate(model, tokenizer, ids, args)
    hf.disable(model)
    if args.compare_dense:
        print(f"--- kascade ({n} tokens, {secs:.2f} s)")
    print(out)
    print(f"[{n} new tokens in {secs:.2f} s, {ids.shape[1]}-token prompt, {ids.device.type}]", file=sys.stderr)
    return 0
