#!/usr/bin/env bash
# On the GPU box, after scripts/gpu-check.sh has built dsv4 (GPU_CHECK_E2E=1 builds the binary): writes the
# full-shape synthetic Flash file (ds4's names, metadata and quant mix; routed experts as file holes) and runs
# `dsv4 bench` on it with the CUDA backend. Logs and CSV go to $OUT.
#   BUILD (default /tmp/dsv4-gpu-build), FLASH_MIX (default: q2 on cards with >= 100 GB, iq2 on the 80 GB ones,
#   where q2's 86.7 GB of weights do not fit), FLASH_GGUF (default
#   /tmp/flash-$FLASH_MIX.gguf), BENCH_ARGS, BENCH_TIMEOUT (s), BENCH_TAG (suffix of the output files).
#   DSV4_CUDA_PROFILE=1 in the environment adds the CUDA backend's per-op time table (stderr, in the log).
#   BENCH_PLAN=issue5 runs the set issue 5 reports (decode 2k/8k, 8k prefill at -b 256/1024/2048, decode profile);
#   BENCH_PLAN=final a shorter set for a call that also runs the tests (decode 2k/8k, graphs off, profile;
#   FINAL_GEN decode tokens per frontier, default 32).
#   BENCH_PLAN=ncu: Nsight Compute per-kernel duration / DRAM bytes of a short run (CSV in $OUT).
#   BENCH_PLAN=nsys: Nsight Systems kernel trace of a short decode (CSV in $OUT).
#   BENCH_PLAN=ab: one run per knob configuration in AB_CONFIGS ('base;DSV4_X=1;DSV4_X=1 DSV4_Y=2'), decode at 2k;
#   AB_REPEAT=N interleaves N rounds after a warm-up and writes ab_summary.txt (means, difference to base).
#   BENCH_PLAN=skip: the critical-path cost of each decode op (DSV4_CUDA_SKIP runs against base), skip_table.txt.
#   BENCH_PLAN=trace: CUPTI kernel timeline of a decode at 2k (dev/cuda/trace: every kernel's start/end, graph
#   nodes included): trace_summary.txt (per-kernel table per token, main-stream gaps), trace_timeline.csv (one
#   token); TRACE_CONFIGS='base;DSV4_X=1' traces several configurations (one process each).
set -euo pipefail
BUILD=${BUILD:-/tmp/dsv4-gpu-build}
OUT=${OUT:-/tmp/gpu-flash-bench-out}
mem_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1 | tr -d ' ') || true
default_mix=q2
[ "${mem_mib:-0}" -gt 0 ] && [ "${mem_mib:-0}" -lt 100000 ] && default_mix=iq2
MIX=${FLASH_MIX:-$default_mix}
GGUF=${FLASH_GGUF:-/tmp/flash-$MIX.gguf}
TAG=${BENCH_TAG:-$MIX}
mkdir -p "$OUT"
if [ ! -f "$GGUF" ]; then
  t0=$(date +%s)
  "$BUILD/dsv4" synth --shape flash --mix "$MIX" --sparse-experts --out "$GGUF" > "$OUT/synth.log" 2>&1
  echo "synth: $(( $(date +%s) - t0 )) s: $(tail -1 "$OUT/synth.log")"
fi
run_bench() {  # TAG ARGS...: one dsv4 bench process (load + untimed warm-up + the frontiers)
  local tag=$1; shift
  echo "bench[$tag]: dsv4 bench -m $GGUF --backend cuda $*"
  local rc=0
  timeout "${BENCH_TIMEOUT:-300}" "$BUILD/dsv4" bench -m "$GGUF" --backend cuda "$@" --csv "$OUT/flash_bench_$tag.csv" \
    --svg "$OUT/flash_bench_$tag.svg" > "$OUT/flash_bench_$tag.log" 2>&1 || rc=$?
  sed '/^cuda op profile/,$d' "$OUT/flash_bench_$tag.log" | tail -12
  [ $rc = 0 ] || echo "bench[$tag]: exit status $rc"
  return $rc
}

if [ "${BENCH_PLAN:-}" = issue5 ]; then
  # The numbers issue 5 asks for, in one call: decode at 2k (and 8k) with the default pass size; an 8k prompt
  # prefilled from empty at pass sizes 256 / 1024 / 2048; the per-op table of decode tokens at 2k (profiled run,
  # serialized by events: its t/s is not the speed figure). `DSV4_CUDA_PROFILE` tables are in the .log files.
  status=0
  run_bench "${TAG}_decode" --ctx-start 2048 --ctx-max 8192 --step-mul 4 --gen-tokens 32 || status=1
  for b in 256 1024 2048; do run_bench "${TAG}_8k_b$b" -b $b --ctx-start 8192 --ctx-max 8192 --gen-tokens 0 || status=1; done
  DSV4_CUDA_PROFILE=1 run_bench "${TAG}_profile" --ctx-start 2048 --ctx-max 2048 --gen-tokens 16 || status=1
  sed -n '/^cuda op profile/,$p' "$OUT/flash_bench_${TAG}_profile.log" | head -60
  exit $status
fi
if [ "${BENCH_PLAN:-}" = trace ]; then
  # CUPTI from the toolkit: headers next to cuda_runtime.h or under extras/CUPTI, the library in lib64 or extras.
  CUDA_DIR=$(dirname "$(dirname "$(command -v nvcc)")")
  CUPTI_INC=$(dirname "$(ls "$CUDA_DIR"/include/cupti.h "$CUDA_DIR"/extras/CUPTI/include/cupti.h /usr/local/cuda*/include/cupti.h 2>/dev/null | head -1)")
  CUPTI_LIB=$(dirname "$(ls "$CUDA_DIR"/lib64/libcupti.so "$CUDA_DIR"/lib/libcupti.so "$CUDA_DIR"/extras/CUPTI/lib64/libcupti.so /usr/local/cuda*/lib*/libcupti.so /usr/local/cuda*/extras/CUPTI/lib64/libcupti.so 2>/dev/null | head -1)")
  echo "cupti: include $CUPTI_INC, lib $CUPTI_LIB"
  SRCDIR=$(cd "$(dirname "$0")/.." && pwd)
  g++ -O2 -shared -fPIC "$SRCDIR/dev/cuda/trace/cupti_trace.cpp" -I"$CUPTI_INC" -I"$CUDA_DIR/include" -L"$CUPTI_LIB" \
    -Wl,-rpath,"$CUPTI_LIB" -lcupti -o /tmp/libdsv4_trace.so
  IFS=';' read -r -a tconfigs <<< "${TRACE_CONFIGS:-base}"
  i=0
  for cfg in "${tconfigs[@]}"; do
    i=$((i + 1))
    envs=()
    [ "$cfg" = base ] || read -r -a envs <<< "$cfg"
    echo "trace[$i]: $cfg"
    env ${envs[@]+"${envs[@]}"} DSV4_TRACE_OUT="$OUT/trace$i.csv" LD_PRELOAD=/tmp/libdsv4_trace.so \
      timeout "${BENCH_TIMEOUT:-300}" "$BUILD/dsv4" bench -m "$GGUF" --backend cuda --ctx-start 2048 --ctx-max 2048 \
      --gen-tokens "${TRACE_GEN:-40}" > "$OUT/trace$i.log" 2>&1 || { echo "trace[$i]: failed"; tail -5 "$OUT/trace$i.log"; }
    tail -2 "$OUT/trace$i.log"
    { echo "== $cfg"; python3 "$SRCDIR/dev/cuda/trace/summarize.py" "$OUT/trace$i.csv" --timeline "$OUT/trace_timeline$i.csv"; } \
      >> "$OUT/trace_summary.txt" 2>&1 || true
    gzip -f "$OUT/trace$i.csv" || true
  done
  head -60 "$OUT/trace_summary.txt"
  exit 0
fi
if [ "${BENCH_PLAN:-}" = final ]; then
  # The short form for a call that also runs the tests: decode at 2k and 8k (CUDA graphs on, the default pass
  # size, so the two prefill rows add up to an 8k prompt in passes of 2048: 8192 / (s1 + s2) t/s), decode at 2k with
  # graphs off (their gain), the per-op table (profiled: eager, serialized by events).
  status=0
  DSV4_CUDA_GRAPH_STATS=1 run_bench "${TAG}_decode" --ctx-start 2048 --ctx-max 8192 --step-mul 4 --gen-tokens "${FINAL_GEN:-32}" || status=1
  grep -i "graph" "$OUT/flash_bench_${TAG}_decode.log" | tail -4 || true
  DSV4_CUDA_GRAPH=0 run_bench "${TAG}_nograph" --ctx-start 2048 --ctx-max 2048 --gen-tokens "${FINAL_GEN:-32}" || status=1
  DSV4_CUDA_PROFILE=1 run_bench "${TAG}_profile" --ctx-start 2048 --ctx-max 2048 --gen-tokens 16 || status=1
  sed -n '/^cuda op profile/,$p' "$OUT/flash_bench_${TAG}_profile.log" | head -70
  exit $status
fi
if [ "${BENCH_PLAN:-}" = ab ]; then
  # Knob A/B: one bench process per configuration (decode at 2k after a 2048-token prefill, graphs on). AB_CONFIGS is
  # a ';'-separated list of configurations, each a space-separated list of VAR=VALUE ('base': none). AB_REPEAT=N
  # runs the whole list N times in turn (interleaved, so drift hits every configuration alike) after one untimed
  # warm-up process (the first process of a call reads low), and ab_summary.txt gives each configuration's mean
  # decode t/s and its difference to the mean of the 'base' runs.
  status=0
  IFS=';' read -r -a configs <<< "${AB_CONFIGS:-base}"
  repeat=${AB_REPEAT:-1}
  [ "$repeat" -gt 1 ] && { run_bench "${TAG}_ab_warmup" --ctx-start 2048 --ctx-max 2048 --gen-tokens 16 > /dev/null || status=1; }
  i=0
  : > "$OUT/ab_runs.txt"
  for r in $(seq 1 "$repeat"); do
    for cfg in "${configs[@]}"; do
      i=$((i + 1))
      vars=(); [ "$cfg" = base ] || read -r -a vars <<< "$cfg"
      echo "ab[$i]: ${cfg}"
      (for v in "${vars[@]}"; do export "$v"; done
       run_bench "${TAG}_ab$i" --ctx-start 2048 --ctx-max 2048 --gen-tokens "${AB_GEN:-48}") || status=1
      printf '%s\t%s\n' "$cfg" "$OUT/flash_bench_${TAG}_ab$i.csv" >> "$OUT/ab_runs.txt"
    done
  done
  python3 - "$OUT/ab_runs.txt" > "$OUT/ab_summary.txt" <<'PY' || status=1
import csv, sys
runs = {}
for line in open(sys.argv[1]):
    cfg, path = line.rstrip("\n").split("\t")
    try:
        with open(path) as f:
            runs.setdefault(cfg, []).append(float(list(csv.DictReader(f))[-1]["decode_tps"]))
    except (OSError, IndexError, KeyError, ValueError):
        runs.setdefault(cfg, [])
base = runs.get("base") or []
b = sum(base) / len(base) if base else None
print("configuration (decode t/s at 2k: mean of runs, runs, difference to base)")
for cfg, v in runs.items():
    if not v:
        print(f"{cfg:60s} failed")
        continue
    m = sum(v) / len(v)
    d = f"{100 * (m / b - 1):+.1f}%" if b else "-"
    print(f"{cfg:60s} {m:8.2f}  [{' '.join(f'{x:.2f}' for x in v)}]  {d}")
PY
  cat "$OUT/ab_summary.txt"
  exit $status
fi
if [ "${BENCH_PLAN:-}" = skip ]; then
  # Critical-path cost of each decode op (DSV4_CUDA_SKIP, src/backend/cuda/timing_skip.h): decode at 2k with the op's
  # launches left out against base runs of the same process set (a warm-up run first: the first process of a call
  # reads low). SKIP_OPS: ';'-separated DSV4_CUDA_SKIP values (default: the ops of a Flash decode layer). The table
  # (skip_table.txt): t/s, the time per token the op costs (1000/base - 1000/skip ms) and per call (/ calls).
  status=0
  ops=${SKIP_OPS:-"hc_post_pre_norm;sink_attention;moe_ffn.routed;moe_ffn.routed_down;attn_output_b;attn_output_a;attn_q_b;attn_q_a;moe_ffn.shared;compressor_step_pair,compressor_step;head_prep_batch;moe_route;head_prep;head_prep_batch,compressor_step_pair,compressor_step,indexer_topk,sink_attention"}
  IFS=';' read -r -a skips <<< "$ops"
  run_bench "${TAG}_skip_warmup" --ctx-start 2048 --ctx-max 2048 --gen-tokens "${AB_GEN:-96}" > /dev/null || status=1
  run_bench "${TAG}_skip_base1" --ctx-start 2048 --ctx-max 2048 --gen-tokens "${AB_GEN:-96}" || status=1
  i=0
  for op in "${skips[@]}"; do
    i=$((i + 1))
    DSV4_CUDA_SKIP="$op" run_bench "${TAG}_skip$i" --ctx-start 2048 --ctx-max 2048 --gen-tokens "${AB_GEN:-96}" || status=1
  done
  run_bench "${TAG}_skip_base2" --ctx-start 2048 --ctx-max 2048 --gen-tokens "${AB_GEN:-96}" || status=1
  SKIP_OPS_LIST="$ops" python3 - "$OUT" "$TAG" > "$OUT/skip_table.txt" <<'PY' || status=1
import csv, os, sys
out, tag = sys.argv[1], sys.argv[2]
def tps(name):
    with open(os.path.join(out, f"flash_bench_{tag}_{name}.csv")) as f:
        return float(list(csv.DictReader(f))[-1]["decode_tps"])
base = (tps("skip_base1") + tps("skip_base2")) / 2
print(f"decode at 2k, base {base:.2f} t/s ({1000 / base:.3f} ms per token); op left out -> t/s, ms per token, us per call")
for i, op in enumerate(os.environ["SKIP_OPS_LIST"].split(";"), 1):
    t = tps(f"skip{i}")
    d = 1000 / base - 1000 / t
    calls = 86 if op == "hc_post_pre_norm" else 43  # per decode token of Flash (43 layers)
    print(f"{op:70s} {t:8.2f} {d:7.3f} {1000 * d / calls:7.1f}")
PY
  cat "$OUT/skip_table.txt"
  exit $status
fi
if [ "${BENCH_PLAN:-}" = ncu ]; then
  # Per-kernel duration and DRAM bytes of a short run (prefill of 16 tokens + NCU_GEN decode tokens), every kernel
  # replayed alone by Nsight Compute (graph nodes profiled one by one): the sum of kernel times of a decode token
  # against its wall time says how much goes to gaps between kernels. NCU_FILTER: extra ncu arguments.
  NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null | head -1 || true)
  [ -n "$NCU" ] || { echo "ncu: not found"; exit 1; }
  # shellcheck disable=SC2086
  timeout "${BENCH_TIMEOUT:-400}" "$NCU" --graph-profiling node --metrics \
    gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,launch__grid_size,launch__block_size \
    --csv --print-units base ${NCU_FILTER:-} "$BUILD/dsv4" bench -m "$GGUF" --backend cuda --ctx-start 16 --ctx-max 16 \
    --gen-tokens "${NCU_GEN:-3}" > "$OUT/ncu_${TAG}.csv" 2> "$OUT/ncu_${TAG}.log" || { tail -20 "$OUT/ncu_${TAG}.log"; tail -5 "$OUT/ncu_${TAG}.csv"; exit 1; }
  wc -l "$OUT/ncu_${TAG}.csv"; grep -v '^"' "$OUT/ncu_${TAG}.csv" | tail -5
  exit 0
fi
if [ "${BENCH_PLAN:-}" = nsys ]; then
  # Kernel timeline of decode (graph nodes traced one by one): Nsight Systems around a short bench, then its GPU
  # trace and kernel summary as CSV (per-kernel durations and the gaps between them, graphs on).
  NSYS=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1 || true)
  [ -n "$NSYS" ] || { echo "nsys: not found"; exit 1; }
  "$NSYS" --version
  timeout "${BENCH_TIMEOUT:-300}" "$NSYS" profile -o "$OUT/decode" --force-overwrite true --trace cuda \
    --cuda-graph-trace node "$BUILD/dsv4" bench -m "$GGUF" --backend cuda ${NSYS_BENCH_ARGS:---ctx-start 2048 --ctx-max 2048 --gen-tokens 24} \
    > "$OUT/nsys_profile.log" 2>&1 || { tail -20 "$OUT/nsys_profile.log"; exit 1; }
  tail -5 "$OUT/nsys_profile.log"
  "$NSYS" stats --report cuda_gpu_kern_sum --report cuda_gpu_trace --format csv --output "$OUT/decode" \
    "$OUT/decode.nsys-rep" > "$OUT/nsys_stats.log" 2>&1 || tail -20 "$OUT/nsys_stats.log"
  rm -f "$OUT/decode.sqlite" "$OUT/decode.nsys-rep"   # the CSVs are what comes back
  ls -la "$OUT"
  exit 0
fi
args=${BENCH_ARGS:-"--ctx-start 2048 --ctx-max 8192 --step-mul 2 --gen-tokens 32"}
# shellcheck disable=SC2086
run_bench "$TAG" $args
