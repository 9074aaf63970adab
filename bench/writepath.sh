#!/usr/bin/env bash
# Server CPU and syscalls per delivery at W1 rate 10 (10 rooms x 100, one sender
# per room at 10 msg/s: 10,000 deliveries/s), for chatd at several git revisions
# and the kit's Go + gorilla peer, alternating in one run.
#
#   bench/writepath.sh [-r ROUNDS] [-o OUT] [-L RATES] REV...     e.g. bench/writepath.sh main write
#
# Each REV of this repository is exported (git archive) to a temporary tree
# and started as users start it, on CPU 0, with the shared .venv:
#   PYTHONPATH=TREE twistd -n --pidfile= chatd --ws tcp:PORT ... --data-dir ''
#   --max-message-rate 0 --max-connection-rate 0 --max-connections-per-ip 0 --max-connections 20000
# The kit's load generator runs on CPU 1. Per server and round:
#   1. a measured step (-duration 10s): deliveries/s, p50/p99, server CPU % from /proc;
#   2. a second step with `perf stat` counting the server's syscalls for COUNT_S
#      seconds (skipped if perf is missing): syscalls per delivery, by kind.
#   3. with -L 10,20,40,...: the W1 ladder at those rates instead of steps 1-2
#      (sustained = the last rate with p99 < 50 ms and no loss).
# One JSON line per step is appended to OUT (default
# bench/results/<date>-writepath.jsonl); a summary table is printed at the end.
# SHAPE=chat runs the same 10,000 deliveries/s in W2's shape (see below).
# Run it under `flock /tmp/bench.lock` on a shared machine. Loopback only;
# stops only the PIDs it started.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
BENCH="${BENCH:-/tmp/bench}"
ROUNDS=1
OUT="$HERE/results/$(date +%Y%m%d)-writepath.jsonl"
LADDER=""
while getopts "r:o:L:" opt; do
  case $opt in r) ROUNDS="$OPTARG" ;; o) OUT="$OPTARG" ;; L) LADDER="$OPTARG" ;; *) exit 2 ;; esac
done
shift $((OPTIND - 1))
[ $# -gt 0 ] || { echo "usage: $0 [-r ROUNDS] [-o OUT] REV..." >&2; exit 2; }
PORT="${PORT:-9460}"
COUNT_S="${COUNT_S:-5}"
ulimit -n "$(ulimit -Hn)"
WORK="$(mktemp -d /tmp/writepath-XXXXXX)"
PID=""
stop() { [ -n "$PID" ] || return 0; kill -TERM "$PID" 2>/dev/null || true
  for _ in $(seq 150); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; PID=""; }
trap 'stop; rm -rf "$WORK"' EXIT

declare -A TREE
for rev in "$@"; do
  TREE[$rev]="$WORK/tree-${rev//\//_}"
  mkdir -p "${TREE[$rev]}"
  git -C "$ROOT" archive "$rev" | tar -x -C "${TREE[$rev]}"
  echo "$rev = $(git -C "$ROOT" rev-parse --short "$rev")" >&2
done

start() { # name cmd...
  local name="$1"; shift
  taskset -c 0 "$@" >>"$WORK/$name.log" 2>&1 &
  PID=$!
  for _ in $(seq 300); do
    ss -Hltn "sport = :$PORT" | grep -q LISTEN && { sleep 0.3; return 0; }
    kill -0 "$PID" 2>/dev/null || { echo "$name exited; see its log:" >&2; cat "$WORK/$name.log" >&2; return 1; }
    sleep 0.1
  done
  echo "$name did not listen" >&2; return 1
}

# SHAPE=chat: the same 10,000 deliveries/s in W2's shape (1,000 rooms x 5, every
# client sending 0.4 msg/s: 2,000 messages in a second instead of 100).
if [ "${SHAPE:-w1}" = chat ]; then
  LOAD="-rooms 1000 -clients-per-room 5 -senders-per-room 5 -rate 0.4 -connect-rate 1000"; PRE=9; TAG=chat
else
  LOAD="-rooms 10 -clients-per-room 100 -senders-per-room 1 -rate 10"; PRE=4; TAG=W1
fi

loadgen() { # tag duration extra...
  local tag="$1" duration="$2"; shift 2
  # shellcheck disable=SC2086
  taskset -c 1 "$BENCH/loadgen/loadgen" -url "ws://127.0.0.1:$PORT/ws" $LOAD \
    -warmup 2s -duration "$duration" -drain 3s -payload 128 \
    -server-pid "$PID" -tag "$tag" -peer "$peer" -run-id "$run_id" -max-total 3m "$@" 2>>"$WORK/loadgen.log" \
    | tail -n 1
}

for r in $(seq "$ROUNDS"); do
  run_id="$(date +%Y%m%dT%H%M%S)-r$r"
  for peer in "$@" go-gorilla; do
    if [ "$peer" = go-gorilla ]; then
      start go-gorilla "$BENCH/peers/go-gorilla/go-gorilla" -addr "127.0.0.1:$PORT"
    else
      tree="${TREE[$peer]}"
      PYTHONPATH="$tree" start "chatd-$r" "$ROOT/.venv/bin/twistd" -n --pidfile= -l "$WORK/chatd-twistd.log" chatd \
        --ws "tcp:$PORT:interface=127.0.0.1" --signalr tcp:0:interface=127.0.0.1 --web tcp:0:interface=127.0.0.1 \
        --grpc 127.0.0.1:0 --data-dir '' --max-connections-per-ip 0 --max-connection-rate 0 \
        --max-message-rate 0 --max-connections 20000
    fi
    echo "$(date +%T) $peer ($PID) round $r" >&2
    if [ -n "$LADDER" ]; then
      taskset -c 1 "$BENCH/loadgen/loadgen" -url "ws://127.0.0.1:$PORT/ws" -rooms 10 -clients-per-room 100 \
        -senders-per-room 1 -rates "$LADDER" -warmup 2s -duration 5s -drain 3s -payload 128 -max-p99 50 \
        -retries 1 -server-pid "$PID" -tag W1 -peer "$peer" -run-id "$run_id" -max-total 8m -out "$OUT" \
        >/dev/null 2>>"$WORK/loadgen.log" || true
      stop
      continue
    fi
    line="$(loadgen "$TAG-10k" 10s)"
    echo "$line" >>"$OUT"
    if command -v perf >/dev/null; then
      # Syscalls counted by the kernel's tracepoints (perf stat: no ptrace
      # stops, unlike strace -c, which slowed the server into a backlog), in a
      # second step, once the 1,000 clients are connected and sending (1 s of
      # connects, 1 s settle, 2 s warmup), over COUNT_S seconds of steady load.
      loadgen "$TAG-10k-syscalls" "$((COUNT_S + PRE))s" >"$WORK/sline" &
      lpid=$!
      sleep "$PRE"
      perf stat -x, -o "$WORK/perf.txt" -p "$PID" -e raw_syscalls:sys_enter,syscalls:sys_enter_sendto \
        -e syscalls:sys_enter_write,syscalls:sys_enter_epoll_ctl,syscalls:sys_enter_recvfrom,syscalls:sys_enter_read \
        -- sleep "$COUNT_S" 2>/dev/null || true
      wait "$lpid" || true
      "$ROOT/.venv/bin/python" - "$WORK/perf.txt" "$(cat "$WORK/sline")" "$COUNT_S" >>"$OUT" <<'EOF'
import json, sys
path, line, seconds = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3])
calls = {}
for row in open(path):
    f = row.strip().split(",")
    if len(f) > 2 and f[0].isdigit():
        calls[f[2].split(":")[-1].replace("sys_enter_", "")] = int(f[0])
deliveries = line["deliveries_per_s"] * seconds
per = {k: round(v / deliveries, 3) for k, v in calls.items()}
line.update(mode="syscalls", syscalls=calls, syscalls_per_delivery=per.pop("sys_enter", None), per_delivery=per)
print(json.dumps(line))
EOF
    fi
    stop
  done
done

"$ROOT/.venv/bin/python" - "$OUT" "$(date +%Y%m%d)" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rows = [r for r in rows if str(r.get("run_id", "")).startswith(sys.argv[2])]
shape = lambda r: "chat" if r.get("tag", "").startswith("chat") else "W1"
keys = list(dict.fromkeys((r["peer"], shape(r)) for r in rows))
print("| server | load | CPU µs/delivery | CPU % at 10k/s | syscalls/delivery | p50 ms | p99 ms | runs |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for p, sh in keys:
    mine = [r for r in rows if r["peer"] == p and shape(r) == sh]
    ladder = [r for r in mine if r.get("tag") == "W1"]
    if ladder:
        ok = [r["rate"] for r in ladder if r.get("pass")]
        print(f'| {p} | W1 ladder | sustained {max(ok) if ok else 0:g} msg/s per sender | | | | | |')
    m = [r for r in mine if r.get("tag") in ("W1-rate10", "W1-10k", "chat-10k")]
    s = [r for r in mine if r.get("mode") == "syscalls"]
    if not m:
        continue
    med = lambda k, rs=m: statistics.median(r[k] for r in rs)
    us = statistics.median(r["server_cpu_pct"] / 100 / r["deliveries_per_s"] * 1e6 for r in m)
    sc = f'{statistics.median(r["syscalls_per_delivery"] for r in s):.2f}' if s else "-"
    print(f'| {p} | {sh} 10k/s | {us:.1f} | {med("server_cpu_pct"):.0f} | {sc} | {med("p50_ms"):.1f} | {med("p99_ms"):.1f} | {len(m)} |')
EOF
