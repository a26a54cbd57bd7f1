#!/usr/bin/env bash
# On the GPU machine (device tool), from the repo root: what the per-row split sizing and the physical
# reuse indices change. Results land in $OUT.
#   bash benchmarks/tune/gpu_rows.sh tests|kernels|geometry
set -uo pipefail
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
git rev-parse HEAD 2>/dev/null
for what in "$@"; do
case $what in
tests)
  python -m pytest -q -x tests/gpu/test_decode_gpu.py tests/gpu/test_paged_gpu.py \
    2>&1 | tail -8 | tee "$OUT/gpu_tests.log" ;;
kernels)
  python benchmarks/tune/bench_paged.py --json "$OUT/paged_vs_contiguous.json"
  python benchmarks/tune/bench_capacity.py --json "$OUT/capacity.json" ;;
geometry)
  python -m kascade.cli bench decode --context 32768 --batch 16 --topk-fraction 0.1 \
    --heads 8,16,32,28,32,32 --kv-heads 8,8,8,4,4,2 --head-dim 64,128 --budget-ms 100 --check-rows 1 \
    --json "$OUT/decode_geometry_32k_b16.json" 2>&1 | tail -30 ;;
regress)
  python -m kascade.cli bench decode --context 8192,32768,131072 --batch 64 --topk-fraction 0.1 \
    --budget-ms 150 --json "$OUT/decode_b64.json" 2>&1 | tail -8
  python -m kascade.cli bench decode --context 131072 --batch 1 --topk-fraction 0.1 \
    --budget-ms 150 --json "$OUT/decode_b1.json" 2>&1 | tail -5 ;;
esac
done
