#!/usr/bin/env bash
# analysis/gpu_spectral.sh — the Spectral paper's tasks at the paper's model size in the paper's
# setting (issue #14, items 2 and 4), for a session that is lent a GPU: one call, 8 processes
# sharing the GPU, each step time-boxed so the whole fits in about 10 minutes:
#
#     bash analysis/gpu_spectral.sh OUT          # e.g. OUT=results/spectral/gpu-paper (default out/spectral/gpu-paper)
#
# 1. Task 1 (the deposit): the paper's wiring (every layer's K, V from the layer-0 embeddings + PE)
#    and betas, sin+rope (the paper's "RoPE"), rope, sin and MLA, seeds 0 and 1: 8 runs at once,
#    with the per-head ablations and the concentration C (results.md).
# 2. Task 2 (counting; the paper's MLA ≫ RoPE gap): the same setting, rope, sin+rope and MLA,
#    seeds 0 and 1: 6 runs at once.
# Each table keeps its per-run JSONs in OUT/*/cache, so a step cut short by its time box resumes
# where it stopped when the script is run again. --max-minutes stops a run after the epoch that
# passes the box, so even a slow GPU returns a (shorter) table.
set -u
OUT=${1:-out/spectral/gpu-paper}
mkdir -p "$OUT"
run() {                         # run NAME LIMIT_SECONDS COMMAND...: time-boxed, logged, never fatal
    local name=$1 limit=$2; shift 2
    echo "== $name: $*" | tee -a "$OUT/log.txt"
    timeout "$limit" "$@" >>"$OUT/log.txt" 2>&1 || echo "   $name: exit $?" | tee -a "$OUT/log.txt"
}
common=(--preset medium --device cuda --wiring paper --betas paper --seeds 0,1 --workers 8 --max-minutes 4)
run task1 330 python -m spectral.tasks table "${common[@]}" --tasks 1 --pes sin+rope,rope,sin,mla \
    --cache "$OUT/task1/cache" --out "$OUT/task1"
run task2 270 python -m spectral.tasks table "${common[@]}" --tasks 2 --pes rope,sin+rope,mla \
    --cache "$OUT/task2/cache" --out "$OUT/task2"
echo "done: $OUT" | tee -a "$OUT/log.txt"
