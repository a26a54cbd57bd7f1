#!/usr/bin/env bash
# On the GPU machine (device tool), from the repo root: GPU tests, then the prefill benchmark.
# Results land in $OUT (or benchmarks/results when OUT is unset).
#   bash scripts/gpu_prefill.sh tests                 # tests/gpu/test_prefill_gpu.py
#   bash scripts/gpu_prefill.sh bench [bench args]    # one `kascade bench prefill` run -> prefill_main.json
#   bash scripts/gpu_prefill.sh all [bench args]      # both
#   bash scripts/gpu_prefill.sh sweep                 # tests + 256K + 20/30 %, T=16/64, Qwen-like 16/2
# Pass the commit from the checkout (the device copy has no .git): KASCADE_COMMIT=<sha> bash scripts/gpu_prefill.sh ...
set -uo pipefail
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
what=${1:-all}; shift || true
bench() { python -m kascade.bench.prefill "$@"; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader
if [[ $what == tests || $what == all || $what == sweep ]]; then
  python -m pytest -q tests/gpu/test_prefill_gpu.py 2>&1 | tail -15
fi
if [[ $what == bench || $what == all ]]; then
  bench --json "$OUT/prefill_main.json" "$@"
fi
if [[ $what == sweep ]]; then
  bench --context 262144 --baselines cudnn,triton --json "$OUT/prefill_256k.json"
  bench --context 32768,131072 --topk-fraction 0.2,0.3 --json "$OUT/prefill_fractions.json"
  bench --context 32768,131072 --tile-size 16,64 --json "$OUT/prefill_tiles.json"
  bench --context 32768,131072 --heads 16 --kv-heads 2 --json "$OUT/prefill_qwen.json"
fi
