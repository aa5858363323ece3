#!/usr/bin/env bash
# One device call for the prefill work of issue 5 (build, parity tests, timing) inside ~175 s:
#   1. build dsv4, dsv4_test_ops and wb_gemm from the packed tree (the script's own tree: build/<GPUSRC> from
#      gpu-check.sh --pack); meanwhile a CPU-only dsv4 builds and synthesizes the Flash file (q2 on cards with
#      >= 100 GB, iq2 on 80 GB ones)
#   2. the GEMM / prefill-control parity tests and wb_gemm --only control
#   3. an 8k prompt prefilled from empty at -b 2048 with DSV4_CUDA_PROFILE=1 (per-op table of the prefill passes;
#      the event pairs serialize little at prefill sizes, but this t/s is the profiled one)
# Run from the repository root on the GPU box, with carry build/gpudeps and build/<GPUSRC>:
#   build/gpusrc-prefill/scripts/gpu-prefill-check.sh
# Environment: DEADLINE_S (default 172: every step is cut to what is left), TESTS (gtest filter), BENCH_B (2048).
# Logs go to $OUT; on exit they are packed into $OUT/prefill.tgz (the device tool returns only a few files).
set -uo pipefail
SRC="$(cd "$(dirname "$0")/.." && pwd)"
DEPS="${DEPS:-$PWD/build/gpudeps}"
OUT="${OUT:-/tmp/prefill-out}"
BUILD=/tmp/dsv4-prefill-build
DEADLINE_S=${DEADLINE_S:-172}
TESTS=${TESTS:-'CudaGemm.Exact*:CudaGemm.RejectsBadArguments:CudaGemm.DenseF32IsFp32:CudaPrefillControl.*:CudaBackend.HyperConnections:CudaBackend.MoeRouteAndFfn:CudaBackend.PrefillSizesOnGemmAndGemv:CudaDeviceForward.*'}
mkdir -p "$OUT"
T0=$(date +%s)
left() { echo $(( DEADLINE_S - ($(date +%s) - T0) )); }
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/steps.log"; }
pack_out() {
  (cd "$OUT" && files=$(ls -A | grep -v '^prefill.tgz$') && [ -n "$files" ] && tar -czf prefill.tgz $files &&
     rm -rf $files) || true
}
trap pack_out EXIT

ARCH_LIB=lib/x86_64-linux-gnu
ln -sf libpcre2-8.so.0 "$DEPS/$ARCH_LIB/libpcre2-8.so"
export LD_LIBRARY_PATH="$DEPS/$ARCH_LIB:${LD_LIBRARY_PATH:-}"
export PKG_CONFIG_PATH="$DEPS/$ARCH_LIB/pkgconfig:${PKG_CONFIG_PATH:-}"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
mem_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1 | tr -d ' ')
MIX=q2
[ "${mem_mib:-0}" -lt 100000 ] && MIX=iq2   # the q2 mix does not fit an 80 GB card
GGUF=/tmp/flash-$MIX.gguf

# The Flash file comes from a CPU-only build of dsv4 (no nvcc: ready long before the CUDA build, whose critical
# path is gemv.cu), synthesized while the CUDA targets build and the tests run.
stamp "configure (CUDA + CPU-only for synth; mix $MIX for this card)"
cfg=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DDSV4_BENCH=OFF -DCMAKE_PREFIX_PATH="$DEPS"
     -DPKG_CONFIG_EXECUTABLE="$DEPS/bin/pkgconf")
(cmake -S "$SRC" -B "$BUILD-cpu" "${cfg[@]}" -DDSV4_CUDA=OFF > "$OUT/build_cpu.log" 2>&1 &&
   cmake --build "$BUILD-cpu" -j 6 --target dsv4 >> "$OUT/build_cpu.log" 2>&1 &&
   echo "[$(( $(date +%s) - T0 )) s] cpu dsv4 built, synth" >> "$OUT/steps.log" &&
   "$BUILD-cpu/dsv4" synth --shape flash --mix "$MIX" --sparse-experts --out "$GGUF" > "$OUT/synth.log" 2>&1) &
synth_pid=$!
if ! (cmake -S "$SRC" -B "$BUILD" "${cfg[@]}" -DDSV4_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a &&
      timeout "$(left)" cmake --build "$BUILD" -j "$(nproc)" --target dsv4 dsv4_test_ops wb_gemm) > "$OUT/build.log" 2>&1; then
  stamp "BUILD FAILED (tail of build.log)"; tail -30 "$OUT/build.log"; exit 1
fi
stamp "built: dsv4 dsv4_test_ops wb_gemm"
(cd "$SRC" && timeout 45 "$BUILD/dsv4_test_ops" --gtest_filter="$TESTS") > "$OUT/ops.log" 2>&1
stamp "tests rc $?: $(grep -cE '^\[       OK' "$OUT/ops.log") ok, $(grep -cE '^\[  FAILED  \] [A-Za-z]' "$OUT/ops.log") failed"
grep -E '^\[  FAILED|^\[  PASSED|\[gemm exact\]|\[prefill control\]' "$OUT/ops.log" | head -30
timeout 25 "$BUILD/wb_gemm" --quick --only control --csv "$OUT/wb_gemm_control.csv" > "$OUT/wb_gemm_control.log" 2>&1
stamp "wb_gemm control rc $?"
cat "$OUT/wb_gemm_control.log"

wait "$synth_pid"
stamp "synth rc $?: $(tail -1 "$OUT/synth.log")"
b=${BENCH_B:-2048}
DSV4_CUDA_PROFILE=1 timeout "$(( $(left) - 2 ))" "$BUILD/dsv4" bench -m "$GGUF" --backend cuda -b "$b" --ctx-start 8192 \
  --ctx-max 8192 --gen-tokens 0 --csv "$OUT/bench.csv" > "$OUT/bench.log" 2>&1
stamp "bench rc $?"
sed '/^cuda op profile/,$d' "$OUT/bench.log" | tail -6
sed -n '/multi-token calls/,$p' "$OUT/bench.log" | head -40
