#!/usr/bin/env bash
# On the GPU machine: the final anchor-decode measurement of issue 16 (this tree; OLD_SRC as in gpu_anchor.sh).
set -u; mkdir -p "$OUT"; nvidia-smi --query-gpu=name --format=csv,noheader
OLD=$PWD/${OLD_SRC:-.ab/old/src}
bench() { PYTHONPATH=$1 timeout 100 python -m kascade.cli bench decode --topk-fraction 0.1 --budget-ms 50 "${@:2}"; }
bench src --context 32768 --batch 16 --heads 32,28,16,32 --kv-heads 8,4,2,2 --head-dim 128,64 --check-rows 1 \
  --json "$OUT/geometry_new.json" 2>&1 | tail -8
bench src --context 131072 --batch 1 --json "$OUT/decode_b1_new.json" 2>&1 | tail -1
bench src --context 32768,131072 --batch 64 --json "$OUT/decode_b64_new.json" 2>&1 | tail -2
PYTHONPATH=src timeout 100 python -m pytest -q -x tests/gpu/test_decode_gpu.py tests/gpu/test_paged_gpu.py 2>&1 \
  | tail -1 | tee "$OUT/gpu_tests.log"
bench "$OLD" --context 32768 --batch 16 --heads 32,28,16,32 --kv-heads 8,4,2,2 --head-dim 128,64 --check-rows 1 \
  --json "$OUT/geometry_old.json" 2>&1 | tail -8
bench "$OLD" --context 131072 --batch 1 --json "$OUT/decode_b1_old.json" 2>&1 | tail -1
PYTHONPATH=src timeout 120 python -m pytest -q -x tests/gpu/test_generation_gpu.py 2>&1 | tail -1 \
  | tee "$OUT/gpu_tests_generation.log"
