"""Rolling prefill on a contiguous cache vs vLLM's paged cache, whole and in vLLM-style chunks, bf16, GPU.

    PYTHONPATH=src python benchmarks/tune/bench_paged_prefill.py [--context 32768,131072] [--chunk 16384]
        [--block-size 16] [--json out.json]

Why: in vLLM the Kascade backend's time to first token at 128K is 1.60x FLASH_ATTN's while the same kernels
give 1.88x in kascade.Generator (issue 16). This splits one Llama-3.1-8B-shape layer (32/8/128, one
sequence, Top-k 10 %, floor 128, tiles of 32) into what each path runs:
- contiguous: kascade.ops.prefill (layer 0 = anchor with the dense output on cuDNN, anchor, reuse), one pass;
- contiguous chunked: the same kernels on the chunks vLLM schedules (the like-for-like reference of the
  paged chunked rows: layer 0 cannot take cuDNN there, its queries are a suffix of the keys);
- paged whole: kascade.ops.paged on a block table (--table, paged_tables.block_table), the whole prompt as
  one chunk;
- paged chunked: the same prompt as vLLM schedules it, chunks of --chunk queries over their prefix
  (the sum over chunks);
- paged gather: the pages copied into contiguous K/V (one copy per layer) + the contiguous kernels;
- paged gathered (whole, chunked): kascade.ops.paged with gather_kv=True (each call copies its prefix
  out of the pages, the varlen kernels read the copy without the block table), the copy included;
- dense: torch SDPA cuDNN (contiguous) and, where vLLM is importable, vLLM's FlashAttention 3 on the paged
  cache (whole and chunked), the baseline of `kascade bench serve`;
- layer0_fa3_chunked: layer 0 as the vLLM backend runs it, FA3's output and log-sum-exp per chunk, then
  only the selection over the gathered K;
- reuse_physical (paged rows): reuse layers reading the anchor's indices translated once to cache rows
  (physical_indices: that translation), no block-table read per key;
- backend_model: the 32 layers as the vLLM backend runs them in chunks (FA3 layer 0, gathered anchors,
  physical reuse).
Each part is the median of eager calls (ms; kascade.bench.common.bench_ms without a CUDA graph: the prefill
ops read host sizes). "model" sums a 32-layer model with 5 anchors (layer 0 + 4) and 27 reuse layers.
"""

from __future__ import annotations

import argparse
import json

import torch

from paged_tables import TABLES, block_table  # same folder

from kascade.bench.common import bench_ms, env_info, write_results
from kascade.ops import paged as P
from kascade.ops import prefill as PF

HQ, HKV, D, T = 32, 8, 128, 32
BUDGET = dict(topk_fraction=0.1, topk_floor=128)
N_LAYERS, N_ANCHORS = 32, 5
DEVICE, DTYPE = "cuda", torch.bfloat16  # a CPU smoke test (Triton interpreter) patches these


def _ms(fn, reps):
    return bench_ms(fn, use_graph=False, flush_l2=False, budget_ms=1.0, min_reps=reps, max_reps=reps)


def _model(parts):
    return parts["layer0"] + (N_ANCHORS - 1) * parts["anchor"] + (N_LAYERS - N_ANCHORS) * parts["reuse"]


def _fa3():
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except Exception as exc:  # noqa: BLE001 - vLLM is optional here
        print(f"no vLLM FlashAttention: {exc}", flush=True)
        return None
    return flash_attn_varlen_func


def _layer0_fa3(fa3, parts, kc, vc, bt, reps):
    """Layer 0 as the backend runs it in chunks (integrations/vllm.attend with layer0_dense): FA3's dense
    output (into the step's output rows) and log-sum-exp on the pages, then only the selection over the
    gathered K (paged_prefill_anchor with dense= and gather_kv=True). ms, and the share of (KV head, tile)
    index rows identical to those of the call's own flash pass (rows hold ascending positions, so one
    near-tie swap changes its whole row: the two log-sum-exps differ in the last bits)."""
    outs = [torch.empty_like(qc) for qc, *_ in parts]

    def run(own):
        got = []
        for (qc, sl, qsl, mq, ms), out in zip(parts, outs):
            dense = None
            if not own:
                _, lse = fa3(qc, kc, vc, out=out, max_seqlen_q=mq, cu_seqlens_q=qsl, max_seqlen_k=ms, seqused_k=sl,
                             causal=True, softmax_scale=D ** -0.5, block_table=bt, fa_version=3,
                             return_softmax_lse=True)
                dense = (out, lse)
            got.append(P.paged_prefill_anchor(qc, kc, vc, bt, sl, qsl, max_query_len=mq, max_seq_len=ms,
                                              tile_size=T, dense_output=True, dense=dense, gather_kv=True,
                                              **BUDGET)[1])
        return got

    ms = _ms(lambda: run(False), reps)
    same = [float((a == b).all(dim=-1).float().mean()) for a, b in zip(run(False), run(True))]
    return dict(layer0=ms, rows_identical=min(same))


class ContiguousChunks:
    """The contiguous kernels on the chunks vLLM schedules (each chunk's queries are the last of its keys
    0 .. hi - 1), with each chunk's anchor indices: the like-for-like reference of the paged chunked rows."""

    def __init__(self, q, k, v, L, C):
        self.spans = [(lo, min(L, lo + C)) for lo in range(0, L, C)]
        zero = torch.zeros(1, dtype=torch.int64, device=q.device)
        ends = [torch.full((1,), hi, dtype=torch.int64, device=q.device) for _, hi in self.spans]
        self.kw = dict(**BUDGET, tile_size=T)
        self.args = [(q[:, :, lo:hi], k[:, :, :hi], v[:, :, :hi], zero, e) for (lo, hi), e in zip(self.spans, ends)]
        self.held = [PF.anchor(*a, lengths=[hi], **self.kw)[1] for a, (_, hi) in zip(self.args, self.spans)]

    def layer(self, dense_output, anchor=True):
        """One layer over all chunks: an anchor (layer 0 with dense_output) or a reuse layer."""
        for a, (_, hi), idx in zip(self.args, self.spans, self.held):
            if anchor:
                PF.anchor(*a, dense_output=dense_output, lengths=[hi], **self.kw)
            else:
                PF.sparse(*a[:3], idx, *a[3:], indices_from_anchor=True, lengths=[hi], **self.kw)


def _contiguous_chunked(q, k, v, L, C, reps):
    """ContiguousChunks timed per part (chunking itself costs: smaller grids, each chunk's own prefix pass)."""
    c = ContiguousChunks(q, k, v, L, C)
    got = dict(layer0=_ms(lambda: c.layer(True), reps), anchor=_ms(lambda: c.layer(False), reps),
               reuse=_ms(lambda: c.layer(False, anchor=False), reps))
    return {**got, "model": _model(got)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", default="32768,131072")
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--table", choices=TABLES, default="random", help="block table order (block_table)")
    ap.add_argument("--json")
    args = ap.parse_args()
    bs, C = args.block_size, args.chunk
    fa3 = _fa3()
    rows = []
    for L in (int(x) for x in args.context.split(",")):
        torch.manual_seed(0)
        dev, dt = DEVICE, DTYPE
        q = torch.randn(1, HQ, L, D, device=dev, dtype=dt)
        k = torch.randn(1, HKV, L, D, device=dev, dtype=dt)
        v = torch.randn_like(k)
        zero = torch.zeros(1, dtype=torch.int64, device=dev)
        end = torch.full((1,), L, dtype=torch.int64, device=dev)
        kw = dict(**BUDGET, tile_size=T, lengths=[L])
        res = dict(context=L, chunk=C, block_size=bs, table=args.table)

        # contiguous, one pass (what kascade.Generator runs)
        _, idx = PF.anchor(q, k, v, zero, end, **kw)
        cont = dict(
            layer0=_ms(lambda: PF.anchor(q, k, v, zero, end, dense_output=True, **kw), args.reps),
            anchor=_ms(lambda: PF.anchor(q, k, v, zero, end, **kw), args.reps),
            reuse=_ms(lambda: PF.sparse(q, k, v, idx, zero, end, indices_from_anchor=True, **kw), args.reps))
        res["contiguous"] = {**cont, "model": _model(cont)}
        if C < L:
            res["contiguous_chunked"] = _contiguous_chunked(q, k, v, L, C, args.reps)
        res["dense_cudnn"] = _ms(lambda: PF.dense_fastest(q, k, v, zero, end, [L]), args.reps)
        del idx

        # the paged cache: a block table (--table) over exactly the prompt's blocks
        nb = L // bs
        bt = block_table(nb, args.table, dev)
        kc = torch.empty(nb, bs, HKV, D, device=dev, dtype=dt)
        vc = torch.empty_like(kc)
        kc[bt[0].long()] = k[0].view(HKV, nb, bs, D).permute(1, 2, 0, 3)
        vc[bt[0].long()] = v[0].view(HKV, nb, bs, D).permute(1, 2, 0, 3)
        qp = q[0].transpose(0, 1).contiguous()  # [L, Hq, D]
        del q, k, v
        torch.cuda.empty_cache()

        def chunks(size):
            """(q rows, seq_lens, query_start_loc, max_query_len, max_seq_len) per chunk of `size` queries."""
            out = []
            for lo in range(0, L, size):
                hi = min(L, lo + size)
                out.append((qp[lo:hi], torch.tensor([hi], dtype=torch.int32, device=dev),
                            torch.tensor([0, hi - lo], dtype=torch.int32, device=dev), hi - lo, hi))
            return out

        # the fix to try: copy the pages into contiguous K/V once per layer, then run the contiguous kernels
        # (model row: the contiguous parts plus one copy each; whole prompt only, chunking cost nothing above)
        res["gather_kv"] = _ms(lambda: P.gather_kv(kc, vc, bt, L), args.reps)
        g = {part: ms + res["gather_kv"] for part, ms in cont.items()}
        res["paged_gather"] = {**g, "model": _model(g)}

        for name, size, gkv in (("paged_whole", L, False), ("paged_chunked", C, False),
                                ("paged_gathered_whole", L, True), ("paged_gathered_chunked", C, True)):
            parts = chunks(size)
            held = [P.paged_prefill_anchor(qc, kc, vc, bt, sl, qsl, max_query_len=mq, max_seq_len=ms, tile_size=T,
                                           **BUDGET)[1] for qc, sl, qsl, mq, ms in parts]

            def layer(dense_output, anchor=True):
                for i, (qc, sl, qsl, mq, ms) in enumerate(parts):
                    if anchor:
                        P.paged_prefill_anchor(qc, kc, vc, bt, sl, qsl, max_query_len=mq, max_seq_len=ms,
                                               tile_size=T, dense_output=dense_output, gather_kv=gkv, **BUDGET)
                    else:
                        P.paged_prefill_sparse(qc, kc, vc, bt, sl, qsl, held[i], max_query_len=mq, max_seq_len=ms,
                                               tile_size=T, gather_kv=gkv, **BUDGET)

            got = dict(layer0=_ms(lambda: layer(True), args.reps), anchor=_ms(lambda: layer(False), args.reps),
                       reuse=_ms(lambda: layer(False, anchor=False), args.reps))
            res[name] = {**got, "model": _model(got)}
            if not gkv:  # reuse reading the anchor's indices translated once to cache rows (the backend's)
                phys = [P.paged_physical_indices(h, bt, sl, bs) for h, (qc, sl, *_) in zip(held, parts)]
                res[name]["physical_indices"] = _ms(
                    lambda: [P.paged_physical_indices(h, bt, sl, bs) for h, (qc, sl, *_) in zip(held, parts)],
                    args.reps)
                res[name]["reuse_physical"] = _ms(lambda: [
                    P.paged_prefill_sparse(qc, kc, vc, bt, sl, qsl, p, max_query_len=mq, max_seq_len=ms, tile_size=T,
                                           physical=True, **BUDGET) for p, (qc, sl, qsl, mq, ms) in zip(phys, parts)],
                    args.reps)
                del phys
            if fa3 is not None and not gkv:
                def dense(lse=False):
                    for qc, sl, qsl, mq, ms in parts:
                        fa3(qc, kc, vc, max_seqlen_q=mq, cu_seqlens_q=qsl, max_seqlen_k=ms, seqused_k=sl,
                            causal=True, softmax_scale=D ** -0.5, block_table=bt, fa_version=3,
                            return_softmax_lse=lse)
                try:
                    res["fa3_" + name.split("_")[1]] = _ms(dense, args.reps)
                    # layer 0's dense output and log-sum-exp from FA3 (a candidate for the backend's layer 0)
                    res["fa3_lse_" + name.split("_")[1]] = _ms(lambda: dense(True), args.reps)
                    if name == "paged_chunked":
                        res["layer0_fa3_chunked"] = _layer0_fa3(fa3, parts, kc, vc, bt, args.reps)
                except Exception as exc:  # noqa: BLE001 - report and go on
                    print(f"FA3 failed: {exc!r}", flush=True)
            del held
        res["dense_fa3_model"] = N_LAYERS * res.get("fa3_chunked", float("nan"))
        if "layer0_fa3_chunked" in res:  # what the vLLM backend runs per prompt: all parts chunked
            ch, gch = res["paged_chunked"], res["paged_gathered_chunked"]
            res["backend_model"] = (res["layer0_fa3_chunked"]["layer0"] + (N_ANCHORS - 1) * gch["anchor"]
                                    + N_ANCHORS * ch["physical_indices"]
                                    + (N_LAYERS - N_ANCHORS) * ch["reuse_physical"])
        print(json.dumps(res), flush=True)
        rows.append(res)
        del kc, vc, qp
        torch.cuda.empty_cache()
    if args.json:
        write_results(args.json, rows, dict(bench="paged_prefill", env=env_info(), args=vars(args), unit="ms",
                                            layers=N_LAYERS, anchors=N_ANCHORS))


if __name__ == "__main__":
    main()
