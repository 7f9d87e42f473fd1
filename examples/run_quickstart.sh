#!/usr/bin/env bash
# Start a rollout server in the background, run examples/quickstart.py against it, stop the server.
#
#   examples/run_quickstart.sh                 # embedded default model, a free port on 127.0.0.1
#   MODEL=/path/to/hf_model PORT=50051 examples/run_quickstart.sh
#
# Exits non-zero if the server fails to start, the quickstart fails, or the server does not stop cleanly.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
PORT="${PORT:-0}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
LOG="$(mktemp "${TMPDIR:-/tmp}/rollout-server.XXXXXX")"

args=(serve --host 127.0.0.1 --port "$PORT")
if [[ -n "${MODEL:-}" ]]; then
  args+=(--model "$MODEL")
fi
"$PYTHON" -m rollout "${args[@]}" >"$LOG" 2>&1 &
SERVER_PID=$!

stop_server() {
  local status=0
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID"
    wait "$SERVER_PID" || status=$?
  fi
  return "$status"
}

on_exit() {
  local status=$?
  trap - EXIT
  if ! stop_server; then
    echo "server did not stop cleanly" >&2
    status=1
  fi
  if [[ "$status" -ne 0 ]]; then
    echo "---- server log ($LOG)" >&2
    cat "$LOG" >&2
  else
    rm -f "$LOG"
  fi
  exit "$status"
}
trap on_exit EXIT

ADDR=""
for _ in $(seq 1 600); do
  if ADDR="$(grep -o 'listening on [^ ]*' "$LOG" | head -n 1 | cut -d' ' -f3)" && [[ -n "$ADDR" ]]; then
    break
  fi
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "the server exited during start" >&2
    exit 1
  fi
  sleep 0.2
done
if [[ -z "$ADDR" ]]; then
  echo "the server did not bind a port in 120 s" >&2
  exit 1
fi

"$PYTHON" "$ROOT/examples/quickstart.py" "$ADDR" --wait 300
