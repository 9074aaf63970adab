"""``python -m bench``: start each server, run each workload, print one JSON line per step and a summary.

    python -m bench                                    # chatd, W1 W2 W3 W4 at the kit's sizes
    python -m bench W1 --peer chatd --peer go-gorilla --server-cpu 0 --client-cpu 1
    python -m bench W1 --client loadgen                # the kit's Go load generator as the client
    python -m bench W1 --redis-server --chatd-args '--workers 2 --redis {REDIS}'
    python -m bench W1 --quick                         # a short smoke run (figures mean little)
    python -m bench --table results.jsonl              # the README's Markdown table from saved lines

Everything is on 127.0.0.1 and bounded: each server is started fresh per
workload and stopped by its PID, each workload has a time limit and the whole
run a watchdog (``--max-total``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import signal
import sys
import time
import uuid
from pathlib import Path

from bench import report
from bench.servers import KIT, Server
from bench.workloads import W4_KINDS, WORKLOADS

DEFAULT_RATES = "10,20,40,50,60,70,80,90,100,110,120,135,150,175,200,250,300,400"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_epilog())
    p.add_argument("workloads", nargs="*", help="workloads to run (default: W1 W2 W3 W4)")
    p.add_argument("--peer", action="append", dest="peers", metavar="SERVER",
                   help="chatd (default), a kit peer (go-gorilla, py-autobahn-prepared, …), NAME='command {PORT}' "
                        "or NAME=ws://127.0.0.1:PORT/ws; repeat for side-by-side runs")
    p.add_argument("--chatd-args", default="", help="extra chatd options, e.g. '--workers 2 --redis redis://…'")
    p.add_argument("--redis-server", action="store_true",
                   help="start a fresh redis-server per workload; {REDIS} in --chatd-args is its URL")
    p.add_argument("--server-cpu", help="pin each server with taskset -c (e.g. 0, or 0,1)")
    p.add_argument("--client-cpu", help="pin the client processes (e.g. 1)")
    p.add_argument("--client-procs", type=int, default=0, help="client processes (default: one per client CPU)")
    p.add_argument("--client", choices=["py", "loadgen"], default="py",
                   help="py: this package's client; loadgen: the kit's Go load generator (W1-W3)")
    p.add_argument("--loadgen", default=str(KIT / "loadgen" / "loadgen"))
    p.add_argument("--rooms", type=int, default=10, help="W1/W4 rooms")
    p.add_argument("--room-size", type=int, default=100, help="W1/W4 clients per room, sender included")
    p.add_argument("--senders", type=int, default=1, help="W1/W4 senders per room")
    p.add_argument("--rates", default=DEFAULT_RATES, help="W1/W4 ladder, msg/s per sender")
    p.add_argument("--warmup", type=float, default=2)
    p.add_argument("--duration", type=float, default=5)
    p.add_argument("--drain", type=float, default=3)
    p.add_argument("--settle", type=float, default=1)
    p.add_argument("--retries", type=int, default=1)
    p.add_argument("--max-p99", type=float, default=50, help="W1/W4 pass rule, ms")
    p.add_argument("--w4-kinds", default=",".join(W4_KINDS),
                   help="W4 receiver kinds, spread evenly over each room (one kind alone tells its cost)")
    p.add_argument("--payload", type=int, default=128)
    p.add_argument("--connect-rate", type=float, default=1000, help="new connections per second")
    p.add_argument("--w2-rooms", type=int, default=1000)
    p.add_argument("--w2-warmup", type=float, default=5)
    p.add_argument("--w2-duration", type=float, default=20)
    p.add_argument("--idle", type=int, default=5000, help="W3 connections")
    p.add_argument("--idle-hold", type=float, default=10, help="W3 hold, s")
    p.add_argument("--storm-clients", type=int, default=10_000, help="W5 clients")
    p.add_argument("--storm-backoff", default="browser,signalr,full-jitter+socket",
                   help="W5: one storm per reconnect schedule (browser, signalr, full-jitter); "
                        "+socket: with the port socket-activated as chatd.socket does")
    p.add_argument("--grpc-steps", default="500,1000,2000,4000", help="grpc-streams steps")
    p.add_argument("--quick", action="store_true", help="small, short steps: a smoke run")
    p.add_argument("--max-total", type=float, default=900, help="watchdog for the whole run, s")
    p.add_argument("--out", help="append every JSON line to this file too")
    p.add_argument("--run-id", default=time.strftime("%Y%m%dT%H%M%S"))
    p.add_argument("--table", nargs="+", metavar="JSONL", help="print the Markdown table of saved runs and exit")
    p.add_argument("--ref", default="go-gorilla", help="--table: the peer ratios are taken to")
    p.add_argument("--only-run", action="append", metavar="RUN_ID",
                   help="--table: only lines of these run ids (default: the newest run per server and workload)")
    args = p.parse_args(argv)
    if args.quick:
        args.rates, args.warmup, args.duration, args.drain, args.retries = "10,40", 1, 2, 2, 0
        args.w2_rooms, args.w2_warmup, args.w2_duration, args.idle, args.idle_hold = 200, 2, 4, 1000, 3
        args.storm_clients = 500
    args.rates = [float(r) for r in str(args.rates).split(",")]
    args.w4_kinds = [k for k in args.w4_kinds.split(",") if k]
    unknown = sorted(set(args.w4_kinds) - set(W4_KINDS))
    if unknown or not args.w4_kinds:
        p.error(f"--w4-kinds: expected some of {','.join(W4_KINDS)}, not {args.w4_kinds}")
    args.peers = args.peers or ["chatd"]
    args.workloads = args.workloads or ["W1", "W2", "W3", "W4"]
    for w in args.workloads:
        if w not in WORKLOADS:
            p.error(f"unknown workload {w}; known: {', '.join(WORKLOADS)}")
    return args


def _epilog() -> str:
    return "workloads:\n" + "\n".join(f"  {w.name:<13} {w.help}" for w in WORKLOADS.values())


def emit(line: dict, out: str | None) -> None:
    text = json.dumps(line, separators=(",", ":"))
    print(text, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(text + "\n")


def run(args: argparse.Namespace) -> list[dict]:
    lines: list[dict] = []
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.client_cpu and args.client == "py":
        os.sched_setaffinity(0, [int(c) for c in args.client_cpu.replace("-", ",").split(",")])
    for peer in args.peers:
        for name in args.workloads:
            wl = WORKLOADS[name]
            base = {"run_id": args.run_id, "peer": peer.partition("=")[0], "tag": name,
                    "client": args.client, "server_cpu_set": args.server_cpu, "client_cpu_set": args.client_cpu}
            if peer.partition("=")[0] == "chatd" and args.chatd_args:
                base["chatd_args"] = args.chatd_args
            if wl.chatd_only and peer != "chatd":
                continue
            server = None
            t0 = time.monotonic()
            try:
                if not wl.own_server:
                    server = Server(peer, args.server_cpu, shlex.split(args.chatd_args),
                                    redis=args.redis_server and peer == "chatd")
                    server.start()
                    base["server_pid"] = server.pid
                cpu0 = server.cpu() if server and server.pid else None
                print(f"{time.strftime('%H:%M:%S')} bench: {peer.partition('=')[0]} {name}", file=sys.stderr)
                for step in wl.run(args, server):
                    line = {**base, **step, "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                    emit(line, args.out)
                    lines.append(line)
                    if server and not server.alive():
                        raise RuntimeError("server died during the workload")
                if server and server.pid:
                    rss, hwm = server.memory()
                    line = {**base, "mode": "server_summary", "wall_s": round(time.monotonic() - t0, 1),
                            "server_cpu_s": round(server.cpu() - cpu0, 2), "server_hwm_kb": hwm,
                            "server_rss_kb": rss, "server_procs": len(server.pids())}
                    emit(line, args.out)
                    lines.append(line)
            except Exception as exc:  # one failing workload must not hide the others' figures
                line = {**base, "mode": "error", "error": f"{type(exc).__name__}: {exc}"}
                emit(line, args.out)
                lines.append(line)
            finally:
                if server:
                    server.stop()
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.table:
        lines = [json.loads(x) for f in args.table for x in Path(f).read_text().splitlines() if x.startswith("{")]
        if args.only_run:
            lines = [x for x in lines if x.get("run_id") in args.only_run]
        print(report.markdown(lines, args.ref))
        return 0
    args.run_id = args.run_id or uuid.uuid4().hex[:8]
    signal.signal(signal.SIGALRM, _watchdog)
    signal.alarm(int(args.max_total))
    lines = run(args)
    signal.alarm(0)
    print(report.summary(lines), file=sys.stderr)
    return 1 if any(line.get("mode") == "error" for line in lines) else 0


class Watchdog(BaseException):
    """``--max-total`` expired: not an ``Exception``, so no workload's handler swallows it."""


def _watchdog(signum: int, frame: object) -> None:
    raise Watchdog("--max-total expired")


if __name__ == "__main__":
    sys.exit(main())
