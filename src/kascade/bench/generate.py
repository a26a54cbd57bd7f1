"""`kascade bench generate`: end-to-end generation, Kascade vs dense, on a GPU.

A model is built from a config at real shapes with random weights (``llama-3.1-8b``: 32 layers, 32/8/128;
``qwen2.5-7b``: 28 layers, 28/4/128; ``--layers`` for quick runs) or loaded (a kascade.models name). For
every prompt length and batch size it measures, for each method in the same process:

* ``dense``: the model with ``kascade.enable(model, plan, variant="dense")``, i.e. the fastest dense path
  we have with the same KascadeCache and the same CUDA-graph decode step as Kascade (prefill through
  torch SDPA's cuDNN kernel, decode through kascade's split-KV dense kernel, which reads the row lengths
  on the device and so can be captured);
* ``kascade``: the plan (the authors' Llama-3.1-8B plan, or ``--anchors`` with identity head maps);
* ``dense-compiled``, ``kascade-compiled``: the same with torch.compile of the decode forward around the
  attention (the model's norms, rotary and MLP fused), inside the same CUDA graph;
* ``hf`` (``--hf-baseline``, batch 1 only): transformers' own ``generate()`` with sdpa and DynamicCache,
  what a user runs without kascade (eager, concatenating cache).

Per method and point: time to first token (batch-1 prefill of the prompt + the first token), decode
milliseconds per step and tokens per second (per sequence and in total), peak GPU memory, and the share of
a decode step's wall time the GPU is busy (kernel time from the profiler / wall time). Ratios are against
the fastest dense path of the same run. Decode at batch > 1 fills the cache rows with random keys and
values (the model's weights are random too; kernel times do not depend on the values) instead of
prefilling every row. Before timing, Kascade at Top-k fraction 1.0 must give the dense prefill logits on
a short prompt (the check, with the greedy-token agreement, is recorded). Prints a table, writes JSON (--json) and a plot (--plot); the last
stdout line is the JSON path.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

from .common import comma_list, env_info, format_table, plot, write_results

SHAPES = {
    # name: (layers, heads, kv heads, head dim, hidden, intermediate, vocab, model_type)
    "llama-3.1-8b": (32, 32, 8, 128, 4096, 14336, 128256, "llama"),
    "qwen2.5-7b": (28, 28, 4, 128, 3584, 18944, 152064, "qwen2"),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--model", default="llama-3.1-8b",
      help=f"random-weight shape ({', '.join(SHAPES)}) or a kascade.models name (real weights)")
    a("--layers", type=int, default=None, help="build only this many layers (quick runs)")
    a("--context", default="32768,131072", help="prompt lengths (comma list)")
    a("--batch", default="1", help="batch sizes (comma list); time to first token is measured at batch 1")
    a("--new-tokens", type=int, default=64, help="decode steps timed per point")
    a("--topk-fraction", type=float, default=0.1)
    a("--anchors", default=None, help="anchor layers (comma list; default: the shipped plan, or 0,2,8,13,14)")
    a("--dtype", default="bf16", choices=sorted(DTYPES))
    a("--prefill-chunk", type=int, default=131072, help="prompt tokens per prefill pass")
    a("--methods", default="dense,kascade,dense-compiled,kascade-compiled",
      help="dense, kascade, dense-compiled, kascade-compiled (comma list; -compiled: torch.compile of the "
           "decode forward around the attention, inside the same CUDA graph; its prefill is not compiled, so "
           "its TTFT is not measured again)")
    a("--hf-baseline", action="store_true", help="also time transformers' generate() (sdpa, DynamicCache), batch 1")
    a("--ttft-reps", type=int, default=2, help="timed prefills per point (after one warm-up)")
    a("--no-check", action="store_true", help="skip the fraction-1.0 token check")
    a("--json", default=None, help="results file (default benchmarks/results/generate_<time>.json)")
    a("--plot", default=None, help="PNG of the decode and TTFT speedups against context")


# ------------------------------------------------------------------------------------------ model, plan
def build_model(name: str, layers: int | None, dtype: torch.dtype, max_positions: int):
    """(model, plan): random weights at a real shape, or a kascade.models model and its shipped plan."""
    import transformers

    from ..plans import load_shipped, shipped

    if name not in SHAPES:
        from .. import models

        model, _ = models.load(name)
        model = model.to(device="cuda", dtype=dtype).eval()
        return model, (load_shipped(name) if name in shipped() else None)
    n, hq, hkv, d, hidden, inter, vocab, kind = SHAPES[name]
    n = layers or n
    cls = transformers.LlamaConfig if kind == "llama" else transformers.Qwen2Config
    config = cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=n,
                 num_attention_heads=hq, num_key_value_heads=hkv, head_dim=d,
                 max_position_embeddings=max_positions, rope_theta=500000.0, attn_implementation="sdpa",
                 tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model.kascade_model_name = name
    plan = None
    if name == "llama-3.1-8b" and layers in (None, 32) and "llama-3.1-8b-instruct" in shipped():
        plan = load_shipped("llama-3.1-8b-instruct")
    return model, plan


def make_plan(model, shipped_plan, anchors: str | None, fraction: float):
    from ..integrations.hf import model_spec
    from ..plan import Plan

    spec = model_spec(model)
    if shipped_plan is not None and anchors is None:
        plan = Plan(spec, shipped_plan.anchor_layers, shipped_plan.head_map, topk_fraction=fraction,
                    topk_floor=shipped_plan.topk_floor, tile_size=shipped_plan.tile_size,
                    provenance={"from": shipped_plan.provenance.get("source", "shipped plan")})
        return plan
    wanted = comma_list(int)(anchors) if anchors else [0, 2, 8, 13, 14]
    layers = sorted({a for a in wanted if a < spec.num_layers} | {0})
    return Plan.identity(spec, layers, topk_fraction=fraction)


# ------------------------------------------------------------------------------------------ measuring
def _fill_random(gen, length: int) -> None:
    """Fill every row of the Generator's cache with `length` random keys/values and point it there."""
    cache = gen.cache
    cache.reset()
    cache.set_padding(None)
    cache.key_storage[:, :, :, :length].normal_()
    cache.value_storage[:, :, :, :length].normal_()
    cache.length = length
    cache.kv_end.fill_(length)
    gen._ids.random_(0, 1000)
    gen._pos.fill_(length)


def _gpu_busy(gen, sampling, steps: int = 8) -> float | None:
    """Share of the wall time of `steps` decode steps during which the GPU runs kernels or copies
    (device events of the profiler, one stream: they do not overlap)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            gen.decode_step(sampling)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    device_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
    return device_us / 1e6 / wall if wall > 0 and device_us > 0 else None


def _kv_gib(model, L: int, B: int) -> float:
    from ..integrations.hf import model_spec

    s = model_spec(model)
    return 2 * s.num_layers * B * s.num_kv_heads * L * s.head_dim * next(model.parameters()).element_size() / 2**30


def _measure(model, method: str, L: int, B: int, args, vocab: int) -> dict:
    from ..generation import Generator

    compiled = method.endswith("-compiled")
    steps = args.new_tokens
    sampling = dict(do_sample=False, temperature=1.0, top_p=1.0)
    row: dict = {"method": method, "context": L, "batch": B}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    g = torch.Generator(device="cuda").manual_seed(L)
    gen = Generator(model, batch_size=B, capacity=L + steps + 16, prefill_chunk=args.prefill_chunk,
                    compile=compiled)
    if B == 1:
        ids = torch.randint(0, vocab, (1, L), device="cuda", generator=g)
        ttfts = []
        for rep in range(1 + (0 if compiled else args.ttft_reps)):
            res = gen.generate(ids, max_new_tokens=1)
            if rep:
                ttfts.append(res.ttft_s)
        row["ttft_s"] = statistics.median(ttfts) if ttfts else None
        gen._ids.copy_(res.tokens[:, :1])
    else:
        _fill_random(gen, L)
        row["ttft_s"] = None
    row["cache_fill"] = "prefill" if B == 1 else "random"
    t_capture = time.perf_counter()
    gen.decode_step(sampling)  # capture (and compile) outside the timing
    torch.cuda.synchronize()
    row["capture_s"] = time.perf_counter() - t_capture
    t0 = time.perf_counter()
    for _ in range(steps):
        gen.decode_step(sampling)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    row["decode_ms_per_step"] = dt / steps * 1e3
    row["decode_tok_s"] = B * steps / dt
    row["decode_tok_s_per_seq"] = steps / dt
    row["gpu_busy"] = _gpu_busy(gen, sampling)
    row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    row["peak_extra_gb"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    del gen
    gc.collect()
    torch.cuda.empty_cache()
    return row


def _measure_hf(model, L: int, args, vocab: int) -> dict:
    """transformers' generate() with sdpa and DynamicCache (eager): batch 1."""
    from ..integrations import hf

    hf.disable(model)
    g = torch.Generator(device="cuda").manual_seed(L)
    ids = torch.randint(0, vocab, (1, L), device="cuda", generator=g)
    torch.cuda.reset_peak_memory_stats()
    kw = dict(do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, **kw)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **kw)
        torch.cuda.synchronize()
        ttft = time.perf_counter() - t0
        n = min(args.new_tokens, 32)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n + 1, min_new_tokens=n + 1, **kw)
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
    step = max(1e-9, (total - ttft) / n)
    return {"method": "hf", "context": L, "batch": 1, "ttft_s": ttft, "cache_fill": "prefill",
            "decode_ms_per_step": step * 1e3, "decode_tok_s": 1 / step, "decode_tok_s_per_seq": 1 / step,
            "gpu_busy": None, "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30, "peak_extra_gb": None}


def _check(model, plan, vocab: int) -> dict:
    """Kascade at Top-k fraction 1.0 is dense: the prefill logits of a 2K prompt agree to bf16 precision
    (max difference at most 2% of the logits' range), and the greedy tokens of the graph decode are
    compared (recorded; with random weights the logits are nearly flat, so a bf16 rounding can flip an
    argmax and every later token: the logits are the test)."""
    from ..generation import Generator
    from ..integrations import hf

    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, vocab, (1, 2048), device="cuda", generator=g)
    tokens, logits = {}, {}
    for name, p, variant in (("dense", plan, "dense"), ("one", plan.with_budget(topk_fraction=1.0), "kascade")):
        hf.enable(model, p, variant=variant)
        gen = Generator(model, batch_size=1, capacity=2048 + 17)
        tokens[name] = gen.generate(ids, max_new_tokens=16).tokens
        logits[name] = gen.prefill(ids).float()
    diff = float((logits["one"] - logits["dense"]).abs().max())
    span = float(logits["dense"].max() - logits["dense"].min())
    same = (tokens["dense"] == tokens["one"]).flatten()
    first_diff = int((~same).nonzero()[0]) if not bool(same.all()) else None
    return {"ok": diff <= 0.02 * span, "logits_max_diff": diff, "logits_range": span, "tokens": 16,
            "tokens_equal": int(same.sum()), "first_token_difference": first_diff}


COLUMNS = [
    ("method", "method", ""), ("ctx", "context", "d"), ("B", "batch", "d"),
    ("TTFT s", "ttft_s", ".3f"), ("TTFT x", "ttft_speedup", ".2f"),
    ("ms/step", "decode_ms_per_step", ".2f"), ("tok/s", "decode_tok_s", ".1f"), ("decode x", "decode_speedup", ".2f"),
    ("GPU busy", "gpu_busy", ".0%"), ("peak GB", "peak_mem_gb", ".1f"), ("mem x", "mem_ratio", ".3f"),
]


def run(args) -> int:
    if not torch.cuda.is_available():
        print("kascade bench generate needs a CUDA GPU", file=sys.stderr)
        return 2
    from ..integrations import hf

    contexts, batches = comma_list(int)(args.context), comma_list(int)(args.batch)
    methods = comma_list(str)(args.methods)
    dtype = DTYPES[args.dtype]
    model, shipped_plan = build_model(args.model, args.layers, dtype, max(contexts) + args.new_tokens + 64)
    vocab = model.config.vocab_size
    plan = make_plan(model, shipped_plan, args.anchors, args.topk_fraction)
    print(f"model {args.model} ({hf.model_spec(model).num_layers} layers), anchors {list(plan.anchor_layers)}, "
          f"Top-k {plan.topk_fraction:.0%}", flush=True)
    check = None if args.no_check else _check(model, plan, vocab)
    if check is not None:
        print(f"check: Kascade at Top-k 1.0 vs dense: prefill logits differ by {check['logits_max_diff']:.4f} "
              f"(range {check['logits_range']:.2f}): {'ok' if check['ok'] else 'FAILED'}; greedy tokens equal "
              f"{check['tokens_equal']}/16", flush=True)
    rows = []
    for L in contexts:
        for B in batches:
            point = []
            for method in methods:
                hf.enable(model, plan, variant="dense" if method.startswith("dense") else "kascade")
                try:
                    r = _measure(model, method, L, B, args, vocab)
                except torch.OutOfMemoryError:
                    gc.collect()
                    torch.cuda.empty_cache()
                    print(f"{method} {L} x {B}: out of GPU memory (the KV cache alone is "
                          f"{_kv_gib(model, L, B):.1f} GiB); skipped", flush=True)
                    continue
                point.append(r)
                print(format_table([r], COLUMNS).splitlines()[-1], flush=True)
            if args.hf_baseline and B == 1:
                r = _measure_hf(model, L, args, vocab)
                point.append(r)
                print(format_table([r], COLUMNS).splitlines()[-1], flush=True)
            dense_rows = [r for r in point if r["method"] in ("dense", "dense-compiled", "hf")]
            best_tok = max((r["decode_tok_s"] for r in dense_rows), default=None)
            ttfts = [r["ttft_s"] for r in dense_rows if r["ttft_s"] is not None]
            best_ttft = min(ttfts) if ttfts else None
            dense_mem = next((r["peak_mem_gb"] for r in point if r["method"] == "dense"), None)
            for r in point:
                r["decode_speedup"] = r["decode_tok_s"] / best_tok if best_tok else None
                r["ttft_speedup"] = best_ttft / r["ttft_s"] if best_ttft and r["ttft_s"] else None
                r["mem_ratio"] = r["peak_mem_gb"] / dense_mem if dense_mem else None
            rows.extend(point)
            if not point:
                continue
    meta = {"bench": "generate", "env": env_info(), "argv": sys.argv[1:], "check": check,
            "plan": {"anchor_layers": list(plan.anchor_layers), "topk_fraction": plan.topk_fraction,
                     "topk_floor": plan.topk_floor, "tile_size": plan.tile_size,
                     "head_map": "shipped" if shipped_plan is not None and args.anchors is None else "identity"},
            "args": {k: v for k, v in vars(args).items() if k != "func"}}
    path = args.json or os.path.join("benchmarks", "results", f"generate_{time.strftime('%Y%m%d_%H%M%S')}.json")
    write_results(path, rows, meta)
    if args.plot:
        krows = [r for r in rows if r["method"].startswith("kascade")]
        plot(krows, "context", ["decode_speedup"], args.plot, group=lambda r: f"{r['method']} B={r['batch']}",
             ylabel="end-to-end decode tokens/s, Kascade / best dense")
    print()
    print(format_table(rows, COLUMNS))
    print(path)
    return 0 if check is None or check["ok"] else 1
