"""Decode kernels on a contiguous cache vs a vLLM paged cache (block table order --table), bf16, GPU.

    PYTHONPATH=src python benchmarks/tune/bench_paged.py [--contig-only] [--block-size 16] [--table random]
        [--json out.json]

--contig-only times only the contiguous ops (runs on a checkout without kascade.ops.paged: the baseline
of the contiguous path before the PAGED constexpr was added). Times: median ms (CUDA graph, L2 flushed;
kascade.bench.common.bench_ms).
"""

from __future__ import annotations

import argparse
import json

import torch

from paged_tables import TABLES, block_table  # same folder

from kascade.bench.common import bench_ms
from kascade.ops import decode as D

POINTS = [(1, 32768), (8, 32768), (32, 8192), (1, 131072)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contig-only", action="store_true")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--table", choices=TABLES, default="random", help="block table order (block_table)")
    ap.add_argument("--json")
    args = ap.parse_args()
    Hq, Hkv, Dh, bs = 32, 8, 128, args.block_size
    kw = dict(topk_fraction=0.1, topk_floor=128)
    rows = []
    for B, L in POINTS:
        torch.manual_seed(0)
        q = torch.randn(B, Hq, 1, Dh, device="cuda", dtype=torch.bfloat16) * 3
        k = torch.randn(B, Hkv, L, Dh, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        starts = torch.zeros(B, dtype=torch.int64, device="cuda")
        ends = torch.full((B,), L, dtype=torch.int64, device="cuda")
        _, idx = D.anchor(q, k, v, starts, ends, **kw)
        res = dict(B=B, L=L, block_size=bs, table=args.table)
        res["contig_dense"] = bench_ms(lambda: D.dense(q, k, v, starts, ends))
        res["contig_anchor"] = bench_ms(lambda: D.anchor(q, k, v, starts, ends, **kw))
        res["contig_sparse"] = bench_ms(lambda: D.sparse(q, k, v, idx, starts, ends))
        if not args.contig_only:
            from kascade.ops import paged as P

            nb = B * L // bs
            bt = block_table(nb, args.table, "cuda").view(B, L // bs)
            kc = torch.empty(nb, bs, Hkv, Dh, device="cuda", dtype=torch.bfloat16)
            vc = torch.empty_like(kc)
            kc[bt.long()] = k.view(B, Hkv, L // bs, bs, Dh).permute(0, 2, 3, 1, 4)
            vc[bt.long()] = v.view(B, Hkv, L // bs, bs, Dh).permute(0, 2, 3, 1, 4)
            lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
            q3 = q[:, :, 0].contiguous()
            out_p, idx_p = P.paged_decode_anchor(q3, kc, vc, bt, lens, **kw)
            assert torch.equal(idx_p, idx), "paged and contiguous anchors differ"
            res["paged_dense"] = bench_ms(lambda: P.paged_decode_dense(q3, kc, vc, bt, lens))
            res["paged_anchor"] = bench_ms(lambda: P.paged_decode_anchor(q3, kc, vc, bt, lens, **kw))
            res["paged_sparse"] = bench_ms(lambda: P.paged_decode_sparse(q3, kc, vc, bt, lens, idx_p))
            # reuse over cache rows translated once per anchor (what the vLLM backend runs)
            phys = P.paged_physical_indices(idx_p, bt, lens, bs)
            out_l = P.paged_decode_sparse(q3, kc, vc, bt, lens, idx_p)
            out_f = P.paged_decode_sparse(q3, kc, vc, bt, lens, phys, physical=True)
            assert torch.equal(out_l, out_f), "physical and logical reuse differ"
            res["paged_sparse_physical"] = bench_ms(
                lambda: P.paged_decode_sparse(q3, kc, vc, bt, lens, phys, physical=True))
            res["paged_physical_indices"] = bench_ms(lambda: P.paged_physical_indices(idx_p, bt, lens, bs))
            del kc, vc
        print(json.dumps({key: (round(val * 1000, 1) if isinstance(val, float) else val)
                          for key, val in res.items()}), flush=True)
        rows.append(res)
        del q, k, v
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), unit="ms", rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
