#!/usr/bin/env bash
# On the GPU machine (device tool), from the repo root: decode GPU tests, a launch-settings sweep, and the
# decode benchmark. Results land in $OUT (or benchmarks/results when OUT is unset).
#   bash scripts/gpu_decode.sh [tests|tune|bench|final|all]...   (several modes run in order)
set -uo pipefail
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,memory.used --format=csv,noheader
for what in "${@:-all}"; do
case $what in
tests|all)
  python -m pytest -q -x tests/gpu/test_decode_gpu.py 2>&1 | tail -15 ;;&
tune|all)
  python - <<'PY' 2>&1 | tee "$OUT/decode_tune.log"
import dataclasses, math, torch, itertools
from kascade.ops import decode as K
from kascade.bench.common import bench_ms
dev = "cuda"
def inputs(B, L, Hq=32, Hkv=8, D=128):
    q = torch.randn(B, Hq, 1, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, L, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(B, Hkv, L, D, device=dev, dtype=torch.bfloat16)
    return q, k, v, torch.zeros(B, dtype=torch.int64, device=dev), torch.full((B,), L, dtype=torch.int64, device=dev)
def cfg(**kw): return dataclasses.replace(K.DEFAULT_CONFIG, **kw)
def t(fn): return bench_ms(fn, budget_ms=100)
from torch.profiler import profile, ProfilerActivity
for B, L in [(64, 131072), (1, 131072)]:
    q, k, v, ks, ke = inputs(B, L)
    kvb = 2 * k.numel() * 2
    _, idx = K.anchor(q, k, v, ks, ke, topk_fraction=0.1, topk_floor=128)
    sb = 2 * q.shape[0] * k.shape[1] * idx.shape[-1] * 128 * 2
    print(f"== B={B} L={L}", flush=True)
    sc, m, l, _, n = K._split_pass(q, k, v, ks, ke, None, True, False)
    # (the radix digits are the selection's tie rule, kernels/topk.py: not swept)
    for blk, nw, pps in [(2048, 8, 8), (4096, 8, 8), (1024, 4, 8), (2048, 8, 2), (2048, 8, 16)]:
        c = cfg(select_block=blk, select_num_warps=nw, select_programs_per_sm=pps)
        ts = t(lambda: K.select(sc, m, l, n, ks, ke, Hkv=8, topk_fraction=0.1, topk_floor=128, config=c))
        print(f"select blk={blk} nw={nw} pps={pps}: {ts:.4f} ms", flush=True)
    for mc, bn, ns, pps in [(128, 64, 3, 4), (512, 64, 3, 4), (64, 64, 3, 4), (128, 32, 3, 4), (128, 64, 2, 8), (128, 32, 4, 8)]:
        c = cfg(sparse_min_chunk=mc, sparse_block_n=bn, sparse_num_stages=ns, programs_per_sm=pps)
        tr = t(lambda: K.sparse(q, k, v, idx, ks, ke, config=c))
        tf = t(lambda: K.sparse(q, k, v, idx, ks, ke, scores=sc, config=c))
        print(f"sparse min_chunk={mc} bn={bn} ns={ns} pps={pps}: {tr:.4f} ms ({sb/tr/1e9:.2f} TB/s) from scores {tf:.4f}", flush=True)
    for fm in (16, 0):
        c = cfg(fuse_max_splits=fm)
        tr = t(lambda: K.sparse(q, k, v, idx, ks, ke, config=c))
        td = t(lambda: K.dense(q, k, v, ks, ke, config=c))
        ta = t(lambda: K.anchor(q, k, v, ks, ke, topk_fraction=0.1, topk_floor=128, config=c))
        t0 = t(lambda: K.anchor(q, k, v, ks, ke, topk_fraction=0.1, topk_floor=128, dense_output=True, config=c))
        print(f"fuse_max_splits={fm}: reuse {tr:.4f} ({sb/tr/1e9:.2f} TB/s) dense {td:.4f} ({kvb/td/1e9:.2f} TB/s) anchor {ta:.4f} layer0 {t0:.4f}", flush=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            K.anchor(q, k, v, ks, ke, topk_fraction=0.1, topk_floor=128)
            K.anchor(q, k, v, ks, ke, topk_fraction=0.1, topk_floor=128, dense_output=True)
            K.sparse(q, k, v, idx, ks, ke)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=9, max_name_column_width=30), flush=True)
    del q, k, v, idx, sc, m, l
    torch.cuda.empty_cache()
PY
  ;;&
bench|all)
  python -m kascade.cli bench decode --context 8192,32768,131072 --batch 64 --topk-fraction 0.1 \
    --heads 32,16 --kv-heads 8,2 --budget-ms 200 --json "$OUT/decode_b64.json"
  python -m kascade.cli bench decode --context 131072 --batch 1 --topk-fraction 0.1 \
    --heads 32,16 --kv-heads 8,2 --budget-ms 200 --json "$OUT/decode_b1.json" ;;
final)
  python -m kascade.cli bench decode --context 8192,32768,131072 --batch 64 --topk-fraction 0.1,0.2,0.3 \
    --heads 32,16 --kv-heads 8,2 --budget-ms 200 --json "$OUT/decode_b64.json" --plot "$OUT/decode_b64.png"
  python -m kascade.cli bench decode --context 131072 --batch 1 --topk-fraction 0.1,0.2,0.3 \
    --heads 32,16 --kv-heads 8,2 --budget-ms 200 --json "$OUT/decode_b1.json" ;;
esac
done
