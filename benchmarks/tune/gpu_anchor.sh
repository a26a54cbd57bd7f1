#!/usr/bin/env bash
# On the GPU machine (device tool), from the repo root: the anchor decode at several geometries (issue 16),
# this tree against OLD_SRC (`git archive <commit> src | tar -x -C .ab/old`, carried) in the same run:
# per-kernel profile, launch-knob variants, the kernel GPU tests, `bench decode` at 32K batch 16 and the
# README's decode target points. Results land in $OUT.
set -u; mkdir -p "$OUT"; nvidia-smi --query-gpu=name --format=csv,noheader
OLD=$PWD/${OLD_SRC:-.ab/old/src}
P=benchmarks/tune/anchor_profile.py
flt() { grep -v -e Warn -e warn_once -e elementwise; }
echo "== new"; PYTHONPATH=src timeout 90 python $P --json "$OUT/anchor_profile_new.json" 2>&1 | flt
G2=16/2/128,16/2/64,32/2/128,32/2/64,14/2/64
echo "== anchor sparse 3/128"; PYTHONPATH=src timeout 90 python $P --set anchor_sparse_programs_per_sm=3 \
  --set anchor_sparse_min_chunk=128 --json "$OUT/anchor_profile_asp3.json" 2>&1 | flt | grep -e "x$" -e sparse
echo "== fused 4/SM"; PYTHONPATH=src timeout 60 python $P --geometries $G2 --set select_fused_programs_per_sm=4 \
  --json "$OUT/anchor_profile_fused4.json" 2>&1 | flt | grep -e "x$" -e fused -e hist
PYTHONPATH=src timeout 150 python -m pytest -q -x tests/gpu/test_decode_gpu.py tests/gpu/test_paged_gpu.py 2>&1 | tail -2
for side in old new; do src=$PWD/src; [[ $side == old ]] && src=$OLD
  PYTHONPATH=$src timeout 100 python -m kascade.cli bench decode --context 32768 --batch 16 --topk-fraction 0.1 \
    --heads 32,28,16,32 --kv-heads 8,4,2,2 --head-dim 128,64 --budget-ms 50 --check-rows 1 \
    --json "$OUT/geometry_$side.json" 2>&1 | tail -9
  PYTHONPATH=$src timeout 120 python -m kascade.cli bench decode --context 32768,131072 --batch 64 --topk-fraction 0.1 \
    --budget-ms 100 --json "$OUT/decode_b64_$side.json" 2>&1 | tail -2
  PYTHONPATH=$src timeout 60 python -m kascade.cli bench decode --context 131072 --batch 1 --topk-fraction 0.1 \
    --budget-ms 100 --json "$OUT/decode_b1_$side.json" 2>&1 | tail -1
done
