#!/usr/bin/env bash
# On the GPU machine, after ../shared/tools/device-vllm has staged vLLM (its prefix sets PYTHONPATH):
#   bash scripts/gpu_serve.sh OUT_DIR tests            the vLLM and paged-kernel GPU tests
#   bash scripts/gpu_serve.sh OUT_DIR bench ARGS...    kascade bench serve ARGS --json OUT_DIR/serve.json
# The source tree is not pip-installed there: a dist-info with the plugin's entry point makes vLLM's
# worker processes (tensor parallelism) register the Kascade backend as they would for an installed kascade.
set -uo pipefail
OUT=${1:?OUT_DIR}; what=${2:?tests|bench}; shift 2
mkdir -p "$OUT" /tmp/ep/kascade-0.0.0.dist-info
printf 'Metadata-Version: 2.1\nName: kascade\nVersion: 0.0.0\n' > /tmp/ep/kascade-0.0.0.dist-info/METADATA
printf '[vllm.general_plugins]\nkascade = kascade.integrations.vllm:register\n' \
  > /tmp/ep/kascade-0.0.0.dist-info/entry_points.txt
export PYTHONPATH=/tmp/ep:$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
if [[ $what == tests ]]; then
  python -m pytest -q --tb=short tests/gpu/test_vllm_gpu.py tests/gpu/test_paged_gpu.py 2>&1 | tail -30 \
    | tee "$OUT/gpu_tests_serve.log"
else
  # the whole log lands in OUT as it is written (kept if the call runs out of time); the console gets rows
  python -m kascade.cli bench serve "$@" --json "$OUT/serve.json" 2>&1 | tee "$OUT/serve.log" \
    | grep -v -E "Warn|warn|INFO|it/s\]|^\s*$" | tail -40
fi
