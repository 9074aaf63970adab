#!/usr/bin/env bash
# W5's connect half against chatd and the kit's Go + gorilla peer, side by side.
#
# The Go peer cannot join with "since", so the kit's load generator compares
# only the connect part: 10,000 connections joined in rooms of 5, at 1,000
# new connections a second, held 5 s. Server pinned to CPU 0, loadgen to CPU 1.
#
#   bench/w5_connect.sh [ROUNDS] [OUT]     # defaults: 1, bench/results/<date>-w5-connect.jsonl
#   TREES="main=/src/chatd-main new=/src/chatd" bench/w5_connect.sh 3
#   TREES="sqlite=. memory=." LABEL_ARGS="memory=--data-dir=" GO=0 bench/w5_connect.sh 2
#   FLOOR=1 bench/w5_connect.sh 2          # and bench/floor.py, the least a Twisted server does
#   FLOOR=presence bench/w5_connect.sh 2   # both floors: bench/floor.py, and with --presence (chatd's join and leave frames)
#   AUTOBAHN=1 bench/w5_connect.sh 2       # and the kit's bare Autobahn relay (py-autobahn-prepared, $BENCH_VENV)
#
# TREES names chatd source trees (label=path, each with its .venv) to measure
# in the same run, alternating their order every round; by default this tree,
# labelled "chatd". GO=0 leaves the Go peer out. RATE (default 1000) sets the
# connections a second: below what every server can take, CPU per connection
# compares the code alone (a saturated reactor handles more per wake-up). Each server gets the
# loadgen's line (server CPU for connect + join + the 5 s hold) and a
# "W5-connect-close" line: server CPU from before the first connection until
# the last one is closed, per connection.
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
RATE="${RATE:-1000}"
PORT="${PORT:-9450}"
TREES="${TREES:-chatd=$ROOT}"
# LABEL_ARGS="label=--opt value;label2=--other": more chatd options for one label
# (the same tree may then appear twice under two labels)
declare -A ARGS=()
IFS=';' read -r -a _label_args <<<"${LABEL_ARGS:-}"
for pair in "${_label_args[@]}"; do [ -n "$pair" ] && ARGS["${pair%%=*}"]="${pair#*=}"; done
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

cpu() { # CPU seconds of $PID so far: user + system, or field 12 (user) or 13 (system) alone
  awk -v hz="$(getconf CLK_TCK)" -v f="${1:-0}" '{ sub(/^.*\) /, ""); printf "%.2f", (f ? $f : $12 + $13) / hz }' "/proc/$PID/stat"
}

established() { ss -Htn state established "( sport = :$PORT )" | wc -l; }
# every socket of the port but the listener and TIME-WAIT (CLOSE-WAIT ones are still the server's work to do)
remaining() { ss -Htan "( sport = :$PORT )" | grep -vcE "LISTEN|TIME-WAIT" || true; }

read -r -a trees <<<"$TREES"
servers=()
for t in "${trees[@]}"; do servers+=("$t"); done
[ "${GO:-1}" = 0 ] || servers+=("go-gorilla=")
[ "${FLOOR:-0}" = 0 ] || servers+=("py-twisted-floor=")
[ "${FLOOR:-0}" != presence ] || servers+=("py-twisted-floor-presence=")
[ "${AUTOBAHN:-0}" = 0 ] || servers+=("py-autobahn-prepared=")

for r in $(seq "$ROUNDS"); do
  run_id="$(date +%Y%m%dT%H%M%S)-r$r"; [ "$RATE" = 1000 ] || run_id+="-at$RATE"
  # a different order every round, so no server always runs first
  k=$(( (r - 1) % ${#servers[@]} ))
  order=("${servers[@]:$k}" "${servers[@]:0:$k}")
  for server in "${order[@]}"; do
    label="${server%%=*}"; src="${server#*=}"; commit=""
    if [ "$label" = go-gorilla ]; then
      start go-gorilla "$BENCH/peers/go-gorilla/go-gorilla" -addr "127.0.0.1:$PORT"
    elif [ "$label" = py-twisted-floor ]; then
      start py-twisted-floor "$ROOT/.venv/bin/python" "$ROOT/bench/floor.py" "$PORT"
    elif [ "$label" = py-autobahn-prepared ]; then
      start py-autobahn-prepared "${BENCH_VENV:-/tmp/benchvenv}/bin/python" "$BENCH/peers/py-autobahn-twisted/server.py" \
        --port "$PORT" --mode prepared
    elif [ "$label" = py-twisted-floor-presence ]; then
      start py-twisted-floor-presence "$ROOT/.venv/bin/python" "$ROOT/bench/floor.py" "$PORT" --presence
    else
      rm -rf "$DATA/data"
      commit="$(git -C "$src" rev-parse --short HEAD 2>/dev/null || true)"
      PYTHONPATH="$src" start "$label" "$src/.venv/bin/twistd" -n --pidfile= -l "$DATA/$label-twistd.log" chatd \
        --ws "tcp:$PORT:interface=127.0.0.1" --signalr tcp:0:interface=127.0.0.1 --web tcp:0:interface=127.0.0.1 \
        --grpc 127.0.0.1:0 --data-dir "$DATA/data" --max-connections-per-ip 0 --max-connection-rate 0 \
        --max-message-rate 0 --max-connections 20000 ${ARGS[$label]:-}
    fi
    echo "$(date +%T) $label ($PID) round $r" >&2
    cpu0="$(cpu)"; user0="$(cpu 12)"; sys0="$(cpu 13)"
    taskset -c 1 "$BENCH/loadgen/loadgen" -url "ws://127.0.0.1:$PORT/ws" -idle "$N" -clients-per-room 5 \
      -connect-rate "$RATE" -duration 5s -server-pid "$PID" -tag W5-connect -peer "$label" -run-id "$run_id" \
      -out "$OUT" -max-total 3m >/dev/null 2>>"$DATA/loadgen.log" || echo "loadgen failed for $label" >&2
    for _ in $(seq 300); do [ "$(established)" -eq 0 ] && break; sleep 0.1; done
    left="$(established)"
    # and until the server has finished its side of every close (counted too)
    for _ in $(seq 300); do [ "$(remaining)" -eq 0 ] && break; sleep 0.1; done
    sleep 0.5  # the last closes' bookkeeping
    cpu1="$(cpu)"; user1="$(cpu 12)"; sys1="$(cpu 13)"
    printf '{"run_id":"%s","peer":"%s","tag":"W5-connect-close","connect_rate":%s,"src":"%s","commit":"%s","conns":%d,"still_open":%d,"server_cpu_s":%s,"server_cpu_per_conn_ms":%s,"user_per_conn_ms":%s,"sys_per_conn_ms":%s,"ts":"%s"}\n' \
      "$run_id" "$label" "$RATE" "$src" "$commit" "$N" "$left" "$(awk "BEGIN{printf \"%.2f\", $cpu1 - $cpu0}")" \
      "$(awk "BEGIN{printf \"%.3f\", 1000 * ($cpu1 - $cpu0) / $N}")" \
      "$(awk "BEGIN{printf \"%.3f\", 1000 * ($user1 - $user0) / $N}")" \
      "$(awk "BEGIN{printf \"%.3f\", 1000 * ($sys1 - $sys0) / $N}")" "$(date -u +%FT%TZ)" >>"$OUT"
    tail -2 "$OUT" | python3 -c 'import json,sys
for l in sys.stdin:
    d=json.loads(l); print("  ", d["tag"], {k: d.get(k) for k in ("conns_ok","conns_failed","handshake_p50_ms","handshake_p99_ms","server_cpu_s","server_cpu_per_conn_ms","user_per_conn_ms","sys_per_conn_ms")})' >&2
    stop
  done
done
echo "results appended to $OUT" >&2
