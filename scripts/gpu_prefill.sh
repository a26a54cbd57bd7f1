#!/usr/bin/env bash
# On the GPU machine (device tool), from the repo root: GPU tests, then the prefill benchmark sweep.
# Results land in $OUT (or benchmarks/results when OUT is unset).
#   bash scripts/gpu_prefill.sh [tests|bench|tune|all] [extra bench args...]
set -uo pipefail
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
what=${1:-all}; shift || true
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader
if [[ $what == tests || $what == all ]]; then
  python -m pytest -q -x tests/gpu/test_prefill_gpu.py 2>&1 | tail -15
fi
if [[ $what == bench || $what == all ]]; then
  python -m kascade.bench.prefill --json "$OUT/prefill_main.json" "$@"
fi
