#!/usr/bin/env bash
# On the GPU box, after scripts/gpu-check.sh has built dsv4 (GPU_CHECK_E2E=1 builds the binary): writes the
# full-shape synthetic Flash file (ds4's names, metadata and quant mix; routed experts as file holes) and runs
# `dsv4 bench` on it with the CUDA backend. Logs and CSV go to $OUT.
#   BUILD (default /tmp/dsv4-gpu-build), FLASH_MIX (q2 default; iq2 for 80 GB cards), FLASH_GGUF (default
#   /tmp/flash-$FLASH_MIX.gguf), BENCH_ARGS, BENCH_TIMEOUT (s), BENCH_TAG (suffix of the output files).
#   DSV4_CUDA_PROFILE=1 in the environment adds the CUDA backend's per-op time table (stderr, in the log).
set -euo pipefail
BUILD=${BUILD:-/tmp/dsv4-gpu-build}
OUT=${OUT:-/tmp/gpu-flash-bench-out}
MIX=${FLASH_MIX:-q2}
GGUF=${FLASH_GGUF:-/tmp/flash-$MIX.gguf}
TAG=${BENCH_TAG:-$MIX}
mkdir -p "$OUT"
if [ ! -f "$GGUF" ]; then
  t0=$(date +%s)
  "$BUILD/dsv4" synth --shape flash --mix "$MIX" --sparse-experts --out "$GGUF" > "$OUT/synth.log" 2>&1
  echo "synth: $(( $(date +%s) - t0 )) s: $(tail -1 "$OUT/synth.log")"
fi
args=${BENCH_ARGS:-"--ctx-start 2048 --ctx-max 8192 --step-mul 2 --gen-tokens 32"}
echo "bench: dsv4 bench -m $GGUF --backend cuda $args"
timeout "${BENCH_TIMEOUT:-300}" "$BUILD/dsv4" bench -m "$GGUF" --backend cuda $args --csv "$OUT/flash_bench_$TAG.csv" \
  --svg "$OUT/flash_bench_$TAG.svg" 2>&1 | tee "$OUT/flash_bench_$TAG.log"
