#!/usr/bin/env bash
# On the GPU machine: A/B of the decode and prefill kernels at the README's target points, the source tree
# of another commit (OLD_SRC, e.g. `git archive <commit> src | tar -x -C .ab/old`, carried) against this
# one, in the same run on the same card, then the kernel GPU tests of this tree. Results land in $OUT.
#   OLD_SRC=.ab/old/src bash benchmarks/ab_kernels.sh OUT_DIR
set -uo pipefail
OUT=${1:?OUT_DIR}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader | tee "$OUT/gpu.txt"
for side in old new; do
  src=$PWD/src; [[ $side == old ]] && src=$PWD/${OLD_SRC:?}
  PYTHONPATH=$src python -m kascade.cli bench decode --context 32768,131072 --batch 64 --topk-fraction 0.1 \
    --heads 32 --kv-heads 8 --budget-ms 200 --json "$OUT/decode_b64_$side.json" 2>&1 | tail -12
  PYTHONPATH=$src python -m kascade.cli bench decode --context 131072 --batch 1 --topk-fraction 0.1 \
    --heads 32 --kv-heads 8 --budget-ms 200 --json "$OUT/decode_b1_$side.json" 2>&1 | tail -8
  PYTHONPATH=$src python -m kascade.cli bench prefill --context 32768,131072 --json "$OUT/prefill_$side.json" 2>&1 \
    | tail -12
done
PYTHONPATH=$PWD/src python -m pytest -q --tb=short tests/gpu/test_decode_gpu.py tests/gpu/test_prefill_gpu.py \
  tests/gpu/test_paged_gpu.py tests/gpu/test_generation_gpu.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
