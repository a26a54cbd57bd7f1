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
def t(fn): return bench_ms(fn, budget_ms=100)
for B, L in [(64, 131072), (1, 131072)]:
    q, k, v, ks, ke = inputs(B, L)
    kvb = 2 * k.numel() * 2
    _, idx = K.anchor(q, k, v, ks, ke, topk_fraction=0.1, topk_floor=128)
    sb = 2 * q.shape[0] * k.shape[1] * idx.shape[-1] * 128 * 2
    print(f"== B={B} L={L}", flush=True)
    for bn, nw, ns in [(128, 4, 3), (64, 4, 3), (128, 8, 3), (128, 4, 4)]:
        K.TUNING.update(base, block_n=bn, num_warps=nw, num_stages=ns)
        td = t(lambda: K.dense(q, k, v, ks, ke))
        ts = t(lambda: K._split_pass(q, k, v, ks, ke, None, True, False))
        print(f"dense bn={bn} nw={nw} ns={ns}: {td:.4f} ms {kvb/td/1e9:.2f} TB/s | scores {ts:.4f} ms {kvb/2/ts/1e9:.2f} TB/s", flush=True)
    K.TUNING.update(base)
    sc, m, l, _, n = K._split_pass(q, k, v, ks, ke, None, True, False)
    for blk, nw in [(2048, 8), (1024, 4), (2048, 4), (4096, 8), (1024, 8)]:
        K.TUNING.update(base, select_block=blk, select_num_warps=nw)
        ts = t(lambda: K.select(sc, m, l, n, ks, ke, Hkv=8, topk_fraction=0.1, topk_floor=128))
        print(f"select blk={blk} nw={nw}: {ts:.4f} ms", flush=True)
    K.TUNING.update(base)
    for bn, nw, ns, pps in [(64, 4, 3, 4), (64, 4, 3, 2), (32, 4, 3, 8), (128, 8, 3, 4), (64, 4, 2, 8)]:
        K.TUNING.update(base, sparse_block_n=bn, sparse_num_warps=nw, sparse_num_stages=ns, programs_per_sm=pps)
        tr = t(lambda: K.sparse(q, k, v, idx, ks, ke))
        tf = t(lambda: K.sparse(q, k, v, idx, ks, ke, scores=sc))
        print(f"sparse bn={bn} nw={nw} ns={ns} pps={pps}: {tr:.4f} ms {sb/tr/1e9:.2f} TB/s | from scores {tf:.4f} ms", flush=True)
    K.TUNING.update(base)
    W = idx.shape[-1]
    ns_, ch = K._splits(B * 8, W, q.device, K.TUNING["sparse_block_n"])
    mm = torch.randn(B * 8, ns_, 4, device=dev); ll = torch.rand(B * 8, ns_, 4, device=dev); oo = torch.randn(B * 8, ns_, 4, 128, device=dev)
    print(f"combine alone ({ns_} splits): {t(lambda: K._combine(q, mm, ll, oo, ns_, 8)):.4f} ms", flush=True)
    print(f"anchor {t(lambda: K.anchor(q, k, v, ks, ke, topk_fraction=0.1, topk_floor=128)):.4f} ms; layer0 "
          f"{t(lambda: K.anchor(q, k, v, ks, ke, topk_fraction=0.1, topk_floor=128, dense_output=True)):.4f} ms", flush=True)
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
    --heads 32,16 --kv-heads 8,2 --json "$OUT/decode_b64.json" --plot "$OUT/decode_b64.png"
  python -m kascade.cli bench decode --context 32768,131072 --batch 1 --topk-fraction 0.1,0.2,0.3 \
    --heads 32,16 --kv-heads 8,2 --json "$OUT/decode_b1.json" ;;
esac
done
