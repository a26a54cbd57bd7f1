"""`kascade bench decode`: Kascade decode kernels (layer 0, anchor, reuse) against the best dense kernel.

For every sweep point (batch x context x Top-k fraction x geometry x head dim x dtype; --heads and
--kv-heads are zipped, so `--heads 32,16 --kv-heads 8,2` is the Llama geometry 32/8 and the Qwen-like
16/2):
  1. random q, K/V cache (every row full length); checks, on the first --check-rows rows, every kernel
     against kascade.reference: outputs by the FlashAttention rule (max error at most twice a plain
     same-precision PyTorch run's, plus 1e-3), selections by count, range, uniqueness and the pooled
     attention mass they capture (at least the reference selection's);
  2. times the dense baselines: torch SDPA flash / efficient / cuDNN backends with enable_gqa (those that
     accept the shape) and our Triton split-KV dense decode; the best is the denominator;
  3. times layer 0 (dense output + selection), an anchor layer (selection + sparse attention), a reuse
     layer (sparse attention over given indices), and, as a breakdown, the anchor's score pass alone and
     score pass + selection;
  4. the whole model: (1 layer 0 + (anchors - 1) anchors + (layers - anchors) reuse) / layers per layer,
     and its speedup over the best dense (layers x best dense / that sum).
Times are medians of CUDA-graph replays, each after an L2 flush (kascade.bench.common.bench_ms).
Prints a table, writes one JSON document (--json) and optionally a plot (--plot); the last stdout
line is the JSON path.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time
import warnings

import torch

from .common import bench_ms, comma_list, env_info, format_table, plot, write_results, zip_geometries

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SDPA_BACKENDS = ("flash", "efficient", "cudnn")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--context", default="8192,32768,131072", help="key lengths (comma list)")
    a("--batch", default="64", help="batch sizes (comma list)")
    a("--topk-fraction", default="0.1", help="Top-k fractions (comma list)")
    a("--topk-floor", type=int, default=128)
    a("--heads", default="32", help="query heads (comma list, zipped with --kv-heads)")
    a("--kv-heads", default="8", help="KV heads (comma list)")
    a("--head-dim", default="128", help="head dims (comma list)")
    a("--dtype", default="bf16", help="dtypes: bf16, fp16, fp32 (comma list)")
    a("--layers", default="32", help="layers of the modelled model (comma list)")
    a("--anchors", default="5", help="anchor layers, layer 0 included (comma list)")
    a("--baselines", default="flash,efficient,cudnn,triton",
      help="dense baselines: SDPA backends flash, efficient, cudnn, math, and triton (ours)")
    a("--check-rows", type=int, default=2, help="batch rows checked against the reference (0: no check)")
    a("--budget-ms", type=float, default=300.0, help="timing budget per kernel and point")
    a("--no-graph", action="store_true", help="time plain calls instead of CUDA-graph replays")
    a("--seed", type=int, default=0)
    a("--json", default=None, help="results file (default benchmarks/results/decode_<time>.json)")
    a("--plot", default=None, help="PNG of the whole-model speedup against context")


# --------------------------------------------------------------------------------------------- checks
def _lowp(q, k, v, allowed, scale):
    """Plain attention in the inputs' precision (the tolerance baseline). allowed [B, Hkv, L] bool."""
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, Hq // Hkv, D)
    s = torch.einsum("bhgd,bhkd->bhgk", qg, k) * scale
    s = s.masked_fill(~allowed[:, :, None, :], -math.inf)
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhgk,bhkd->bhgd", p, v).reshape(B, Hq, 1, D)


def _out_check(name, out, ref32, lowp, report):
    err = (out.float() - ref32).abs().max().item()
    base = (lowp.float() - ref32).abs().max().item()
    ok = bool(torch.isfinite(out).all()) and err <= 2 * base + 1e-3
    report[name] = {"max_err": err, "lowp_max_err": base, "ok": ok}
    return ok


def _check(q, k, v, ks, ke, outs, indices, frac, floor, scale, rows):
    """Compare the first `rows` rows of each kernel's output with the reference. Returns a report."""
    from .. import reference as R

    sl = slice(0, rows)
    q, k, v, ks, ke = q[sl], k[sl], v[sl], ks[sl], ke[sl]
    indices = indices[sl]
    B, Hq = q.shape[:2]
    Hkv, L = k.shape[1], k.shape[2]
    G = Hq // Hkv
    report: dict = {}
    ok = True
    # selection: count, range, uniqueness, captured pooled mass vs the reference's selection
    kb = R.topk_budget(L, frac, floor)
    real = indices[..., :kb]
    sel_ok = bool((indices[..., kb:] == -1).all()) and bool(((real >= 0) & (real < L)).all())
    sel_ok &= bool((real.sort(-1).values.diff(dim=-1) > 0).all()) if kb > 1 else True
    ref_idx = R.select_decode(q, k, ks, ke, topk_fraction=frac, topk_floor=floor, scale=scale)
    stats = dict(topk_fraction=frac, topk_floor=floor, scale=scale)
    got = R.selection_stats(q, k, indices, ks, ke, **stats)[0].reshape(B, Hkv, G).sum(-1)
    want = R.selection_stats(q, k, ref_idx, ks, ke, **stats)[0].reshape(B, Hkv, G).sum(-1)
    mass_ok = bool((got >= want - 1e-4 * G).all())
    report["selection"] = {"ok": sel_ok and mass_ok, "budget": kb, "captured_mass_per_head": got.mean().item() / G,
                           "reference_mass_per_head": want.mean().item() / G}
    ok &= sel_ok and mass_ok
    # outputs
    dense32 = R.dense_attention(q.float(), k.float(), v.float(), ks, ke, scale=scale)
    full = torch.ones(B, Hkv, L, dtype=torch.bool, device=q.device)
    dense_lowp = _lowp(q, k, v, full, scale)
    sparse32 = R.sparse_attention(q.float(), k.float(), v.float(), indices, ks, ke, scale=scale)
    allowed = torch.zeros(B, Hkv, L + 1, dtype=torch.bool, device=q.device)
    allowed.scatter_(-1, torch.where(indices >= 0, indices.long(), L), True)
    sparse_lowp = _lowp(q, k, v, allowed[..., :L], scale)
    for name, out in outs.items():
        dense_kind = name in ("triton", "layer0") or name.startswith("sdpa_")
        ok &= _out_check(name, out[sl], dense32 if dense_kind else sparse32,
                         dense_lowp if dense_kind else sparse_lowp, report)
    report["ok"] = ok
    return report


# --------------------------------------------------------------------------------------------- one point
def _sdpa_fn(backend, q, k, v, scale):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend]

    def fn():
        with sdpa_kernel(which):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

    return fn


def random_inputs(B, Hq, Hkv, L, D, dtype, seed, device="cuda"):
    """A decode step's q [B, Hq, 1, D], full caches k, v [B, Hkv, L, D] of random data (never zeros)
    and the per-row key range (every row holds L keys)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, Hq, 1, D, device=device, dtype=dtype, generator=gen)
    k = torch.randn(B, Hkv, L, D, device=device, dtype=dtype, generator=gen)
    v = torch.randn(B, Hkv, L, D, device=device, dtype=dtype, generator=gen)
    ks = torch.zeros(B, dtype=torch.int64, device=device)
    ke = torch.full((B,), L, dtype=torch.int64, device=device)
    return q, k, v, ks, ke


def _run_point(args, B, L, frac, Hq, Hkv, D, dt, layers, anchors) -> dict:
    from .. import reference as R
    from ..ops import decode as K

    q, k, v, ks, ke = random_inputs(B, Hq, Hkv, L, D, DTYPES[dt], args.seed)
    scale = 1.0 / math.sqrt(D)
    floor = args.topk_floor
    kb = R.topk_budget(L, frac, floor)
    sel = dict(topk_fraction=frac, topk_floor=floor, scale=scale)

    fns = {}
    baselines = comma_list(str)(args.baselines)
    for name in baselines:
        if name == "triton":
            fns["triton"] = lambda: K.dense(q, k, v, ks, ke, scale=scale)
        elif name in SDPA_BACKENDS + ("math",):
            fns[f"sdpa_{name}"] = _sdpa_fn(name, q, k, v, scale)
        else:
            raise SystemExit(f"unknown baseline {name!r}; expected flash, efficient, cudnn, math, triton")
    unsupported = {}
    outs = {}
    for name in list(fns):
        try:
            outs[name] = fns[name]()
            torch.cuda.synchronize()
        except RuntimeError as exc:  # this SDPA backend refuses the shape
            unsupported[name] = str(exc).splitlines()[0][:200]
            del fns[name]
    outs["layer0"], _ = K.anchor(q, k, v, ks, ke, dense_output=True, **sel)
    outs["anchor"], indices = K.anchor(q, k, v, ks, ke, **sel)
    outs["reuse"] = K.sparse(q, k, v, indices, ks, ke, scale=scale)
    torch.cuda.synchronize()
    check = None
    if args.check_rows > 0:
        check = _check(q, k, v, ks, ke, outs, indices, frac, floor, scale, min(args.check_rows, B))
    del outs

    def score_pass():
        return K._split_pass(q, k, v, ks, ke, scale, write_scores=True, acc_v=False)

    def score_select():
        scores, m, l, _, n = K._split_pass(q, k, v, ks, ke, scale, write_scores=True, acc_v=False)
        return K.select(scores, m, l, n, ks, ke, Hkv=Hkv, topk_fraction=frac, topk_floor=floor)

    kernels = {
        "layer0": lambda: K.anchor(q, k, v, ks, ke, dense_output=True, **sel),
        "anchor": lambda: K.anchor(q, k, v, ks, ke, **sel),
        "reuse": lambda: K.sparse(q, k, v, indices, ks, ke, scale=scale),
        "anchor_scores": score_pass,
        "anchor_scores_select": score_select,
    }
    timing = dict(use_graph=not args.no_graph, budget_ms=args.budget_ms)
    dense_ms = {name: bench_ms(fn, **timing) for name, fn in fns.items()}
    ms = {name: bench_ms(fn, **timing) for name, fn in kernels.items()}
    best_name = min(dense_ms, key=dense_ms.get)
    best = dense_ms[best_name]
    elt = q.element_size()
    kv_bytes = 2 * B * Hkv * L * D * elt
    reuse_bytes = 2 * B * Hkv * kb * D * elt + B * Hkv * kb * 4
    model_ms = ms["layer0"] + (anchors - 1) * ms["anchor"] + (layers - anchors) * ms["reuse"]
    point = {
        "batch": B, "context": L, "topk_fraction": frac, "topk_floor": floor, "budget": kb,
        "heads": Hq, "kv_heads": Hkv, "head_dim": D, "dtype": dt, "layers": layers, "anchors": anchors,
        "dense_ms": dense_ms, "unsupported": unsupported, "best_dense": best_name, "best_dense_ms": best,
        "kascade_ms": ms, "ratio_to_dense": {n: t / best for n, t in ms.items()},
        "model_ms": model_ms, "model_layer_ms": model_ms / layers, "model_speedup": layers * best / model_ms,
        "tb_per_s": {**{n: kv_bytes / t / 1e9 for n, t in dense_ms.items()},
                     "reuse": reuse_bytes / ms["reuse"] / 1e9,
                     "anchor_scores_k_read": kv_bytes / 2 / ms["anchor_scores"] / 1e9},
        "bytes": {"kv": kv_bytes, "reuse_min": reuse_bytes, "anchor_min": kv_bytes // 2 + reuse_bytes},
        "check": check,
    }
    del q, k, v, indices, fns, kernels
    return point


COLUMNS = [
    ("B", "batch", "d"), ("ctx", "context", "d"), ("frac", "topk_fraction", ".2f"),
    ("geom", lambda p: f"{p['heads']}/{p['kv_heads']}/{p['head_dim']}", "s"), ("dtype", "dtype", "s"),
    ("best dense", "best_dense", "s"), ("ms", "best_dense_ms", ".3f"),
    ("triton dense", lambda p: p["dense_ms"].get("triton"), ".3f"),
    ("layer0", lambda p: p["kascade_ms"]["layer0"], ".3f"), ("anchor", lambda p: p["kascade_ms"]["anchor"], ".3f"),
    ("reuse", lambda p: p["kascade_ms"]["reuse"], ".4f"),
    ("l0/d", lambda p: p["ratio_to_dense"]["layer0"], ".2f"), ("anc/d", lambda p: p["ratio_to_dense"]["anchor"], ".3f"),
    ("reu/d", lambda p: p["ratio_to_dense"]["reuse"], ".3f"),
    ("model ms/layer", "model_layer_ms", ".3f"), ("speedup", "model_speedup", ".2f"),
    ("dense TB/s", lambda p: p["tb_per_s"][p["best_dense"]], ".2f"), ("reuse TB/s", lambda p: p["tb_per_s"]["reuse"], ".2f"),
    ("check", lambda p: "-" if p["check"] is None else ("ok" if p["check"]["ok"] else "FAIL"), "s"),
]


def run(args) -> int:
    if not torch.cuda.is_available():
        print("kascade bench decode needs a CUDA GPU", file=sys.stderr)
        return 2
    # SDPA explains at length why a backend refused the shape; the refusal is recorded in the JSON.
    warnings.filterwarnings("ignore", category=UserWarning, module=__name__)
    points = []
    ints, floats, strs = comma_list(int), comma_list(float), comma_list(str)
    grid = itertools.product(ints(args.batch), ints(args.context), floats(args.topk_fraction),
                             zip_geometries(args.heads, args.kv_heads), ints(args.head_dim), strs(args.dtype),
                             ints(args.layers), ints(args.anchors))
    failed = False
    for B, L, frac, (Hq, Hkv), D, dt, layers, anchors in grid:
        if dt not in DTYPES:
            raise SystemExit(f"unknown dtype {dt!r}; expected one of {sorted(DTYPES)}")
        t0 = time.time()
        p = _run_point(args, B, L, frac, Hq, Hkv, D, dt, layers, anchors)
        p["wall_s"] = round(time.time() - t0, 1)
        points.append(p)
        failed |= p["check"] is not None and not p["check"]["ok"]
        print(format_table([p], COLUMNS).splitlines()[-1], flush=True)
        torch.cuda.empty_cache()
    meta = {"bench": "decode", "env": env_info(), "argv": sys.argv[1:],
            "args": {k: v for k, v in vars(args).items() if k != "func"}}
    path = args.json or os.path.join("benchmarks", "results", f"decode_{time.strftime('%Y%m%d_%H%M%S')}.json")
    write_results(path, points, meta)
    if args.plot:
        plot(points, "context", ["model_speedup"], args.plot,
             group=lambda p: f"B={p['batch']} top-k {p['topk_fraction']:.0%} {p['heads']}/{p['kv_heads']}",
             ylabel="whole-model decode attention speedup vs best dense")
    print()
    print(format_table(points, COLUMNS))
    print(path)
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kascade bench decode", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
