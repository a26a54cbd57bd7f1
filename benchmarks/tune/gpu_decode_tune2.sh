#!/usr/bin/env bash
# On the GPU machine (device tool), from the repo root, one run of about 4 minutes:
#   1. the decode GPU tests with the default DecodeConfig;
#   2. benchmarks/tune/decode_tune2.py: old vs new launch variants (reuse kernel / split count, hybrid selection
#      histograms) at 128K b64, 32K b64, 128K b1 and 8K b64, each variant checked, then layer 0 /
#      anchor / reuse and the whole-model speedup with the default ("old") and the point's best ("new")
#      variants; table on stdout, JSON + log in $OUT;
#   3. the decode GPU tests again (a quick subset) with every new code path switched on.
#   bash benchmarks/tune/gpu_decode_tune2.sh            (OUT defaults to benchmarks/results)
set -uo pipefail
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
t0=$SECONDS
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,memory.used --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
rc=0

echo "== 1. GPU decode tests (default DecodeConfig)"
timeout 150 python -m pytest -q -x tests/gpu/test_decode_gpu.py 2>&1 | tail -6
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
echo "   ($((SECONDS - t0)) s)"

echo "== 2. old vs new variants"
timeout 330 python benchmarks/tune/decode_tune2.py --out "$OUT/decode_tune2.json" 2>&1 | grep -v "UserWarning\|_warn_once\|warn(" \
  | tee "$OUT/decode_tune2.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
echo "   ($((SECONDS - t0)) s)"

echo "== 3. GPU decode tests, subset, with the new code paths on (direct store, hybrid histograms)"
for cfg in '{"sparse_num_stages": 5, "select_atomic_max": [64, 256]}' \
           '{"sparse_programs_per_sm": 0.01, "sparse_num_stages": 5, "select_atomic_max": [0, 256]}'; do
  echo "   KASCADE_DECODE_TUNING=$cfg"
  KASCADE_DECODE_TUNING="$cfg" timeout 120 python -m pytest -q -x tests/gpu/test_decode_gpu.py \
    -k "full-131072 or varied-32768 or geometries or no_host_sync" 2>&1 | tail -3
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
done
echo "== done in $((SECONDS - t0)) s, rc=$rc"
exit $rc
