"""`kascade bench prefill`: Kascade rolling prefill kernels against the best dense kernel of the same run.

For every sweep point (context x batch x Top-k fraction x tile size x geometry x dtype):
  1. checks the kernels' outputs first: against kascade.reference when the context is small
     (--check-max-context), otherwise on sampled tiles (captured pooled mass of the selection vs the
     exact Top-k computed in PyTorch; sparse output vs PyTorch over the same keys), and the sparse
     kernel at Top-k fraction 1 against dense;
  2. times (median of triton.testing.do_bench) the dense baselines: torch SDPA cuDNN backend with
     K/V expanded to the query heads, the SDPA flash backend, and our Triton flash kernel; the best
     one is the denominator;
  3. times layer 0 (dense output + selection), an anchor layer (selection + sparse attention) and a
     reuse layer (sparse attention over given indices) and reports their ratios to the best dense;
  4. the whole model: (1 layer 0 + (anchors - 1) anchors + (layers - anchors) reuse) / layers per
     layer, and its speedup over the best dense.
Prints a table; writes one JSON document (--json) and optionally a plot (--plot). The last stdout
line is the JSON path.

--heads and --kv-heads are zipped (equal lengths, or one of them a single value), so
`--heads 32,16 --kv-heads 8,2` is the Llama geometry 32/8 and the Qwen-like 16/2.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time

import torch

from .common import comma_list, env_info, plot, zip_geometries

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--context", default="32768,131072", help="key lengths (comma list)")
    a("--batch", default="1", help="batch sizes (comma list)")
    a("--topk-fraction", default="0.1", help="Top-k fractions (comma list)")
    a("--topk-floor", type=int, default=128)
    a("--heads", default="32", help="query heads (comma list, zipped with --kv-heads)")
    a("--kv-heads", default="8", help="KV heads (comma list)")
    a("--head-dim", default="128", help="head dims (comma list)")
    a("--dtype", default="bf16", help="dtypes: bf16, fp16, fp32 (comma list)")
    a("--tile-size", default="32", help="tile sizes T (comma list)")
    a("--layers", type=int, default=32, help="layers of the modelled model")
    a("--anchors", type=int, default=5, help="anchor layers, layer 0 included")
    a("--baselines", default="cudnn,flash,triton", help="dense baselines: cudnn, flash, triton")
    a("--check-max-context", type=int, default=4096,
      help="check against kascade.reference up to this context; above it, sampled tiles")
    a("--no-check", action="store_true", help="skip output checks")
    a("--warmup", type=int, default=25, help="do_bench warm-up (ms)")
    a("--rep", type=int, default=100, help="do_bench repetitions (ms)")
    a("--seed", type=int, default=0)
    a("--tune", action="store_true", help="also time the reuse kernel with a few block shapes")
    a("--json", default=None, help="write the results here (default benchmarks/results/prefill_<time>.json)")
    a("--plot", default=None, help="write a PNG plot of speedup vs context here")


# --------------------------------------------------------------------------------------------- helpers
def _bench(fn, warmup, rep) -> float:
    """Median ms by triton.testing.do_bench (L2 flushed between repetitions). Not common.bench_ms's CUDA
    graphs: the launchers read the row lengths on the host (one sync per call), which a graph cannot
    capture; every committed prefill result was timed this way."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def _causal_pairs(L: int) -> int:
    return L * (L + 1) // 2


def _sparse_pairs(L: int, T: int, fraction: float, floor: int) -> int:
    """Query-key pairs a rolling sparse layer computes (selected prefix keys + own tile causally)."""
    from ..ops.prefill import _tile_budgets_host

    n_tiles = -(-L // T)
    total = 0
    for t, kb in enumerate(_tile_budgets_host(n_tiles, T, fraction, floor)):
        rows = min(T, L - t * T)
        total += rows * (t * T if kb < 0 else kb) + rows * (rows + 1) // 2
    return total


# --------------------------------------------------------------------------------------------- checks
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _check_small(q, k, v, kw, scale) -> dict:
    """Everything against the reference (contexts up to --check-max-context)."""
    from .. import reference as R
    from ..ops import prefill as P

    ks = torch.zeros(q.shape[0], dtype=torch.int64, device=q.device)
    ke = torch.full_like(ks, k.shape[2])
    out0, idx0 = P.anchor(q, k, v, ks, ke, scale=scale, dense_output=True, **kw)
    out1, idx1 = P.anchor(q, k, v, ks, ke, scale=scale, dense_output=False, **kw)
    ref_dense = R.dense_attention(q, k, v, ks, ke, scale=scale)
    ref_idx = R.select_prefill(q, k, ks, ke, scale=scale, **kw)
    mass_k, _, _ = R.selection_stats(q, k, idx1, ks, ke, scale=scale, **kw)
    mass_r, _, _ = R.selection_stats(q, k, ref_idx, ks, ke, scale=scale, **kw)
    mass_0, _, _ = R.selection_stats(q, k, idx0, ks, ke, scale=scale, **kw)
    ref_sparse = R.sparse_attention(q, k, v, idx1, ks, ke, scale=scale, **kw)
    reuse = P.sparse(q, k, v, idx1, ks, ke, scale=scale, indices_from_anchor=True, **kw)
    dense = P.dense(q, k, v, ks, ke, scale=scale)
    res = {
        "mode": "reference",
        "dense_rel_err": _rel(dense, ref_dense),
        "layer0_rel_err": _rel(out0, ref_dense),
        "anchor_rel_err": _rel(out1, ref_sparse),
        "reuse_rel_err": _rel(reuse, ref_sparse),
        "indices_equal_layer0_anchor": bool((idx0 == idx1).all()),
        "captured_mass_kernel": float(mass_k.mean()),
        "captured_mass_reference": float(mass_r.mean()),
        "captured_mass_layer0": float(mass_0.mean()),
    }
    res["ok"] = (max(res["dense_rel_err"], res["layer0_rel_err"], res["anchor_rel_err"], res["reuse_rel_err"]) < 2e-2
                 and abs(res["captured_mass_kernel"] - res["captured_mass_reference"]) < 1e-3)
    return res


def _check_sampled(q, k, v, kw, scale, n_samples: int = 6) -> dict:
    """Long contexts: a few tiles recomputed in PyTorch (float32) from the kernels' own outputs."""
    from ..ops import prefill as P

    T, frac, floor = kw["tile_size"], kw["topk_fraction"], kw["topk_floor"]
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    sc = 1.0 / math.sqrt(D) if scale is None else scale
    ks = torch.zeros(B, dtype=torch.int64, device=q.device)
    ke = torch.full_like(ks, L)
    out1, idx = P.anchor(q, k, v, ks, ke, scale=scale, dense_output=False, **kw)
    reuse = P.sparse(q, k, v, idx, ks, ke, scale=scale, indices_from_anchor=True, **kw)
    n_tiles = idx.shape[2]
    gen = torch.Generator().manual_seed(1)
    tiles = sorted(set([n_tiles - 1] + torch.randint(n_tiles // 2, n_tiles, (n_samples - 1,), generator=gen).tolist()))
    worst_mass_gap, worst_err = 0.0, 0.0
    for t in tiles:
        P0 = t * T
        kb = int(idx[0, 0, t].ge(0).sum())
        for h in (0, Hkv - 1):
            qt = q[0, h * G:(h + 1) * G, P0:P0 + T].float()  # [G, T, D]
            s = torch.einsum("gtd,kd->gtk", qt, k[0, h, :P0 + T].float()) * sc
            pos = P0 + torch.arange(qt.shape[1], device=q.device)
            s = s.masked_fill(torch.arange(P0 + qt.shape[1], device=q.device)[None, None, :] > pos[None, :, None], -math.inf)
            p = torch.softmax(s, -1)
            pooled = p[..., :P0].sum((0, 1))
            sel = idx[0, h, t][:kb].long()
            assert kb == len(set(sel.tolist())), "selection has duplicates"
            best = pooled.topk(kb).values.sum()
            worst_mass_gap = max(worst_mass_gap, float((best - pooled[sel].sum()) / best))
            allowed = torch.zeros(P0 + qt.shape[1], dtype=torch.bool, device=q.device)
            allowed[sel] = True
            allowed[P0:] = True
            o = torch.softmax(s.masked_fill(~allowed, -math.inf), -1) @ v[0, h, :P0 + T].float()
            got = out1[0, h * G:(h + 1) * G, P0:P0 + T]
            got2 = reuse[0, h * G:(h + 1) * G, P0:P0 + T]
            worst_err = max(worst_err, _rel(got, o), _rel(got2, o))
    # Fraction 1: every tile dense, so sparse == dense.
    kw1 = dict(kw, topk_fraction=1.0)
    n_idx = torch.full((B, Hkv, n_tiles, 1), -1, dtype=torch.int32, device=q.device)
    full = P.sparse(q, k, v, n_idx, ks, ke, scale=scale, **kw1)
    dense = P.dense(q, k, v, ks, ke, scale=scale)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    res = {"mode": "sampled", "tiles": tiles, "worst_mass_gap": worst_mass_gap, "worst_tile_rel_err": worst_err,
           "fraction1_vs_dense_rel_err": _rel(full, dense), "triton_dense_vs_sdpa_rel_err": _rel(dense, sdpa)}
    res["ok"] = worst_mass_gap < 1e-3 and worst_err < 2e-2 and res["fraction1_vs_dense_rel_err"] < 2e-2 \
        and res["triton_dense_vs_sdpa_rel_err"] < 2e-2
    return res


# --------------------------------------------------------------------------------------------- one point
def _run_point(args, B, L, frac, T, Hq, Hkv, D, dtype_name) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ..ops import prefill as P

    dtype = DTYPES[dtype_name]
    dev = "cuda"
    torch.manual_seed(args.seed)
    q = torch.randn(B, Hq, L, D, device=dev, dtype=dtype)
    k = torch.randn(B, Hkv, L, D, device=dev, dtype=dtype)
    v = torch.randn(B, Hkv, L, D, device=dev, dtype=dtype)
    ks = torch.zeros(B, dtype=torch.int64, device=dev)
    ke = torch.full_like(ks, L)
    kw = dict(topk_fraction=frac, topk_floor=args.topk_floor, tile_size=T)
    point = {"batch": B, "context": L, "topk_fraction": frac, "topk_floor": args.topk_floor, "tile_size": T,
             "heads": Hq, "kv_heads": Hkv, "head_dim": D, "dtype": dtype_name}
    if not args.no_check:
        chk = _check_small(q, k, v, kw, None) if L <= args.check_max_context else _check_sampled(q, k, v, kw, None)
        point["check"] = chk
        if not chk["ok"]:
            print(f"CHECK FAILED at {point}: {chk}", file=sys.stderr)
    w, r = args.warmup, args.rep
    dense_ms = {}
    bl = comma_list(str)(args.baselines)
    if "cudnn" in bl or "flash" in bl:
        G = Hq // Hkv
        ke_x, ve_x = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            if name not in bl:
                continue
            try:
                with sdpa_kernel(backend):
                    fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, ke_x, ve_x, is_causal=True)  # noqa: E731
                    fn()
                    dense_ms[f"sdpa_{name}"] = _bench(fn, w, r)
            except RuntimeError as exc:
                point.setdefault("baseline_errors", {})[name] = str(exc)[:200]
        del ke_x, ve_x
    if "triton" in bl:
        dense_ms["triton_dense"] = _bench(lambda: P.dense(q, k, v, ks, ke), w, r)
    best_name = min(dense_ms, key=dense_ms.get)
    best = dense_ms[best_name]
    _, idx = P.anchor(q, k, v, ks, ke, dense_output=False, **kw)
    ms = {
        "layer0": _bench(lambda: P.anchor(q, k, v, ks, ke, dense_output=True, **kw), w, r),
        "anchor": _bench(lambda: P.anchor(q, k, v, ks, ke, dense_output=False, **kw), w, r),
        "reuse": _bench(lambda: P.sparse(q, k, v, idx, ks, ke, indices_from_anchor=True, **kw), w, r),
    }
    # Where the anchor's time goes: the log-sum-exp pass, pooling + selection, the sparse pass.
    G = Hq // Hkv
    _, lse = P._flash(q, k, v, ks, ke, None, with_v=False, store_lse=True, pad_rows=False)
    n_tiles = idx.shape[2]
    budgets = P._tile_budgets(n_tiles, T, frac, args.topk_floor, q.device)
    host = P._tile_budgets_host(n_tiles, T, frac, args.topk_floor)
    lo = P._first_sparse_tile(host)
    ms_parts = {
        "lse_pass": _bench(lambda: P._flash(q, k, v, ks, ke, None, with_v=False, store_lse=True, pad_rows=False), w, r),
        "dense_lse_pass": _bench(lambda: P._flash(q, k, v, ks, ke, None, with_v=True, store_lse=True, pad_rows=False), w, r),
    }
    if lo < n_tiles:
        sel = lambda st, buf=None, cfg=P.DEFAULT_CONFIG: P._select(  # noqa: E731
            q, k, lse, idx, budgets, ks, ke, G, T, lo, n_tiles, None, stages=st, pooled=buf, config=cfg)
        buf = sel(("pool",))
        ms_parts["pool_select"] = _bench(lambda: sel(("pool", "select"), buf), w, r)
        ms_parts["pool"] = _bench(lambda: sel(("pool",), buf), w, r)
        ms_parts["select"] = _bench(lambda: sel(("select",), buf), w, r)
        if args.tune:
            slots = torch.arange(idx.shape[3], device=q.device, dtype=torch.int32)
            idx_c = torch.where(idx >= 0, slots.expand_as(idx), -1).contiguous()
            point["tune_ms"] = _tune({
                "reuse": lambda cfg: P.sparse(q, k, v, idx, ks, ke, indices_from_anchor=True, config=cfg, **kw),
                "reuse_contiguous": lambda cfg: P.sparse(q, k, v, idx_c, ks, ke, indices_from_anchor=True,
                                                         config=cfg, **kw),
                "lse": lambda cfg: P._flash(q, k, v, ks, ke, None, with_v=False, store_lse=True, pad_rows=False,
                                            config=cfg),
                "pool": lambda cfg: sel(("pool",), buf, cfg),
            }, w, r)
            del idx_c
        del buf
    point["anchor_parts_ms"] = ms_parts
    del idx, lse
    A, NL = args.anchors, args.layers
    model = (ms["layer0"] + (A - 1) * ms["anchor"] + (NL - A) * ms["reuse"]) / NL
    dense_flop = 4.0 * B * Hq * D * _causal_pairs(L)
    sparse_flop = 4.0 * B * Hq * D * _sparse_pairs(L, T, frac, args.topk_floor)
    point.update({
        "dense_ms": dense_ms, "best_dense": best_name, "best_dense_ms": best, "kascade_ms": ms,
        "ratio_to_dense": {name: t / best for name, t in ms.items()},
        "model_layer_ms": model, "model_speedup": best / model,
        "tflops": {**{n: dense_flop / t / 1e9 for n, t in dense_ms.items()},
                   "reuse": sparse_flop / ms["reuse"] / 1e9},
        "sparse_flop_fraction": sparse_flop / dense_flop,
    })
    return point


def _v(n, s, w, **extra) -> tuple[str, dict]:
    """A tuning variant of one kernel: (name, {PrefillConfig field suffix: value})."""
    name = f"n{n}_s{s}_w{w}" + "".join(f"_{k}{v}" for k, v in extra.items() if v is not None)
    return name, dict(block_n=n, stages=s, warps=w, **extra)


# PrefillConfig fields <prefix>_<suffix> per kernel. rows_per_program 64: two programs per tile x group
# (M = 64 rows).
TUNE_VARIANTS = {
    "reuse": ("sparse", dict([
        _v(64, 2, 4, maxnreg=None), _v(64, 2, 8, maxnreg=None),
        # 8 warps capped at 128 registers: two programs (four warpgroups) per SM instead of one; at
        # BLOCK_N 64 ptxas then serialises the wgmma chain, at BLOCK_N 32 it does not
        _v(64, 2, 8, maxnreg=128), _v(32, 2, 8, maxnreg=128), _v(32, 3, 8, maxnreg=128),
        _v(64, 1, 8, maxnreg=128), _v(64, 2, 4, rows_per_program=64, maxnreg=None),
    ])),
    # the same kernel over the first k keys of each tile (contiguous, L2-friendly): the gather's cost
    "reuse_contiguous": ("sparse", dict([_v(64, 2, 4, maxnreg=None), _v(64, 2, 8, maxnreg=128)])),
    "lse": ("lse", dict([_v(128, 2, 8), _v(64, 3, 8), _v(128, 3, 8), _v(64, 2, 4)])),
    "pool": ("pool", dict([_v(64, 3, 4), _v(64, 2, 4), _v(64, 3, 8), _v(64, 2, 8), _v(128, 2, 8), _v(32, 3, 4)])),
}


def _tune(fns: dict, w, r) -> dict:
    """Time each kernel with a few launch variants (block size, stages, warps, ...): fns[name](config)
    runs the kernel with a kascade.ops.prefill.PrefillConfig."""
    import dataclasses

    from ..ops import prefill as P

    res = {}
    for name, fn in fns.items():
        prefix, variants = TUNE_VARIANTS[name]
        res[name] = {}
        first = fn(P.DEFAULT_CONFIG)  # defaults: each variant's tensor output must match it
        for key, var in variants.items():
            try:  # unset knobs keep their default
                cfg = dataclasses.replace(P.DEFAULT_CONFIG, **{f"{prefix}_{k}": val for k, val in var.items()})
                got = fn(cfg)
                if isinstance(first, torch.Tensor) and isinstance(got, torch.Tensor):
                    err = _rel(got, first)
                    res.setdefault(f"{name}_rel_err_vs_default", {})[key] = err
                    if not err < 2e-2:
                        raise RuntimeError(f"output differs from the default's: rel err {err:.3g}")
                res[name][key] = _bench(lambda: fn(cfg), w, r)
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: record and go on
                res[name][key] = str(exc)[:120]
    return res


def _table(points: list[dict]) -> str:
    head = (f"{'B':>2} {'ctx':>7} {'frac':>5} {'T':>3} {'geom':>9} {'dtype':>5} | {'best dense':>16} | "
            f"{'layer0':>8} {'anchor':>8} {'reuse':>8} | {'l0/d':>5} {'anc/d':>5} {'reu/d':>5} | "
            f"{'model':>8} {'speedup':>7} | {'dense TF/s':>10} {'reuse TF/s':>10} check")
    lines = [head, "-" * len(head)]
    for p in points:
        ms, rt = p["kascade_ms"], p["ratio_to_dense"]
        chk = p.get("check", {}).get("ok")
        lines.append(
            f"{p['batch']:>2} {p['context']:>7} {p['topk_fraction']:>5.2f} {p['tile_size']:>3} "
            f"{p['heads']:>3}/{p['kv_heads']}/{p['head_dim']:<3} {p['dtype']:>5} | "
            f"{p['best_dense']:>11} {p['best_dense_ms']:>8.3f} | {ms['layer0']:>8.3f} {ms['anchor']:>8.3f} "
            f"{ms['reuse']:>8.3f} | {rt['layer0']:>5.2f} {rt['anchor']:>5.2f} {rt['reuse']:>5.3f} | "
            f"{p['model_layer_ms']:>8.3f} {p['model_speedup']:>6.2f}x | "
            f"{p['tflops'][p['best_dense']]:>10.0f} {p['tflops']['reuse']:>10.0f} "
            f"{'-' if chk is None else ('ok' if chk else 'FAIL')}")
    return "\n".join(lines)


def plot_speedup(points: list[dict], path: str) -> str:
    """Whole-model speedup against context, one line per (Top-k, tile, geometry)."""
    return plot(points, "context", ["model_speedup"], path,
                group=lambda p: f"top-k {p['topk_fraction']:.0%}, T={p['tile_size']}, {p['heads']}/{p['kv_heads']}",
                ylabel="whole-model attention speedup vs best dense")


def run(args) -> int:
    if not torch.cuda.is_available():
        print("kascade bench prefill needs a CUDA GPU", file=sys.stderr)
        return 2
    points = []
    ints, floats, strs = comma_list(int), comma_list(float), comma_list(str)
    grid = itertools.product(ints(args.batch), ints(args.context), floats(args.topk_fraction), ints(args.tile_size),
                             zip_geometries(args.heads, args.kv_heads), ints(args.head_dim), strs(args.dtype))
    failed = False
    for B, L, frac, T, (Hq, Hkv), D, dt in grid:
        t0 = time.time()
        p = _run_point(args, B, L, frac, T, Hq, Hkv, D, dt)
        p["wall_s"] = time.time() - t0
        points.append(p)
        failed |= p.get("check", {}).get("ok") is False
        print(_table([p]).splitlines()[-1], flush=True)
        torch.cuda.empty_cache()
    doc = {"bench": "prefill", "env": env_info(), "argv": sys.argv[1:], "args": vars(args).copy(), "points": points}
    doc["args"].pop("func", None)
    path = args.json or os.path.join("benchmarks", "results", f"prefill_{time.strftime('%Y%m%d_%H%M%S')}.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    if args.plot:
        plot_speedup(points, args.plot)
    print()
    print(_table(points))
    print(path)
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kascade bench prefill", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
