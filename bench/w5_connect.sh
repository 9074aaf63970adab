#!/usr/bin/env bash
# W5's connect half against chatd and the kit's Go + gorilla peer, side by side.
#
# The Go peer cannot join with "since", so the kit's load generator compares
# only the connect part: 10,000 connections joined in rooms of 5, at 1,000
# new connections a second, held 5 s. Server pinned to CPU 0, loadgen to CPU 1.
#
#   bench/w5_connect.sh [ROUNDS] [OUT]     # defaults: 1, bench/results/<date>-w5-connect.jsonl
#
# Needs the shared kit built in $BENCH (default /tmp/bench: loadgen/loadgen and
# peers/go-gorilla/go-gorilla). Loopback only; stops only the PIDs it started.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
BENCH="${BENCH:-/tmp/bench}"
ROUNDS="${1:-1}"
OUT="${2:-$HERE/results/$(date +%Y%m%d)-w5-connect.jsonl}"
N="${N:-10000}"
PORT="${PORT:-9450}"
ulimit -n "$(ulimit -Hn)"
DATA="$(mktemp -d /tmp/w5-connect-XXXXXX)"
PID=""
stop() { [ -n "$PID" ] || return 0; kill -TERM "$PID" 2>/dev/null || true
  for _ in $(seq 150); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; PID=""; }
trap 'stop; rm -rf "$DATA"' EXIT

start() { # name cmd...
  local name="$1"; shift
  taskset -c 0 "$@" >>"$DATA/$name.log" 2>&1 &
  PID=$!
  for _ in $(seq 300); do
    ss -Hltn "sport = :$PORT" | grep -q LISTEN && { sleep 0.3; return 0; }
    kill -0 "$PID" 2>/dev/null || { echo "$name exited; see $DATA/$name.log" >&2; cat "$DATA/$name.log" >&2; return 1; }
    sleep 0.1
  done
  echo "$name did not listen" >&2; return 1
}

for r in $(seq "$ROUNDS"); do
  run_id="$(date +%Y%m%dT%H%M%S)-r$r"
  for peer in chatd go-gorilla; do
    if [ "$peer" = chatd ]; then
      rm -rf "$DATA/data"
      PYTHONPATH="$ROOT" start chatd "$ROOT/.venv/bin/twistd" -n --pidfile= -l "$DATA/chatd-twistd.log" chatd \
        --ws "tcp:$PORT:interface=127.0.0.1" --signalr tcp:0:interface=127.0.0.1 --web tcp:0:interface=127.0.0.1 \
        --grpc 127.0.0.1:0 --data-dir "$DATA/data" --max-connections-per-ip 0 --max-connection-rate 0 \
        --max-message-rate 0 --max-connections 20000
    else
      start go-gorilla "$BENCH/peers/go-gorilla/go-gorilla" -addr "127.0.0.1:$PORT"
    fi
    echo "$(date +%T) $peer ($PID) round $r" >&2
    taskset -c 1 "$BENCH/loadgen/loadgen" -url "ws://127.0.0.1:$PORT/ws" -idle "$N" -clients-per-room 5 \
      -connect-rate 1000 -duration 5s -server-pid "$PID" -tag W5-connect -peer "$peer" -run-id "$run_id" \
      -out "$OUT" -max-total 3m >/dev/null 2>>"$DATA/loadgen.log" || echo "loadgen failed for $peer" >&2
    stop
  done
done
echo "results appended to $OUT" >&2
