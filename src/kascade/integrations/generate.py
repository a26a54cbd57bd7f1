"""`kascade generate`: one prompt through a Hugging Face model with Kascade (or dense) attention."""

from __future__ import annotations

import argparse
import sys
import time

from ..cli import DeprecatedFlag


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
    p.add_argument("--decode-only", action=argparse.BooleanOptionalAction, default=False,
                   help="decode-only Kascade: dense prefill, Kascade decode (sparse_prefill=False in code, the "
                        "kascade_decode_only eval method); default: Kascade in prefill and decode")
    p.add_argument("--dense-prefill", dest="decode_only", action=DeprecatedFlag, const=True, use="--decode-only",
                   default=argparse.SUPPRESS,
                   help="deprecated spelling of --decode-only")
    p.add_argument("--topk-fraction", type=float, default=None, help="override the plan's Top-k fraction")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample (temperature/top-p) instead of greedy")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat-template", action="store_true", help="feed the raw prompt, no chat template")
    p.add_argument("--compare-dense", action="store_true", help="also generate densely and print both")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"),
                   help="model dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step around the attention on CUDA (8-16 %% faster per token; "
                        "the first step compiles for tens of seconds: worth it for long generations)")
    p.add_argument("--prefill-chunk", type=int, default=32768,
                   help="prompt tokens per prefill pass on CUDA (bounds activation memory at long contexts)")
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

    if ids.device.type == "cuda":  # kascade's Generator: owned cache, chunked prefill, CUDA-graph decode
        from ..generation import Generator

        gen = Generator(model, batch_size=1, capacity=ids.shape[1] + args.max_new_tokens,
                        prefill_chunk=args.prefill_chunk, compile=args.compile)
        res = gen.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                           temperature=args.temperature, top_p=args.top_p, eos_token_id=tokenizer.eos_token_id,
                           seed=args.seed)
        new = res.tokens[0]
        if tokenizer.eos_token_id is not None and (new == tokenizer.eos_token_id).any():
            new = new[: int((new == tokenizer.eos_token_id).nonzero()[0]) + 1]
        return tokenizer.decode(new, skip_special_tokens=True), res.ttft_s + res.decode_s, int(new.shape[0])
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
    import torch

    model, tokenizer = _load_model(args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.startswith("cuda") else "fp32")]
    model = model.to(device=device, dtype=dtype)
    plan = _plan(args, args.model)
    limit = getattr(model.config, "max_position_embeddings", 1 << 30) - args.max_new_tokens
    ids = encode(tokenizer, text, limit, chat=not args.no_chat_template).to(device)
    print(f"prompt: {ids.shape[1]} tokens; plan anchors {list(plan.anchor_layers)}, "
          f"Top-k {plan.topk_fraction:.0%}, variant {args.variant}", file=sys.stderr)
    if args.compare_dense:
        if ids.device.type == "cuda":  # the dense baseline through the same cache and graphs
            hf.enable(model, plan, variant="dense")
        dense, dense_s, n = _generate(model, tokenizer, ids, args)
        print(f"--- dense ({n} tokens, {dense_s:.2f} s)\n{dense}")
    hf.enable(model, plan, variant=args.variant, sparse_prefill=not args.decode_only)
    out, secs, n = _generate(model, tokenizer, ids, args)
    hf.disable(model)
    if args.compare_dense:
        print(f"--- kascade ({n} tokens, {secs:.2f} s)")
    print(out)
    print(f"[{n} new tokens in {secs:.2f} s, {ids.shape[1]}-token prompt, {ids.device.type}]", file=sys.stderr)
    return 0
