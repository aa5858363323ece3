#!/usr/bin/env bash
# Drives an interactive `dsv4 run` chat through tmux (send-keys / capture-pane) and checks what a user sees:
# several turns on one live session (the context grows, later turns only add the new message), /nothink and
# /think switching (shown in each turn's status line), and Ctrl+C stopping a reply and returning to the prompt.
#
# The model is the tiny random-weight demo model (scripts/make-run.sh builds the same file): its replies never
# end on their own (EOS is one token in 129,280), so every turn is ended with Ctrl+C, which is the point.
#
# Usage: scripts/chat-tmux-test.sh [BUILD_DIR]     exit 0 = all checks passed; the final screen is printed.
set -euo pipefail
BUILD=${1:-build/release}
BIN="$(cd "$(dirname "$BUILD/dsv4")" && pwd)/dsv4"
MODEL="$BUILD/dsv4-tiny.gguf"
command -v tmux >/dev/null || { echo "chat-tmux-test: SKIP (tmux not installed)"; exit 0; }
[ -x "$BIN" ] || { echo "chat-tmux-test: $BIN not built" >&2; exit 1; }
# Rebuilt when the binary is newer: a model from an older build may use an older layout.
if [ ! -f "$MODEL" ] || [ "$BIN" -nt "$MODEL" ]; then
  "$BIN" synth --shape tiny --seed 1 --out "$MODEL.tmp" >/dev/null 2>&1
  mv "$MODEL.tmp" "$MODEL"
fi
MODEL="$(cd "$(dirname "$MODEL")" && pwd)/$(basename "$MODEL")"
S="dsv4-chat-test-$$"
LOG=$(mktemp)
cleanup() { tmux kill-session -t "$S" 2>/dev/null || true; rm -f "$LOG"; }
trap cleanup EXIT

screen() { tmux capture-pane -p -t "$S" -S -1000; }
fail() { echo "chat-tmux-test: FAIL: $*" >&2; echo "---- screen ----" >&2; screen >&2; exit 1; }
# wait_for PATTERN COUNT SECONDS: until the screen holds COUNT lines matching PATTERN.
wait_for() {
  local pat=$1 count=$2 secs=$3 i
  for ((i = 0; i < secs * 10; i++)); do
    [ "$(screen | grep -cE -- "$pat" || true)" -ge "$count" ] && return 0
    sleep 0.1
  done
  fail "timed out waiting for $count x /$pat/"
}

tmux new-session -d -s "$S" -x 160 -y 50 "'$BIN' run -m '$MODEL' --seed 7 --no-color; echo '[dsv4 exited]'; sleep 30"
wait_for '^dsv4 chat \[think' 1 60
wait_for '^>( |$)' 1 10

# Turn 1 (thinking): let it generate, then Ctrl+C.
tmux send-keys -t "$S" 'Hello there' Enter
sleep 2
tmux send-keys -t "$S" C-c
wait_for '^\[interrupted\]' 1 30
wait_for '\| think \| interrupted\]' 1 10
wait_for '^>( |$)' 2 10

# Switch thinking off; turn 2.
tmux send-keys -t "$S" '/nothink' Enter
wait_for '^\[nothink, ctx' 1 10
tmux send-keys -t "$S" 'Second question' Enter
sleep 2
tmux send-keys -t "$S" C-c
wait_for '\| nothink \| interrupted\]' 1 30

# Back on; turn 3.
tmux send-keys -t "$S" '/think' Enter
wait_for '^\[think, ctx' 1 10
tmux send-keys -t "$S" 'Third' Enter
sleep 2
tmux send-keys -t "$S" C-c
wait_for '\| think \| interrupted\]' 2 30

# Multi-turn on one session: later turns evaluate only the new message (a handful of tokens, not the whole
# conversation), and the context position only grows.
mapfile -t prompts < <(screen | grep -oE '^\[prompt [0-9]+' | grep -oE '[0-9]+')
mapfile -t ctxs < <(screen | grep -oE '\| ctx [0-9]+' | grep -oE '[0-9]+')
[ "${#prompts[@]}" -eq 3 ] || fail "expected 3 status lines, saw ${#prompts[@]}"
for i in 1 2; do
  [ "${prompts[$i]}" -le 8 ] || fail "turn $((i + 1)) re-evaluated ${prompts[$i]} tokens (expected only the new message)"
  [ "${ctxs[$i]}" -gt "${ctxs[$((i - 1))]}" ] || fail "context did not grow: ${ctxs[*]}"
done

# Ctrl+C at the prompt clears the line instead of quitting; then /quit leaves.
tmux send-keys -t "$S" 'half typed' C-c
sleep 0.5
tmux send-keys -t "$S" '/quit' Enter
wait_for '^\[dsv4 exited\]' 1 10
[ "$(screen | grep -cE '^\[prompt ')" -eq 3 ] || fail "Ctrl+C at the prompt sent the half-typed line"
echo "---- final screen ----"
screen | sed '/^$/d'
echo "chat-tmux-test: PASS (3 turns on one session: prompt tokens ${prompts[*]}, ctx ${ctxs[*]}; /nothink, /think, Ctrl+C)"
