#!/usr/bin/env bash
# Fixed mutation seed (FUZZ_SEED, default 1; 0 = random) so a CI run is reproducible.
# Builds the libFuzzer targets (fuzz/*.cpp) with clang and runs each for a few seconds on its seed corpus
# (fuzz/corpus/<target>/, read-only) plus a scratch corpus in the build dir. The libraries under test are
# instrumented too (see the DSV4_FUZZ section of CMakeLists.txt). A crash, leak, sanitizer report or timeout
# fails the script and leaves the reproducer in build/fuzz/. FUZZ_SECONDS overrides the 10 s per target.
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob
targets=(fuzz/*.cpp)
[ ${#targets[@]} -eq 0 ] && { echo "fuzz-smoke: no fuzz targets"; exit 0; }
command -v clang++ >/dev/null || { echo "fuzz-smoke: clang++ not found (scripts/install-deps.sh installs it)"; exit 1; }
B=build/fuzz
SECONDS_PER_TARGET=${FUZZ_SECONDS:-10}
CC=clang CXX=clang++ cmake -S . -B $B -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDSV4_FUZZ=ON -DDSV4_CUDA=OFF \
  -DDSV4_BENCH=OFF >/dev/null
for t in "${targets[@]}"; do
  stem=$(basename "$t" .cpp)
  cmake --build $B --target "$stem" -j "$(nproc)"
  corpus=fuzz/corpus/$stem; mkdir -p "$B/corpus-$stem"
  log=$B/$stem.log
  echo "fuzz-smoke: $stem ($SECONDS_PER_TARGET s)"
  if ! "$B/$stem" -seed="${FUZZ_SEED:-1}" -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 -timeout=10 -artifact_prefix="$B/" \
      "$B/corpus-$stem" $( [ -d "$corpus" ] && echo "$corpus" ) >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "fuzz-smoke: $stem FAILED (log: $log, reproducer: $B/crash-* / leak-* / timeout-*)"
    exit 1
  fi
  grep -E '^Done [0-9]+ runs' "$log" | sed "s/^/fuzz-smoke: $stem: /" || true
done
