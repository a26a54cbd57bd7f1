#!/usr/bin/env bash
# On the GPU machine: the GPU tests of the changed kernels and the end-to-end path, then
# `kascade bench generate` quick (4 layers) as a smoke run. Usage: bash scripts/gpu_e2e.sh OUT_DIR
set -uo pipefail
OUT=${1:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
python -m pytest -q -x tests/gpu/test_generation_gpu.py 2>&1 | tail -25 | tee "$OUT/gpu_tests_generation.log"
python -m pytest -q tests/gpu/test_decode_gpu.py tests/gpu/test_prefill_gpu.py 2>&1 | tail -8 | tee "$OUT/gpu_tests_kernels.log"
python -m kascade.cli bench generate --layers 4 --context 8192 --batch 1,4 --new-tokens 32 \
  --hf-baseline --json "$OUT/generate_smoke.json" 2>&1 | tail -20
