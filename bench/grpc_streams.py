"""How many concurrent gRPC ``StreamMessages`` subscribers one chatd holds while all receive.

Starts ``twistd -n chatd`` on loopback, opens subscribers in steps (all in one
room, from one asyncio client over several connections), and at each step
publishes a burst of messages with ``SendMessage`` and checks that every
subscriber got every message, in order. Reports per step: the time for the
whole burst to reach everyone, the server's threads and resident memory.
Stops at the first step that fails, at the last step, or at the time limit.

    .venv/bin/python bench/grpc_streams.py                 # steps up to 2000
    .venv/bin/python bench/grpc_streams.py --steps 250,500,1000 --messages 20
    .venv/bin/python bench/grpc_streams.py --grpc-server aio --steps 1000,10000 --json-out bench/results/x.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import grpc.aio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatd.grpc.generated import chat_pb2 as pb  # noqa: E402
from chatd.grpc.generated.chat_pb2_grpc import ChatServiceStub  # noqa: E402

ROOM = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(port: int, streams: int, kind: str = "threaded", log: str = "") -> subprocess.Popen:
    twistd = Path(sys.executable).with_name("twistd")
    argv = [
        str(twistd), "--nodaemon", "--pidfile=", "chatd",
        "--ws", "tcp:0:interface=127.0.0.1",
        "--signalr", "tcp:0:interface=127.0.0.1",
        "--web", "tcp:0:interface=127.0.0.1",
        "--grpc", f"127.0.0.1:{port}",
        "--grpc-server", kind,
        "--grpc-max-streams", str(streams),
        # (aio: workers are not used; threaded: one per stream, and some for unary calls)
        "--grpc-workers", str(streams + 64),
        "--max-connections", str(streams + 100),
        "--max-connections-per-ip", "0",  # every subscriber comes from 127.0.0.1
        "--history-limit", "1000",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (the server keeps it)
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


class Subscriber:
    def __init__(self, stub: ChatServiceStub, n: int) -> None:
        self.user = f"s{n}"
        self.seqs: list[int] = []
        self.call = stub.StreamMessages(pb.StreamRequest(room=ROOM, user=self.user))
        self.task = asyncio.ensure_future(self._read())
        self.error: str | None = None
        self.closing = False

    def close(self) -> None:
        self.closing = True
        self.call.cancel()

    async def _read(self) -> None:
        try:
            async for m in self.call:
                self.seqs.append(m.seq)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as e:
            # Any end before this client's own cancel at the end is a failure: a
            # CANCELLED from the server too (``call.cancelled()`` says True for it).
            if not self.closing:
                self.error = f"{e.code().name}: {e.details()}"


async def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)


async def run(args: argparse.Namespace) -> int:
    steps = [int(s) for s in args.steps.split(",")]
    port = free_port()
    server = start_server(port, max(steps), args.grpc_server, args.server_log)
    started = time.monotonic()
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(args.connections)
    ]
    stubs = [ChatServiceStub(c) for c in channels]
    control = stubs[0]
    subscribers: list[Subscriber] = []
    best = 0
    try:
        await wait_for(_ready(control), 30, "server did not start")
        idle_rss = int(proc_status(server.pid)["VmRSS"].split()[0])
        print(
            f"{'streams':>8} {'open s':>7} {'burst ms':>9} {'deliv/s':>8} {'srv cpu':>8} {'cli cpu':>8}"
            f" {'threads':>8} {'RSS MiB':>8}  result"
        )
        seq = 0
        for step in steps:
            if time.monotonic() - started > args.time_limit:
                print("time limit reached")
                break
            t0 = time.monotonic()
            while len(subscribers) < step:
                subscribers.append(Subscriber(stubs[len(subscribers) % len(stubs)], len(subscribers)))
            await wait_for(_grpc_connections(control, step, subscribers), 120, f"{step} subscribers did not join")
            opened = time.monotonic() - t0

            t1, server_cpu, client_cpu = time.monotonic(), cpu_seconds(server.pid), time.process_time()
            for i in range(args.messages):
                reply = await control.SendMessage(pb.MessageRequest(user="bench", room=ROOM, message=f"m{i}"))
                seq = reply.seq
            await wait_for(_all_have(subscribers, seq), 120, f"burst did not reach all {step} subscribers")
            burst = time.monotonic() - t1
            server_cpu = cpu_seconds(server.pid) - server_cpu
            client_cpu = time.process_time() - client_cpu
            status = proc_status(server.pid)
            rss = int(status["VmRSS"].split()[0]) / 1024
            if args.json_out:
                deliveries = step * args.messages
                record = {
                    "bench": "grpc_streams",
                    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    "grpc_server": args.grpc_server,
                    "streams": step,
                    "messages": args.messages,
                    "deliveries": deliveries,
                    "open_s": round(opened, 2),
                    "burst_s": round(burst, 3),
                    "deliveries_per_s": round(deliveries / burst),
                    "server_cpu_s": round(server_cpu, 2),
                    "cpu_us_per_delivery": round(server_cpu / deliveries * 1e6, 1),
                    "client_cpu_s": round(client_cpu, 2),
                    "threads": int(status["Threads"]),
                    "rss_mib": round(rss),
                    "rss_kib_per_stream": round((rss * 1024 - idle_rss) / step, 1),
                }
                with open(args.json_out, "a") as f:
                    f.write(json.dumps(record) + "\n")
            errors = [s.error for s in subscribers if s.error]
            in_order = all(s.seqs == sorted(s.seqs) and len(set(s.seqs)) == len(s.seqs) for s in subscribers)
            ok = not errors and in_order
            print(
                f"{step:>8} {opened:>7.1f} {burst * 1000:>9.0f} {step * args.messages / burst:>8.0f}"
                f" {server_cpu:>8.2f} {client_cpu:>8.2f} {status['Threads']:>8} {rss:>8.0f}  "
                + ("all received, in order" if ok else f"FAILED {errors[:3]} in_order={in_order}")
            )
            if args.json:
                print(json.dumps({"mode": "grpc_streams", "streams": step, "open_s": round(opened, 2),
                                  "burst_ms": round(burst * 1000), "deliveries_per_s": round(step * args.messages / burst),
                                  "server_cpu_s": round(server_cpu, 2), "client_cpu_s": round(client_cpu, 2),
                                  "server_threads": int(status["Threads"]), "server_rss_kb": int(rss * 1024),
                                  "pass": ok, "errors": errors[:3]}), flush=True)
            if not ok:
                break
            best = step
    except TimeoutError as e:
        print(f"stopped: {e}")
    finally:
        for s in subscribers:
            s.close()
        await asyncio.gather(*(s.task for s in subscribers), return_exceptions=True)
        for c in channels:
            await c.close()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    print(f"held {best} concurrent StreamMessages subscribers, each receiving every message")
    if args.json:
        print(json.dumps({"mode": "grpc_streams_summary", "held": best}), flush=True)
    return 0 if best else 1


def _ready(stub: ChatServiceStub):
    async def check() -> bool:
        try:
            await stub.GetStats(pb.StatsRequest(), timeout=1)
            return True
        except grpc.aio.AioRpcError:
            return False

    return check


def _grpc_connections(stub: ChatServiceStub, n: int, subscribers: list[Subscriber]):
    async def check() -> bool:
        failed = [s.error for s in subscribers if s.error]
        if failed:
            raise TimeoutError(f"subscribers failed: {failed[:3]}")
        try:
            stats = await stub.GetStats(pb.StatsRequest(), timeout=10)
        except grpc.aio.AioRpcError as e:
            if e.code() is not grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            return False  # busy taking the streams in: ask again, until the step's own limit
        return stats.connections_by_protocol["grpc"] >= n

    return check


def _all_have(subscribers: list[Subscriber], seq: int):
    async def check() -> bool:
        return all(s.seqs and s.seqs[-1] >= seq for s in subscribers)

    return check


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="250,500,1000,1500,2000", help="subscriber counts to try, in order")
    parser.add_argument("--messages", type=int, default=20, help="messages per burst")
    parser.add_argument("--connections", type=int, default=8, help="HTTP/2 connections the streams share")
    parser.add_argument("--json", action="store_true", help="also print one JSON line per step")
    parser.add_argument("--grpc-server", default="aio", choices=("threaded", "aio"), help="chatd's --grpc-server")
    parser.add_argument("--server-log", default="", help="chatd's log goes to this file (default: nowhere)")
    parser.add_argument("--json-out", default="", help="append one JSON line per step to this file")
    parser.add_argument("--time-limit", type=float, default=240, help="seconds before no new step starts")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
