"""Decode kernels on rows shorter than the cache: a cache (or vLLM engine) sized for 128K serving 32K rows,
against a cache sized for the rows themselves. The grid is sized from the capacity (fixed when a CUDA
graph is captured); each row cuts its own length over it, so both should take about the same time.

    PYTHONPATH=src python benchmarks/tune/bench_capacity.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from kascade.bench.common import bench_ms
from kascade.ops import decode as D

POINTS = [(1, 32768, 131072), (3, 32768, 131072), (8, 8192, 131072)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    Hq, Hkv, Dh = 32, 8, 128
    kw = dict(topk_fraction=0.1, topk_floor=128)
    rows = []
    for B, L, cap in POINTS:
        res = dict(B=B, length=L, capacity=cap)
        for name, size in (("fit", L), ("wide", cap)):
            torch.manual_seed(0)
            q = torch.randn(B, Hq, 1, Dh, device="cuda", dtype=torch.bfloat16) * 3
            k = torch.randn(B, Hkv, size, Dh, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            starts = torch.zeros(B, dtype=torch.int64, device="cuda")
            ends = torch.full((B,), L, dtype=torch.int64, device="cuda")
            _, idx = D.anchor(q, k, v, starts, ends, **kw)
            res[f"{name}_dense"] = bench_ms(lambda: D.dense(q, k, v, starts, ends))
            res[f"{name}_anchor"] = bench_ms(lambda: D.anchor(q, k, v, starts, ends, **kw))
            res[f"{name}_layer0"] = bench_ms(lambda: D.anchor(q, k, v, starts, ends, dense_output=True, **kw))
            res[f"{name}_reuse"] = bench_ms(lambda: D.sparse(q, k, v, idx, starts, ends, budget=(0.1, 128)))
            del q, k, v, idx
            torch.cuda.empty_cache()
        print(json.dumps({key: (round(val * 1000, 1) if isinstance(val, float) else val)
                          for key, val in res.items()}), flush=True)
        rows.append(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), unit="ms", rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
