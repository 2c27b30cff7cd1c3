#!/usr/bin/env bash
# analysis/gpu_speed.sh — every GPU speed figure of the speed issue in one call (about 8–10 minutes
# on an H100 / H200), for a session that is lent a GPU:
#
#     bash analysis/gpu_speed.sh OUT            # e.g. OUT=results/speed/gpu (default out/speed/gpu)
#
# 1. analysis.bench on CUDA: the integrator against torchdiffeq (RK4 float64 / float32, dopri5
#    work–precision), its throughput sweep, integrate(compile=True) against the eager loop (whether
#    compile="auto"'s GPU threshold pays), our GPT against a plain SDPA GPT, and the chip's
#    MEASURED bf16 matmul rate (the ceiling to read MFU against, beside the datasheet's).
# 2. analysis.bench_lm at the enwik8 preset, batch 16: the plain model, both λ modes, a
#    constrained regime (its K, V from Q, W, A every step) and the user's RoPE + λ, as ratios to
#    plain, with MFU.
# 3. The plain model at batch 32: does a larger batch lift MFU (the goal is ≥ 40%)?
# Every step writes its bench.json / bench.md under OUT; a step that fails does not stop the rest.
set -u
OUT=${1:-out/speed/gpu}
mkdir -p "$OUT"
run() {                         # run NAME LIMIT_SECONDS COMMAND...: time-boxed, logged, never fatal
    local name=$1 limit=$2; shift 2
    echo "== $name: $*" | tee -a "$OUT/log.txt"
    timeout "$limit" "$@" >>"$OUT/log.txt" 2>&1 || echo "   $name: exit $?" | tee -a "$OUT/log.txt"
}
run bench 300 python -m analysis.bench --device cuda --rounds 5 --steps 20 --scaling --compiled --out "$OUT/bench"
run lm-b16 200 python -m analysis.bench_lm --device cuda --bench-rounds 5 --bench-steps 10 \
    --bench-variants plain,lam-identity,lam-softplus,convergent,rope-lam-identity --out "$OUT/lm-b16"
run lm-b32 90 python -m analysis.bench_lm --device cuda --batch-size 32 --bench-rounds 5 --bench-steps 10 \
    --bench-variants plain --out "$OUT/lm-b32"
echo "done: $OUT" | tee -a "$OUT/log.txt"
