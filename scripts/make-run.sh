#!/usr/bin/env bash
# `make run`: the no-download demo. Builds the tiny demo model into the build directory if it is missing
# (same seed, same file), then runs a one-shot prompt on it with `dsv4 run`, printing the reply and the speeds.
#
# The demo model is `dsv4 synth --shape tiny`: DeepSeek V4 Flash's architecture at toy widths (4 layers,
# d_model 256, sliding/CSA/HCA layers, hash + routed MoE, mHC) with the real 129,280-token V4 tokenizer and
# RANDOM weights, so the reply is fluent-looking noise. It exercises the whole path (GGUF load, tokenizer,
# chat encoding, forward, sampling, streaming) without an 81 GB download.
#
# Usage: scripts/make-run.sh [BUILD_DIR] [extra dsv4 run flags...]
set -euo pipefail
BUILD=${1:-build/release}
shift || true
BIN="$BUILD/dsv4"
MODEL="$BUILD/dsv4-tiny.gguf"
if [ ! -x "$BIN" ]; then
  echo "make-run: $BIN is not built (run: make build)" >&2
  exit 1
fi
# Rebuilt when the binary is newer: a model from an older build may use an older layout.
if [ ! -f "$MODEL" ] || [ "$BIN" -nt "$MODEL" ]; then
  echo "make-run: writing the demo model $MODEL (random weights, seed 1)" >&2
  "$BIN" synth --shape tiny --seed 1 --out "$MODEL.tmp" >/dev/null
  mv "$MODEL.tmp" "$MODEL"
fi
echo "make-run: dsv4 run on $MODEL — a tiny DeepSeek-V4-architecture model with the real tokenizer and random"
echo "          weights (its reply is noise). For the real model: -m FILE from huggingface.co/antirez/deepseek-v4-gguf"
echo
echo "> Explain in one sentence what a tokenizer does."
exec "$BIN" run -m "$MODEL" --nothink --seed 1 -n 48 -p "Explain in one sentence what a tokenizer does." "$@"
