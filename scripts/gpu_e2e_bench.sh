#!/usr/bin/env bash
# On the GPU machine: the no-recompile test, then the end-to-end benchmark at the target points
# (Llama-3.1-8B shape, 32 layers, random weights, the authors' 5-anchor plan, Top-k 10%).
# Usage: bash scripts/gpu_e2e_bench.sh OUT_DIR
set -uo pipefail
OUT=${1:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
python -m pytest -q --tb=short tests/gpu/test_generation_gpu.py 2>&1 | tail -30 | tee "$OUT/gpu_tests_generation.log"
python -m kascade.cli bench generate --model llama-3.1-8b --context 32768 --batch ${BATCH32:-1,16} --new-tokens 64 \
  --hf-baseline --json "$OUT/generate_32k.json" --plot "$OUT/generate_32k.png" 2>&1 | grep -v Warn | tail -12
[[ "${SKIP128:-0}" == 1 ]] || python -m kascade.cli bench generate --model llama-3.1-8b --context 131072 --batch 1,3 --new-tokens 64 \
  --ttft-reps 1 --no-check --json "$OUT/generate_128k.json" 2>&1 | grep -v Warn | tail -10
if [[ "${QWEN:-0}" == 1 ]]; then
  python -m kascade.cli bench generate --model qwen2.5-7b --context 32768,131072 --batch 1 --new-tokens 64 \
    --ttft-reps 1 --json "$OUT/generate_qwen7b.json" 2>&1 | grep -v Warn | tail -8
fi
