#!/usr/bin/env bash
# A new user's first `make up`, timed: a fresh clone of this repository with
# empty caches (its own `.venv`, `var/models`, `target/`, a new CARGO_HOME so
# the crate registry is downloaded again, pip's cache off so torch is too),
# each output line stamped with the seconds since the clone, and a chat turn
# sent every 5 s until the gateway answers one. The table README.md's
# "Fresh machine" section records comes from the stamps printed at the end.
#
#   bash scripts/measure-fresh-up.sh [WORKDIR]   (default: a new /tmp dir)
#
# Needs the ports `moltbot up` uses (8080, 50051-50056, 6379 or its own
# Redis) free, and nothing else running if the timings are to mean anything.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d /tmp/moltbot-fresh.XXXXXX)}"
mkdir -p "$work"
log="$work/up.log"
start=$(date +%s.%N)
stamp() { awk -v s="$start" '{ "date +%s.%N" | getline now; close("date +%s.%N"); printf "[%7.1f s] %s\n", now - s, $0; fflush() }'; }

git clone --quiet "$repo" "$work/moltbot"
export CARGO_HOME="$work/cargo-home"
mkdir -p "$CARGO_HOME"
# The toolchain itself stays rustup's; only the registry and git caches move.
export PIP_NO_CACHE_DIR=1
unset CARGO_TARGET_DIR VIRTUAL_ENV MOLTBOT_MODELS_DIR LD_LIBRARY_PATH
cd "$work/moltbot"
( make up 2>&1 | stamp >"$log" ) &
up=$!

answered=""
while kill -0 "$up" 2>/dev/null; do
  sleep 5
  if curl -sf --max-time 120 http://127.0.0.1:8080/v1/chat/completions \
      -H 'content-type: application/json' \
      -d '{"model": "default", "messages": [{"role": "user", "content": "What is MoltBot?"}], "max_tokens": 16}' \
      >"$work/answer.json" 2>/dev/null; then
    answered=$(awk -v s="$start" 'BEGIN { "date +%s.%N" | getline now; printf "%.1f", now - s }')
    break
  fi
done
echo "first answer after ${answered:-never} s (clone at 0 s); the answer: $work/answer.json"
# The steps' first lines, for the table.
grep -E "ml-venv: installing|Compiling |Finished|prepare-model: .*(copied|assembled)|up: |int4|model loaded|serving" "$log" \
  | awk '!seen[$3 $4]++' | head -40 || true
echo "log: $log (stop the mesh with: kill $up; pkill -f target/release/moltbot)"
