"""Where an anchor decode layer spends its time, per kernel, at several attention geometries (issue 16:
the anchor at GQA 1-16 and head dims 64 / 128 against a dense layer). On the GPU machine:

    PYTHONPATH=src python benchmarks/tune/anchor_profile.py --json OUT.json

Each geometry runs the dense split-KV decode and the anchor op under torch.profiler; the JSON holds each
kernel's mean device time per call and the ratio of the anchor's total to dense.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import torch

from kascade.bench.decode import random_inputs
from kascade.ops import decode as K

GEOMETRIES = ["32/8/128", "28/4/128", "28/4/64", "16/2/128", "16/2/64", "32/32/128", "32/2/128", "32/2/64",
              "14/2/64"]


def profile(fn, reps: int) -> dict[str, float]:
    """Mean device time per call (us) of each CUDA kernel fn launches."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        if t is None:
            t = e.cuda_time_total
        if t > 0:
            out[e.key[:60]] = out.get(e.key[:60], 0.0) + t / reps
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--geometries", default=",".join(GEOMETRIES))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE",
                    help="a DecodeConfig knob for the anchor (repeatable), e.g. sparse_programs_per_sm=6")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    knobs = {}
    for kv in args.set:
        name, value = kv.split("=", 1)
        knobs[name] = type(getattr(K.DEFAULT_CONFIG, name))(value)
    config = dataclasses.replace(K.DEFAULT_CONFIG, **knobs)
    rows = []
    for geo in args.geometries.split(","):
        Hq, Hkv, D = (int(x) for x in geo.split("/"))
        q, k, v, ks, ke = random_inputs(args.batch, Hq, Hkv, args.context, D, torch.bfloat16, 0)
        scale = 1.0 / math.sqrt(D)
        dense = profile(lambda: K.dense(q, k, v, ks, ke, scale=scale), args.reps)
        anchor = profile(lambda: K.anchor(q, k, v, ks, ke, topk_fraction=0.1, topk_floor=128, scale=scale,
                                          config=config), args.reps)
        d, a = sum(dense.values()), sum(anchor.values())
        row = {"geometry": geo, "context": args.context, "batch": args.batch, "config": knobs, "dense_us": d,
               "anchor_us": a,
               "anchor_over_dense": a / d, "dense_kernels": dense, "anchor_kernels": anchor}
        rows.append(row)
        print(f"{geo:>10}  dense {d:8.1f} us  anchor {a:8.1f} us  = {a / d:.3f}x", flush=True)
        for name, t in sorted(anchor.items(), key=lambda kv: -kv[1]):
            print(f"{'':12}{t:8.1f} us  {t / d:.3f}x  {name}", flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    with open(args.json, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
