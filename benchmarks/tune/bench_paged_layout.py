"""Paged prefill reuse layer by KV-cache layout, bf16, GPU: does the cache layout explain what is left
between the paged and the contiguous reuse kernels (+13 % at 128K in 16K chunks, notes_serve.md session 16)?

    PYTHONPATH=src python benchmarks/tune/bench_paged_layout.py [--context 131072] [--tables random,ordered]
        [--layouts nhd,vllm_nhd,vllm_hnd] [--json out.json]

One Llama-3.1-8B-shape reuse layer (32/8/128, Top-k 10 %, tiles of 32), one sequence in vLLM's 16K chunks,
physical indices (as the vLLM backend runs it), on three layouts of the same keys:
- nhd: separate K and V caches [num_blocks, block_size, Hkv, D];
- vllm_nhd: vLLM's FlashAttention default, one [num_blocks, 2, block_size, Hkv, D] tensor (K and V of a
  block side by side; a head's consecutive keys Hkv * D apart);
- vllm_hnd: vLLM's HND stride order, [num_blocks, 2, Hkv, block_size, D] in memory (a head's keys of a
  block adjacent), seen as [num_blocks, 2, block_size, Hkv, D];
and the contiguous kernels on the same chunks; nhd_launches_only: the nhd kernel launches alone (outputs
preallocated, the launcher's checks and sizes done once). Each layout on each block table order of --tables
(paged_tables.block_table; rows LAYOUT_ORDER, plain LAYOUT for random): do the gathers cost because the
pages are scattered? ms per layer (median of eager calls).
"""

from __future__ import annotations

import argparse
import json

import torch

# same folder: the same layer
from bench_paged_prefill import BUDGET, D, HKV, HQ, T, ContiguousChunks, _ms
from paged_tables import TABLES, block_table

from kascade.bench.common import env_info, write_results
from kascade.ops import paged as P
from kascade.ops import prefill as PF

BS = 16


def _caches(k, v, bt, layout):
    """(k_cache, v_cache) [num_blocks, BS, Hkv, D] views holding k, v [Hkv, L, D] at the blocks of bt."""
    nb = bt.numel()
    if layout == "nhd":
        kc, vc = (torch.empty(nb, BS, HKV, D, device=k.device, dtype=k.dtype) for _ in range(2))
    elif layout == "vllm_nhd":
        kc, vc = torch.empty(nb, 2, BS, HKV, D, device=k.device, dtype=k.dtype).unbind(1)
    else:  # vllm_hnd: memory [nb, 2, Hkv, BS, D]
        kc, vc = torch.empty(nb, 2, HKV, BS, D, device=k.device, dtype=k.dtype).transpose(2, 3).unbind(1)
    rows = bt[0].long()
    kc[rows] = k.view(HKV, nb, BS, D).permute(1, 2, 0, 3)
    vc[rows] = v.view(HKV, nb, BS, D).permute(1, 2, 0, 3)
    return kc, vc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tables", default="random", help=f"comma-separated block table orders, of {TABLES}")
    ap.add_argument("--layouts", default="nhd,vllm_nhd,vllm_hnd")
    ap.add_argument("--json")
    args = ap.parse_args()
    L, C = args.context, args.chunk
    torch.manual_seed(0)
    q = torch.randn(1, HQ, L, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, HKV, L, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    chunks = ContiguousChunks(q, k, v, L, C)
    spans, kw = chunks.spans, chunks.kw
    res = dict(context=L, chunk=C, contiguous_chunked=_ms(lambda: chunks.layer(False, anchor=False), args.reps))
    del chunks
    nb = L // BS
    qp = q[0].transpose(0, 1).contiguous()
    parts = [(qp[lo:hi], torch.tensor([hi], dtype=torch.int32, device="cuda"),
              torch.tensor([0, hi - lo], dtype=torch.int32, device="cuda"), hi - lo, hi) for lo, hi in spans]
    cases = [(t, lay) for t in args.tables.split(",") for lay in args.layouts.split(",")]
    for table, layout in cases:
        bt = block_table(nb, table, "cuda")
        name = layout if table == "random" else f"{layout}_{table}"  # random keeps the session-16 row names
        kc, vc = _caches(k[0], v[0], bt, layout)
        held = [P.paged_physical_indices(
            P.paged_prefill_anchor(qc, kc, vc, bt, sl, qsl, max_query_len=mq, max_seq_len=ms, gather_kv=True, **kw)[1],
            bt, sl, BS) for qc, sl, qsl, mq, ms in parts]
        res[name] = _ms(lambda: [
            P.paged_prefill_sparse(qc, kc, vc, bt, sl, qsl, h, max_query_len=mq, max_seq_len=ms, physical=True, **kw)
            for h, (qc, sl, qsl, mq, ms) in zip(held, parts)], args.reps)
        res[name + "_vs_contiguous"] = res[name] / res["contiguous_chunked"]
        if name == "nhd":  # the kernel launches alone: preallocated outputs, the launchers' host work done once
            launches = []
            for h, (qc, sl, qsl, mq, ms) in zip(held, parts):
                paged, lens, _, _, G, _, kk, vv, _, _, budgets, _ = P._prepare_rolling(
                    qc, kc, vc, bt, sl, qsl, mq, ms, BUDGET["topk_fraction"], BUDGET["topk_floor"], T, False, False)
                launches.append((qc, kk, vv, torch.zeros_like(qc), h, budgets, lens, G, paged))
            res["nhd_launches_only"] = _ms(lambda: [
                PF._launch_sparse(qc, kk, vv, out, h, budgets, lens, lens, G, T, None, paged=paged, physical=True)
                for qc, kk, vv, out, h, budgets, lens, G, paged in launches], args.reps)
            del launches
        del held, kc, vc
        torch.cuda.empty_cache()
    print(json.dumps(res), flush=True)
    if args.json:
        write_results(args.json, [res], {"bench": "paged_layout", "env": env_info()})


if __name__ == "__main__":
    main()
