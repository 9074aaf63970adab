"""The workloads, by name. Each one is a function that drives a started server and yields JSON-able steps.

Shapes follow the shared kit's load generator (same rooms, rates, windows,
pass rule), so figures line up with it:

* W1 fan-out ladder: rooms of N receivers, one sender each, per-sender rates
  in increasing steps on the same connections; a step passes with p99 under
  ``--max-p99`` ms, no loss, no disconnect and the send rate reached; the
  ladder stops after a step fails ``1 + --retries`` times. "sustained" is the
  highest passing rate.
* W2 chat: 1,000 rooms x 5 clients, every client sends 1 msg/s.
* W3 idle: connections joined in rooms of 5, held; server RSS growth per connection.
* W4: W1 with the senders on gRPC ``Chat`` streams and the receivers split over
  plain WebSocket, SignalR (JSON, MessagePack) and gRPC ``StreamMessages`` /
  ``Chat`` streams (chatd only).
* W5: the reconnect storm of ``bench/storm.py`` (it starts chatd itself).
* grpc-streams: how many gRPC streams one process holds (``bench/grpc_streams.py``).

Other modules add workloads with :func:`register` (e.g. a memory workload).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.client import Conn
from bench.pool import ClientPool, client_cpus, default_procs
from bench.servers import KIT, ROOT, Server

Step = dict
Runner = Callable[[argparse.Namespace, Server | None], Iterator[Step]]


@dataclass
class Workload:
    """A named workload: ``own_server`` ones start their server themselves; ``chatd_only`` ones need chatd."""

    name: str
    run: Runner
    help: str
    own_server: bool = False
    chatd_only: bool = False


WORKLOADS: dict[str, Workload] = {}


def register(name: str, help: str, own_server: bool = False, chatd_only: bool = False) -> Callable[[Runner], Runner]:
    """Add a workload to ``python -m bench``; the hook other bench modules use."""

    def deco(fn: Runner) -> Runner:
        WORKLOADS[name] = Workload(name, fn, help, own_server, chatd_only)
        return fn

    return deco


def _pool(args: argparse.Namespace, server: Server, grpc_procs: int = 0) -> ClientPool:
    from bench import client

    if client.ws_connect is None:
        raise RuntimeError("the load client needs picows and uvloop: pip install '.[bench]'")
    cpus = client_cpus(args.client_cpu)
    procs = args.client_procs or default_procs(cpus)
    return ClientPool(server.urls, procs, cpus, args.payload, grpc_procs=grpc_procs)


def _ladder(args: argparse.Namespace, server: Server, conns: list[Conn], tag: str, grpc_procs: int = 0) -> Iterator[Step]:
    pool = _pool(args, server, grpc_procs)
    try:
        connected = pool.connect(conns, args.connect_rate)
        yield {"mode": "connect", **connected, "server_threads": server.threads() if server.pid else None}
        if connected["conns_failed"] and not connected["conns_ok"]:
            return
        time.sleep(args.settle)
        sustained = 0.0
        steps = 0
        for n, rate in enumerate(args.rates, 1):
            passed = False
            for attempt in range(1, 2 + args.retries):
                r = pool.step(rate, args.warmup, args.duration, args.drain, seed=n * 1000 + attempt, server=server)
                steps += 1
                reasons = []
                if connected["conns_failed"]:
                    reasons.append("connect failures")
                if r["lost"]:
                    reasons.append("loss")
                if r["p99_ms"] > args.max_p99:
                    reasons.append("p99")
                if r["disconnects"] or r["write_errors"]:
                    reasons.append("disconnects/write errors")
                senders = sum(1 for c in conns if c.sender >= 0)
                if r["sent"] < 0.95 * rate * args.duration * senders:
                    reasons.append("send rate below target")
                if not r["received"]:
                    reasons.append("nothing received")
                passed = not reasons
                r.update(mode="fanout", step=n, attempt=attempt, rooms=args.rooms, clients_per_room=args.room_size,
                         conns_ok=connected["conns_ok"], conns_failed=connected["conns_failed"],
                         client_saturated=r["client_max_proc_cpu_pct"] > 90, **{"pass": passed},
                         fail_reason=",".join(reasons))
                yield r
                pool.quiesce()
                if passed or r["disconnects"] or r["write_errors"]:
                    break
            if passed:
                sustained = rate
            elif len(args.rates) > 1:
                break
        yield {"mode": "ladder_summary", "sustained_rate": sustained, "steps": steps}
    finally:
        pool.close()


def _fanout_conns(args: argparse.Namespace, kinds: list[str] | None = None, sender_kind: str = "ws") -> list[Conn]:
    conns = []
    for room in range(args.rooms):
        for k in range(args.room_size):
            user = room * args.room_size + k
            if k < args.senders:
                conns.append(Conn(sender_kind, room, user, sender=room * args.senders + k))
            else:
                kind = kinds[(k - args.senders) % len(kinds)] if kinds else "ws"
                conns.append(Conn(kind, room, user))
    return conns


@register("W1", "fan-out ladder: rooms of N receivers, one sender each, increasing rates")
def w1(args: argparse.Namespace, server: Server | None) -> Iterator[Step]:
    if args.client == "loadgen":
        yield from loadgen(args, server, ["-rooms", args.rooms, "-clients-per-room", args.room_size,
                                          "-senders-per-room", args.senders,
                                          "-rates", ",".join(f"{r:g}" for r in args.rates), "-warmup", f"{args.warmup}s",
                                          "-duration", f"{args.duration}s", "-drain", f"{args.drain}s",
                                          "-payload", args.payload, "-max-p99", args.max_p99, "-retries", args.retries])
        return
    yield from _ladder(args, server, _fanout_conns(args), "W1")


W4_KINDS = ["ws", "signalr-json", "signalr-msgpack", "grpc-stream", "grpc-chat"]


@register("W4", "W1 with gRPC Chat senders; receivers over WebSocket, SignalR JSON/MessagePack, gRPC streams",
          chatd_only=True)
def w4(args: argparse.Namespace, server: Server | None) -> Iterator[Step]:
    kinds = getattr(args, "w4_kinds", None) or W4_KINDS
    conns = _fanout_conns(args, kinds, sender_kind="grpc-chat")
    yield {"mode": "mix", **{k: sum(1 for c in conns if c.kind == k) for k in W4_KINDS}}
    yield from _ladder(args, server, conns, "W4", grpc_procs=1)


@register("W2", "chat: rooms x 5 clients, every client sends 1 msg/s")
def w2(args: argparse.Namespace, server: Server | None) -> Iterator[Step]:
    rooms, size = args.w2_rooms, 5
    if args.client == "loadgen":
        yield from loadgen(args, server, ["-rooms", rooms, "-clients-per-room", size, "-senders-per-room", size,
                                          "-rate", 1, "-warmup", f"{args.w2_warmup}s", "-duration",
                                          f"{args.w2_duration}s", "-drain", "5s", "-settle", "2s",
                                          "-payload", args.payload, "-connect-rate", args.connect_rate])
        return
    conns = [Conn("ws", r, r * size + k, sender=r * size + k) for r in range(rooms) for k in range(size)]
    pool = _pool(args, server)
    try:
        connected = pool.connect(conns, args.connect_rate)
        yield {"mode": "connect", **connected}
        time.sleep(2)
        r = pool.step(1, args.w2_warmup, args.w2_duration, 5, seed=1, server=server)
        r.update(mode="chat", rooms=rooms, clients_per_room=size, conns_ok=connected["conns_ok"],
                 conns_failed=connected["conns_failed"], client_saturated=r["client_max_proc_cpu_pct"] > 90,
                 **{"pass": not r["lost"] and not connected["conns_failed"]})
        yield r
    finally:
        pool.close()


@register("W3", "idle connections joined in rooms of 5, held; server RSS per connection")
def w3(args: argparse.Namespace, server: Server | None) -> Iterator[Step]:
    n = args.idle
    if args.client == "loadgen":
        yield from loadgen(args, server, ["-idle", n, "-clients-per-room", 5, "-duration", f"{args.idle_hold}s",
                                          "-connect-rate", args.connect_rate])
        return
    base, _ = server.memory()
    c0 = server.cpu()
    pool = _pool(args, server)
    try:
        connected = pool.connect([Conn("ws", i // 5, i) for i in range(n)], args.connect_rate)
        end = time.monotonic() + args.idle_hold
        hold_max = rss = 0
        while time.monotonic() < end:
            time.sleep(0.25)
            rss, _ = server.memory()
            hold_max = max(hold_max, rss)
        counts = pool._all({"cmd": "counts"})
        _, hwm = server.memory()
        ok = connected["conns_ok"]
        yield {"mode": "idle", "rooms": (n + 4) // 5, "clients_per_room": 5, **connected,
               "duration_s": args.idle_hold, "server_cpu_s": round(server.cpu() - c0, 3),
               "server_rss_base_kb": base, "server_rss_kb": rss, "server_rss_hold_max_kb": hold_max,
               "server_hwm_kb": hwm, "server_rss_per_conn_kb": round((rss - base) / ok, 2) if ok else None,
               "frames_received": sum(c["frames"] for c in counts), "server_threads": server.threads(),
               "pass": not connected["conns_failed"]}
    finally:
        pool.close()


def loadgen(args: argparse.Namespace, server: Server | None, flags: list) -> Iterator[Step]:
    """Run the kit's Go load generator with these flags; its JSON lines become steps."""
    binary = Path(args.loadgen)
    if not binary.exists():
        raise RuntimeError(f"{binary} is not built (see {KIT}/README.md)")
    argv = [str(binary), "-url", server.urls["ws"], *map(str, flags), "-server-pid", str(server.pid or 0),
            "-max-total", "10m"]
    if args.client_cpu:
        argv = ["taskset", "-c", args.client_cpu, *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if not line.startswith("{"):
                continue
            r = json.loads(line)
            for k in ("run_id", "peer", "tag", "ts", "url"):
                r.pop(k, None)
            r["client_cpu_pct"] = r.pop("loadgen_cpu_pct", None)
            r["client_saturated"] = r.pop("loadgen_saturated", None)
            if r.get("received") and r.get("server_cpu_s"):
                r["server_cpu_us_per_delivery"] = round(1e6 * r["server_cpu_s"] / r["received"], 2)
            yield r
    finally:
        proc.wait(timeout=660)


@register("W5", "reconnect storm (bench/storm.py; starts chatd itself)", own_server=True, chatd_only=True)
def w5(args: argparse.Namespace, server: Server | None) -> Iterator[Step]:
    # One storm per reconnect schedule (the browser client's, the official SignalR
    # client's, ...); "+socket": the port passed in and kept as systemd's chatd.socket does.
    for spec in args.storm_backoff.split(","):
        policy, _, socket = spec.partition("+")
        yield from _script(args, ["bench/storm.py", "-n", str(args.storm_clients), "--backoff", policy]
                           + (["--socket-activation"] if socket else [])
                           + (["--server-cpu", args.server_cpu] if args.server_cpu else [])
                           + (["--client-cpu", args.client_cpu.split(",")[0]] if args.client_cpu else []))


@register("grpc-streams", "gRPC StreamMessages subscribers one process holds (bench/grpc_streams.py)",
          own_server=True, chatd_only=True)
def grpc_streams(args: argparse.Namespace, server: Server | None) -> Iterator[Step]:
    yield from _script(args, ["bench/grpc_streams.py", "--steps", args.grpc_steps, "--json"])


def _script(args: argparse.Namespace, argv: list[str]) -> Iterator[Step]:
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=args.max_total, env={"PYTHONPATH": str(ROOT), **_env()})
    sys.stderr.write(proc.stderr[-4000:])
    found = False
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            found = True
            yield json.loads(line)
    if not found:
        yield {"mode": "error", "error": f"{argv[0]} exited {proc.returncode} without a JSON line"}


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def _load_extra_workloads() -> None:
    """Import the bench modules that add workloads of their own (``register`` at import), if present."""
    import importlib
    import importlib.util

    for module in EXTRA_MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)


EXTRA_MODULES = ["bench.memory"]
"""Modules whose import registers more workloads; a new workload module adds its name here."""
_load_extra_workloads()
