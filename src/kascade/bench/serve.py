"""`kascade bench serve`: vLLM offline, the Kascade backend against vLLM's own attention backends.

A model directory holding only a config.json at a real shape (``llama-3.1-8b``: 32 layers, 32/8/128;
``qwen2.5-7b``: 28 layers, 28/4/128) is served with random weights (``load_format="dummy"``, no
tokenizer). For each backend (``FLASH_ATTN`` = FlashAttention 3 on Hopper, ``TRITON_ATTN``, and
``CUSTOM`` = Kascade through the ``kascade`` vLLM plugin with ``KASCADE_PLAN``) one ``LLM`` is built in its
own process (vLLM keeps its GPU memory until the process ends; CUDA graphs on unless --eager) and, per prompt length and batch size, the engine is stepped by hand:
time to first token of a batch-1 prompt (its prefill steps), then, for a batch of B prompts, the
wall time of each decode step once every request is decoding (median over --steps). Ratios are against
the fastest of vLLM's backends in the same run. Before timing, the Kascade backend at Top-k fraction 1.0
must give FLASH_ATTN's greedy tokens on a small prompt (recorded). Writes JSON (--json), prints a table.
Needs vLLM (``pip install kascade[vllm]``) and a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

from .common import comma_list, env_info, format_table, write_results

SHAPES = {
    "llama-3.1-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0),
    "qwen2.5-7b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, head_dim=128, vocab_size=152064, rope_theta=1000000.0),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--model", default="llama-3.1-8b", choices=sorted(SHAPES))
    a("--layers", type=int, default=None, help="build only this many layers (quick runs)")
    a("--context", default="32768,131072", help="prompt lengths (comma list)")
    a("--batch", default="1", help="decode batch sizes (comma list)")
    a("--steps", type=int, default=32, help="decode steps timed per point")
    a("--backends", default="FLASH_ATTN,TRITON_ATTN,CUSTOM",
      help="vLLM attention backends (CUSTOM = Kascade; CUSTOM:<plan> = Kascade with that --plan, e.g. CUSTOM:identity)")
    a("--plan", default=None, help="plan for the Kascade backend (default: the shipped Llama-3.1-8B plan, or "
                                   "identity head maps with anchors 0,2,8,13,14 for other shapes; 'identity': "
                                   "the default plan's anchors with identity head maps, valid for any TP size)")
    a("--tp", type=int, default=1, help="tensor-parallel size (vLLM's tensor_parallel_size)")
    a("--tp-mode", default="auto", choices=["auto", "shard", "gather"],
      help="how the Kascade backend serves head maps across TP shards (KASCADE_TP_MODE)")
    a("--topk-fraction", type=float, default=0.1)
    a("--eager", action="store_true", help="no CUDA graphs")
    a("--gpu-memory-utilization", type=float, default=0.9)
    a("--max-model-len", type=int, default=None,
      help="the engines' max_model_len (default: the longest context + the decode steps); a serving engine is "
           "usually sized for longer requests than most it serves")
    a("--max-num-batched-tokens", type=int, default=None,
      help="vLLM's max_num_batched_tokens for every engine (the chunked-prefill chunk; default: vLLM's)")
    a("--no-check", action="store_true")
    a("--json", default=None)
    # internal: each engine runs in its own process (vLLM does not give its GPU memory back in-process)
    a("--worker-out", default=None, help=argparse.SUPPRESS)
    a("--worker-check", action="store_true", help=argparse.SUPPRESS)


def _model_dir(args, max_len: int) -> str:
    cfg = dict(SHAPES[args.model], max_position_embeddings=max_len, torch_dtype="bfloat16", rms_norm_eps=1e-5,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    d = tempfile.mkdtemp(prefix="kascade-serve-")
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    return d


def _plan_path(args, cfg_dir: str) -> str:
    from ..plan import ModelSpec, Plan
    from ..plans import load_shipped, shipped

    cfg = json.load(open(os.path.join(cfg_dir, "config.json")))
    spec = ModelSpec(cfg["model_type"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
                     cfg["num_key_value_heads"], cfg["head_dim"], name=args.model)
    if args.plan and args.plan != "identity":
        plan = load_shipped(args.plan) if args.plan in shipped() else Plan.load(args.plan)
    elif args.model == "llama-3.1-8b" and spec.num_layers == 32:
        plan = load_shipped("llama-3.1-8b-instruct")
    else:
        plan = Plan.identity(spec, sorted({a for a in (0, 2, 8, 13, 14) if a < spec.num_layers}))
    if args.plan == "identity":
        plan = Plan.identity(spec, plan.anchor_layers)
    plan = Plan(spec, plan.anchor_layers, plan.head_map, topk_fraction=args.topk_fraction,
                topk_floor=plan.topk_floor, tile_size=plan.tile_size)
    path = os.path.join(cfg_dir, "plan.json")
    plan.save(path)
    return path


def _llm(model_dir: str, backend: str, args, max_len: int, max_seqs: int):
    from vllm import LLM

    return LLM(model=model_dir, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", seed=0,
               attention_backend=backend, max_model_len=max_len, max_num_seqs=max(max_seqs, 8),
               enforce_eager=args.eager, gpu_memory_utilization=args.gpu_memory_utilization,
               enable_prefix_caching=False, tensor_parallel_size=args.tp,
               **({"max_num_batched_tokens": args.max_num_batched_tokens} if args.max_num_batched_tokens else {}))


def _capacity(llm) -> int:
    """Tokens the engine's KV cache holds (all sequences together)."""
    cc = llm.llm_engine.vllm_config.cache_config
    return int(cc.num_gpu_blocks) * int(cc.block_size)


def _prompts(n: int, length: int, vocab: int, seed: int):
    import torch
    from vllm.inputs import TokensPrompt

    g = torch.Generator().manual_seed(seed)
    return [TokensPrompt(prompt_token_ids=torch.randint(3, vocab, (length,), generator=g).tolist()) for _ in range(n)]


def _run_point(llm, L: int, B: int, steps: int, vocab: int) -> dict:
    """(ttft_s at batch 1 when B == 1, decode ms per step at batch B) by stepping the engine."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True, detokenize=False)
    prompts = _prompts(B, L, vocab, seed=L + B)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{L}-{B}-{i}-{time.time_ns()}", p, params)
    t0 = time.perf_counter()
    seen: set = set()
    ttft = None
    while len(seen) < B:  # prefill steps until every request has its first token
        for out in engine.step():
            if out.outputs and len(out.outputs[0].token_ids) >= 1:
                seen.add(out.request_id)
        if ttft is None and len(seen) >= 1 and B == 1:
            ttft = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    while engine.has_unfinished_requests():
        engine.step()
    return {"ttft_s": ttft, "decode_ms_per_step": statistics.median(times) * 1e3}


def _free(llm) -> None:
    import torch

    from ..integrations import vllm as kv

    del llm
    gc.collect()
    torch.cuda.empty_cache()
    kv._State.plan = None  # the next engine's builder loads (and checks) the plan again


def _check(args, vocab: int) -> dict:
    """Kascade backend at Top-k fraction 1.0 vs FLASH_ATTN: greedy tokens of 2 prompts of 1000 tokens on a
    4-layer model of the same shape (CUDA graphs as in the run), each engine in its own process."""
    tokens = {}
    for backend in ("FLASH_ATTN", "CUSTOM"):
        tokens[backend] = _in_process(args, ["--backends", backend, "--worker-check"])
    same = sum(a == b for x, y in zip(tokens["FLASH_ATTN"], tokens["CUSTOM"]) for a, b in zip(x, y))
    total = sum(len(x) for x in tokens["FLASH_ATTN"])
    print(f"check: Kascade backend at Top-k 1.0 vs FLASH_ATTN, 4-layer model: {same}/{total} greedy tokens equal",
          flush=True)
    return {"ok": same == total, "tokens_equal": same, "tokens": total, **tokens}


def _in_process(args, extra: list[str]):
    """Run this command for one engine in a child process; returns what the child wrote (JSON)."""
    import subprocess

    out = tempfile.mktemp(suffix=".json", prefix="kascade-serve-")
    argv = [sys.executable, "-m", "kascade.cli", "bench", "serve", "--model", args.model, "--context", args.context,
            "--batch", args.batch, "--steps", str(args.steps), "--topk-fraction", str(args.topk_fraction),
            "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--tp", str(args.tp),
            "--tp-mode", args.tp_mode, "--worker-out", out, *extra]
    if args.layers:
        argv += ["--layers", str(args.layers)]
    if args.plan:
        argv += ["--plan", args.plan]
    if args.eager:
        argv.append("--eager")
    sizes = (("--max-model-len", args.max_model_len), ("--max-num-batched-tokens", args.max_num_batched_tokens))
    for flag, value in sizes:
        if value:
            argv += [flag, str(value)]
    subprocess.run(argv, check=True)
    with open(out) as f:
        return json.load(f)


def _worker(args) -> int:
    """One engine (one backend) in this process: the check's greedy tokens, or the timed points."""
    from ..integrations import vllm as kv

    kv.register()
    os.environ[kv.TP_MODE_ENV] = args.tp_mode
    vocab = SHAPES[args.model]["vocab_size"]
    label = args.backends
    backend, _, plan = label.partition(":")  # "CUSTOM:identity": the Kascade backend with another --plan
    if plan:
        args.plan = plan
    if args.worker_check:
        small = argparse.Namespace(**{**vars(args), "layers": 4})
        d = _model_dir(small, 2048)
        os.environ[kv.PLAN_ENV] = _plan_path(small, d)
        os.environ[kv.FRACTION_ENV] = "1.0"
        result = _greedy(_llm(d, backend, small, 2048, 8), vocab)
    else:
        contexts, batches = comma_list(int)(args.context), comma_list(int)(args.batch)
        max_len = max(contexts) + args.steps + 64
        if args.max_model_len:
            if args.max_model_len < max_len:
                raise SystemExit(f"--max-model-len {args.max_model_len} is shorter than the longest context + steps "
                                 f"+ 64 = {max_len}")
            max_len = args.max_model_len
        d = _model_dir(args, max_len)
        os.environ[kv.PLAN_ENV] = _plan_path(args, d)
        llm = _llm(d, backend, args, max_len, max(batches))
        capacity = _capacity(llm)
        _warm_up(llm, vocab)
        result = []
        for L in contexts:
            for B in batches:
                r = dict(backend=label, context=L, batch=B, tp=args.tp, max_model_len=max_len,
                         max_num_batched_tokens=args.max_num_batched_tokens,
                         tp_mode=args.tp_mode if backend == "CUSTOM" else None)
                if B * (L + args.steps + 8) > capacity:  # vLLM would queue some requests: not batch B
                    print(f"{backend} {L} x {B}: needs {B * (L + args.steps + 8)} KV tokens, the cache holds "
                          f"{capacity}: skipped", flush=True)
                    result.append(dict(r, skipped=f"KV cache holds {capacity} tokens"))
                    continue
                r.update(_run_point(llm, L, B, args.steps, vocab))
                r["decode_tok_s"] = B / r["decode_ms_per_step"] * 1e3
                result.append(r)
                print(format_table([r], COLUMNS).splitlines()[-1], flush=True)
    with open(args.worker_out, "w") as f:
        json.dump(result, f)
    return 0


def _warm_up(llm, vocab: int) -> None:
    """One request before timing, long enough for sparse tiles and chunks: compiles the kernels a first
    prefill needs (vLLM's start-up only runs the decode shapes of its CUDA graphs through attention), so
    no time to first token includes a one-off JIT compile (Triton caches it on disk for later starts)."""
    from vllm import SamplingParams

    llm.generate(_prompts(1, 8192, vocab, seed=3), SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True,
                                                                  detokenize=False), use_tqdm=False)


def _greedy(llm, vocab: int):
    from vllm import SamplingParams

    outs = llm.generate(_prompts(2, 1000, vocab, seed=7),
                        SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, detokenize=False))
    return [list(o.outputs[0].token_ids) for o in outs]


COLUMNS = [("backend", "backend", ""), ("ctx", "context", "d"), ("B", "batch", "d"), ("TTFT s", "ttft_s", ".3f"),
           ("TTFT x", "ttft_speedup", ".2f"), ("ms/step", "decode_ms_per_step", ".2f"), ("tok/s", "decode_tok_s", ".1f"),
           ("decode x", "decode_speedup", ".2f")]


def run(args) -> int:
    import torch

    try:
        import vllm
    except ImportError:
        print("kascade bench serve needs vLLM: pip install kascade[vllm]", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("kascade bench serve needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.worker_out:
        return _worker(args)
    contexts, batches = comma_list(int)(args.context), comma_list(int)(args.batch)
    vocab = SHAPES[args.model]["vocab_size"]
    check = None if args.no_check else _check(args, vocab)
    rows = []
    for backend in comma_list(str)(args.backends):
        try:
            rows.extend(_in_process(args, ["--backends", backend]))
        except Exception as e:  # one engine failing (e.g. out of memory) must not lose the others' rows
            print(f"{backend}: the engine failed ({e}); its rows are missing", file=sys.stderr, flush=True)
            rows.append(dict(backend=backend, context=None, batch=None, failed=str(e)))
    for L in contexts:
        for B in batches:
            pt = [r for r in rows if r["context"] == L and r["batch"] == B and not r.get("skipped")]
            base = [r for r in pt if not r["backend"].startswith("CUSTOM")]
            best_ms = min((r["decode_ms_per_step"] for r in base), default=None)
            best_ttft = min((r["ttft_s"] for r in base if r["ttft_s"]), default=None)
            for r in pt:
                r["decode_speedup"] = best_ms / r["decode_ms_per_step"] if best_ms else None
                r["ttft_speedup"] = best_ttft / r["ttft_s"] if best_ttft and r["ttft_s"] else None
    meta = {"bench": "serve", "env": env_info(), "vllm": vllm.__version__, "argv": sys.argv[1:], "check": check,
            "args": {k: v for k, v in vars(args).items() if k != "func"}}
    path = args.json or os.path.join("benchmarks", "results", f"serve_{time.strftime('%Y%m%d_%H%M%S')}.json")
    write_results(path, rows, meta)
    print()
    print(format_table(rows, COLUMNS))
    print(path)
    return 0
