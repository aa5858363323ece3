#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/*.cpp) with clang and runs each for a few seconds on its seed corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob
targets=(fuzz/*.cpp)
[ ${#targets[@]} -eq 0 ] && { echo "fuzz-smoke: no fuzz targets"; exit 0; }
B=build/fuzz
CC=clang CXX=clang++ cmake -S . -B $B -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDSV4_FUZZ=ON -DDSV4_CUDA=OFF \
  -DDSV4_BENCH=OFF >/dev/null
for t in "${targets[@]}"; do
  stem=$(basename "$t" .cpp)
  cmake --build $B --target "$stem" -j "$(nproc)"
  corpus=fuzz/corpus/$stem; mkdir -p "$B/corpus-$stem"
  echo "fuzz-smoke: $stem (10 s)"
  "$B/$stem" -max_total_time=10 -rss_limit_mb=2048 "$B/corpus-$stem" $( [ -d "$corpus" ] && echo "$corpus" )
done
