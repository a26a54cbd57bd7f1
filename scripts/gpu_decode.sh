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
import math, torch, itertools
from kascade.ops import decode as K
from kascade.bench.common import bench_ms
dev = "cuda"
def inputs(B, L, Hq=32, Hkv=8, D=128):
    q = torch.randn(B, Hq, 1, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, L, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(B, Hkv, L, D, device=dev, dtype=torch.bfloat16)
    return q, k, v, torch.zeros(B, dtype=torch.int64, device=dev), torch.full((B,), L, dtype=torch.int64, device=dev)
base = dict(K.TUNING)
for B, L in [(64, 32768), (1, 131072)]:
    q, k, v, ks, ke = inputs(B, L)
    kvb = 2 * k.numel() * 2
    _, idx = K.anchor(q, k, v, ks, ke, topk_fraction=0.1, topk_floor=128)
    print(f"== B={B} L={L}", flush=True)
    for bn, nw, ns, pps in [(64, 4, 3, 4), (32, 4, 3, 4), (128, 4, 3, 4), (64, 8, 3, 4), (64, 4, 4, 4), (64, 4, 2, 4),
                            (128, 8, 3, 4), (64, 4, 3, 2), (64, 4, 3, 8), (32, 2, 4, 4), (64, 2, 4, 8)]:
        K.TUNING.update(base, block_n=bn, num_warps=nw, num_stages=ns, programs_per_sm=pps)
        try:
            t = bench_ms(lambda: K.dense(q, k, v, ks, ke), budget_ms=150)
            ts = bench_ms(lambda: K._split_pass(q, k, v, ks, ke, None, True, False), budget_ms=150)
            print(f"dense bn={bn} nw={nw} ns={ns} pps={pps}: {t:.4f} ms {kvb/t/1e9:.2f} TB/s | scores {ts:.4f} ms {kvb/2/ts/1e9:.2f} TB/s", flush=True)
        except Exception as e:
            print("dense fail", bn, nw, ns, pps, repr(e)[:200])
    K.TUNING.update(base)
    kb = idx.shape[-1]
    sb = 2 * q.shape[0] * k.shape[1] * kb * 128 * 2
    for bn, nw, ns, pps in [(64, 4, 3, 4), (32, 4, 3, 4), (128, 4, 3, 4), (64, 8, 3, 4), (64, 4, 2, 4), (64, 4, 4, 4),
                            (32, 2, 3, 4), (64, 4, 3, 8), (64, 4, 3, 2), (32, 4, 4, 8)]:
        K.TUNING.update(base, sparse_block_n=bn, sparse_num_warps=nw, sparse_num_stages=ns, programs_per_sm=pps)
        try:
            t = bench_ms(lambda: K.sparse(q, k, v, idx, ks, ke), budget_ms=150)
            print(f"sparse bn={bn} nw={nw} ns={ns} pps={pps}: {t:.4f} ms {sb/t/1e9:.2f} TB/s", flush=True)
        except Exception as e:
            print("sparse fail", bn, nw, ns, pps, repr(e)[:200])
    K.TUNING.update(base)
    for blk, nw in [(1024, 8), (2048, 8), (1024, 4), (512, 4), (4096, 8)]:
        K.TUNING.update(base, select_block=blk, select_num_warps=nw)
        sc, m, l, _, n = K._split_pass(q, k, v, ks, ke, None, True, False)
        t = bench_ms(lambda: K.select(sc, m, l, n, ks, ke, Hkv=8, topk_fraction=0.1, topk_floor=128), budget_ms=150)
        print(f"select blk={blk} nw={nw}: {t:.4f} ms", flush=True)
    K.TUNING.update(base)
    del q, k, v, idx
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
    --heads 32,16 --kv-heads 8,2 --json "$OUT/decode_b64.json" --plot "$OUT/decode_b64.png"
  python -m kascade.cli bench decode --context 32768,131072 --batch 1 --topk-fraction 0.1,0.2,0.3 \
    --heads 32,16 --kv-heads 8,2 --json "$OUT/decode_b1.json" ;;
esac
done
