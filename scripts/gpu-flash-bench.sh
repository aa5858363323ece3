#!/usr/bin/env bash
# On the GPU box, after scripts/gpu-check.sh has built dsv4 (GPU_CHECK_E2E=1 builds the binary): writes the
# full-shape synthetic Flash q2 file (ds4's names, metadata and quant mix; routed experts as file holes) and runs
# `dsv4 bench` on it with the CUDA backend. Short contexts by default: the current CUDA op table still copies
# activations through host memory per op (docs/backend.md), so long prefills are slow. Logs and CSV go to $OUT.
#   BUILD (default /tmp/dsv4-gpu-build), FLASH_GGUF (default /tmp/flash-q2.gguf), BENCH_ARGS, BENCH_TIMEOUT (s)
set -euo pipefail
BUILD=${BUILD:-/tmp/dsv4-gpu-build}
OUT=${OUT:-/tmp/gpu-flash-bench-out}
GGUF=${FLASH_GGUF:-/tmp/flash-q2.gguf}
mkdir -p "$OUT"
if [ ! -f "$GGUF" ]; then
  t0=$(date +%s)
  "$BUILD/dsv4" synth --shape flash --mix q2 --sparse-experts --out "$GGUF" > "$OUT/synth.log" 2>&1
  echo "synth: $(( $(date +%s) - t0 )) s: $(tail -1 "$OUT/synth.log")"
fi
args=${BENCH_ARGS:-"--ctx-start 32 --ctx-max 64 --step-incr 32 --gen-tokens 8"}
echo "bench: dsv4 bench -m $GGUF --backend cuda $args"
timeout "${BENCH_TIMEOUT:-300}" "$BUILD/dsv4" bench -m "$GGUF" --backend cuda $args --csv "$OUT/flash_bench.csv" \
  2>&1 | tee "$OUT/flash_bench.log"
