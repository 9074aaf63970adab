"""Memory of abandoned rooms: does chatd give back what nobody uses any more?

    .venv/bin/python bench/memory.py --rooms 20000                      # smoke run, < 1 min
    flock /tmp/bench.lock .venv/bin/python bench/memory.py --rooms 1000000 \\
        --out bench/results/$(date +%Y%m%d)-memory.jsonl                 # the measured figure
    .venv/bin/python -m bench.memory --source /path/to/other/checkout   # the same against other code

What it does, all on 127.0.0.1, bounded in count and time, stopping by itself:

1. starts ``twistd -n chatd`` from ``--source`` (this checkout by default;
   fresh ``--data-dir`` in a temporary directory unless ``--data-dir`` says
   otherwise, every rate and per-address limit off) and records its PID;
2. **busy**: one connection joins ``--busy`` rooms and stays in them, and
   fills each to the history limit (100 messages of ``--size`` characters);
   RSS then is the *baseline*;
3. **abandon**: ``--connections`` connections each pipeline, for their share
   of ``--rooms`` new rooms, the seed form ``{"user","message","room","ref"}``
   (join and send) then ``leave``, at most ``--window`` rooms in flight per
   connection, counting ``sent`` acknowledgements; RSS is sampled every
   second (*during*: the highest sample). Stops early at ``--max-seconds``
   (then the figures are for the rooms done, and say so);
4. **after**: waits ``--settle`` seconds, reads RSS (*after*) and ``/stats``
   (rooms in the hub's table and in memory), then spot-checks ``history``
   over WebSocket of ``--check`` random abandoned rooms and of every busy
   room: each must be exactly what was sent (text, order, ``seq`` 1..n).

One JSON line on stdout (``--out FILE`` appends it too) and a summary on
stderr. RSS is VmRSS from /proc/PID/status; figures mean something as the
ratio to the baseline of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import shlex
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TWISTD = Path(sys.executable).with_name("twistd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """``twistd -n chatd`` on free loopback ports."""

    def __init__(self, args: argparse.Namespace, workdir: str) -> None:
        self.args = args
        self.port = free_port()
        self.log = open(os.path.join(workdir, "chatd.log"), "w+")  # noqa: SIM115 (open for the run)
        data_dir = args.data_dir if args.data_dir is not None else os.path.join(workdir, "data")
        argv = shlex.split(args.server_cmd) if args.server_cmd else [str(TWISTD), "-n", "--pidfile=", "chatd"]
        argv += [
            "--ws", f"tcp:{self.port}:interface=127.0.0.1",
            "--signalr", f"tcp:{free_port()}:interface=127.0.0.1",
            "--web", f"tcp:{free_port()}:interface=127.0.0.1",
            "--grpc", f"127.0.0.1:{free_port()}",
            "--data-dir", data_dir,
            "--max-message-rate", "0", "--max-connection-rate", "0", "--max-connections-per-ip", "0",
            "--max-rooms-per-connection", "0", "--max-connections", "20000",
            *shlex.split(args.server_args),
        ]
        env = {k: v for k, v in os.environ.items() if k not in ("DATA_DIR", "REDIS_URL", "WS_PORT")}
        env["PYTHONPATH"] = str(Path(args.source).resolve())
        self.proc = subprocess.Popen(argv, cwd=workdir, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def http(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as r:
            return json.loads(r.read())

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"chatd exited with {self.proc.returncode}:\n{self.log.read()}")
            try:
                self.http("/health")
                return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("chatd never became healthy")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class WS(asyncio.Protocol):
    """A lean WebSocket client: masked text frames out (a zero mask), JSON text frames in."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.upgraded = asyncio.get_running_loop().create_future()
        self.frames: asyncio.Queue[dict] = asyncio.Queue()
        self.on_frame = self.frames.put_nowait
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded.done():
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end])
            del self.buffer[: end + 4]
            if b" 101 " not in head.split(b"\r\n", 1)[0]:
                self.upgraded.set_exception(ConnectionError(head.decode(errors="replace")))
                return
            self.upgraded.set_result(None)
        buf, pos = self.buffer, 0
        while len(buf) - pos >= 2:
            opcode, length, start = buf[pos] & 0x0F, buf[pos + 1] & 0x7F, pos + 2
            if length == 126:
                if len(buf) - pos < 4:
                    break
                length, start = struct.unpack_from("!H", buf, pos + 2)[0], pos + 4
            elif length == 127:
                if len(buf) - pos < 10:
                    break
                length, start = struct.unpack_from("!Q", buf, pos + 2)[0], pos + 10
            if len(buf) - start < length:
                break
            if opcode == 1:
                self.on_frame(json.loads(bytes(buf[start : start + length])))
            elif opcode == 9:  # ping: pong
                self._frame(0xA, bytes(buf[start : start + length]))
            pos = start + length
        del buf[:pos]

    def _frame(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0xFE, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0xFF, n)
        assert self.transport is not None
        self.transport.write(head + b"\0\0\0\0" + payload)  # a zero mask leaves the payload as it is

    def send(self, body: dict) -> None:
        self._frame(1, json.dumps(body, separators=(",", ":")).encode())

    def connection_lost(self, exc) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)
        if not self.upgraded.done():
            self.upgraded.set_exception(ConnectionError("closed during the handshake"))

    async def recv(self, timeout: float = 60) -> dict:
        return await asyncio.wait_for(self.frames.get(), timeout)

    async def recv_type(self, kind: str, timeout: float = 60) -> dict:
        while True:
            frame = await self.recv(timeout)
            if frame.get("type") == kind:
                return frame
            if frame.get("type") == "error":
                raise RuntimeError(f"chatd refused a request: {frame}")


async def connect(port: int) -> WS:
    loop = asyncio.get_running_loop()
    _, ws = await loop.create_connection(WS, "127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    assert ws.transport is not None
    ws.transport.write(
        (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    await asyncio.wait_for(ws.upgraded, 30)
    return ws


def text(room: str, n: int, size: int) -> str:
    head = f"{room}#{n}:"
    return head + "x" * max(0, size - len(head))


async def fill_busy(port: int, rooms: int, per_room: int, size: int) -> WS:
    ws = await connect(port)
    for r in range(rooms):
        ws.send({"type": "join", "room": f"busy{r}", "user": "busy"})
        await ws.recv_type("joined")
    acked = 0
    pending = 0
    for n in range(per_room):
        for r in range(rooms):
            ws.send({"type": "message", "room": f"busy{r}", "message": text(f"busy{r}", n, size), "ref": 1})
            pending += 1
        while pending > 1000:
            await ws.recv_type("sent")
            pending -= 1
            acked += 1
    while pending:
        await ws.recv_type("sent")
        pending -= 1
    return ws


async def abandon(port: int, first: int, last: int, window: int, size: int, deadline: float, done: list[int]) -> range:
    """Rooms ``first``..``last - 1``: join and send (the seed form), then leave; ``window`` in flight.

    Returns the rooms done (all acknowledged), fewer than asked if the deadline came first.
    """
    ws = await connect(port)
    loop = asyncio.get_running_loop()
    acked = 0
    room_free = asyncio.Event()
    inflight = 0

    def on_frame(frame: dict) -> None:
        nonlocal acked, inflight
        kind = frame.get("type")
        if kind == "sent":
            acked += 1
            inflight -= 1
            done[0] += 1
            room_free.set()
        elif kind == "error":
            errors.append(frame)
            room_free.set()

    errors: list[dict] = []
    ws.on_frame = on_frame
    user = f"visitor{first}"
    i = first
    while i < last and loop.time() < deadline:
        while inflight >= window and not errors:
            room_free.clear()
            await room_free.wait()
        room = f"gone{i}"
        ws.send({"user": user, "room": room, "message": text(room, 0, size), "ref": i})
        ws.send({"type": "leave", "room": room})
        inflight += 1
        i += 1
        if i % 64 == 0:
            await asyncio.sleep(0)  # let the acknowledgements in
        if errors:
            break  # reported by the caller, with what was done
    while inflight and not errors:
        room_free.clear()
        await room_free.wait()
    assert ws.transport is not None
    ws.transport.close()
    if errors:
        raise RuntimeError(f"chatd refused a request after {done[0]} rooms: {errors[0]}")
    return range(first, i)


async def check_history(port: int, rooms: list[str], busy: int, per_room: int, size: int) -> dict:
    """Every room's history as sent: text, order, seq 1..n."""
    ws = await connect(port)
    wrong: list[str] = []
    for room in rooms:
        ws.send({"type": "history", "room": room, "limit": 100})
        kept = (await ws.recv_type("history"))["messages"]
        got = [(m["seq"], m["message"][:24]) for m in kept]
        if got != [(1, text(room, 0, size)[:24])]:
            wrong.append(f"{room}: {got[:3]}")
    for r in range(busy):
        room = f"busy{r}"
        ws.send({"type": "history", "room": room, "limit": 100})
        kept = (await ws.recv_type("history"))["messages"]
        if [(m["seq"], m["message"]) for m in kept] != [(n + 1, text(room, n, size)) for n in range(per_room)]:
            wrong.append(room)
    assert ws.transport is not None
    ws.transport.close()
    return {"history_checked": len(rooms) + busy, "history_wrong": len(wrong), "history_wrong_rooms": wrong[:10]}


async def run(args: argparse.Namespace, server: Server) -> dict:
    pid = server.proc.pid
    out: dict = {"tool": "memory", "peer": args.peer, "run_id": time.strftime("%Y%m%dT%H%M%S"), "server_pid": pid}
    out["rss_start_kb"] = rss_kb(pid)
    busy_ws = await fill_busy(server.port, args.busy, args.per_room, args.size)
    await asyncio.sleep(args.settle)
    out["rss_baseline_kb"] = rss_kb(pid)
    out["busy_rooms"], out["busy_messages"] = args.busy, args.busy * args.per_room

    loop = asyncio.get_running_loop()
    started, cpu0 = loop.time(), cpu_seconds(pid)
    deadline = started + args.max_seconds
    done = [0]
    share = -(-args.rooms // args.connections)
    tasks = [
        asyncio.ensure_future(
            abandon(server.port, c * share, min(args.rooms, (c + 1) * share), args.window, args.size, deadline, done)
        )
        for c in range(args.connections)
    ]
    samples: list[tuple[float, int, int]] = []
    while not all(t.done() for t in tasks):
        await asyncio.wait(tasks, timeout=1.0)
        samples.append((round(loop.time() - started, 1), done[0], rss_kb(pid)))
        if len(samples) % 30 == 0:
            print(f"  {samples[-1][0]:7.1f} s  {done[0]:>9} rooms  rss {samples[-1][2] / 1024:.1f} MiB", file=sys.stderr)
    abandoned = [room for t in tasks if t.exception() is None for room in t.result()]
    failures = [str(t.exception()) for t in tasks if t.exception() is not None]
    if failures:
        out["error"] = failures[0]
    elapsed = loop.time() - started
    out["rooms"] = done[0]
    out["rooms_asked"] = args.rooms
    out["complete"] = done[0] == args.rooms
    out["abandon_s"] = round(elapsed, 1)
    out["rooms_per_s"] = round(done[0] / elapsed, 1)
    out["server_cpu_s_abandon"] = round(cpu_seconds(pid) - cpu0, 2)
    out["rss_during_max_kb"] = max(s[2] for s in samples)
    out["rss_samples"] = samples[:: max(1, len(samples) // 40)]

    await asyncio.sleep(args.settle)
    out["rss_after_kb"] = rss_kb(pid)
    stats = server.http("/stats")
    out["stats_rooms"] = stats["rooms"]
    out["stats_memory"] = stats.get("memory")
    out["rss_after_minus_baseline_mb"] = round((out["rss_after_kb"] - out["rss_baseline_kb"]) / 1024, 1)
    out["rss_per_abandoned_room_b"] = round((out["rss_after_kb"] - out["rss_baseline_kb"]) * 1024 / max(1, done[0]), 1)
    if not out["complete"]:
        # Honest extrapolation: the growth per room measured, times the rooms asked for.
        out["rss_after_extrapolated_mb"] = round(out["rss_per_abandoned_room_b"] * args.rooms / 2**20, 1)
    sample = random.Random(args.seed).sample(abandoned, min(args.check, len(abandoned)))
    out.update(await check_history(server.port, [f"gone{i}" for i in sample], args.busy, args.per_room, args.size))
    out["rss_end_kb"] = rss_kb(pid)
    assert busy_ws.transport is not None
    busy_ws.transport.close()
    out["source"] = str(Path(args.source).resolve())
    out["ts"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rooms", type=int, default=1_000_000, help="abandoned rooms, one message each")
    p.add_argument("--busy", type=int, default=100, help="rooms kept busy (a member stays) at the history limit")
    p.add_argument("--per-room", type=int, default=100, help="messages per busy room (the history limit)")
    p.add_argument("--size", type=int, default=100, help="characters per message")
    p.add_argument("--connections", type=int, default=4, help="connections abandoning rooms at once")
    p.add_argument("--window", type=int, default=256, help="rooms in flight per connection")
    p.add_argument("--max-seconds", type=float, default=540, help="stop abandoning after this long")
    p.add_argument("--settle", type=float, default=3.0, help="seconds before reading RSS after a phase")
    p.add_argument("--check", type=int, default=200, help="abandoned rooms whose history is checked")
    p.add_argument("--source", default=str(ROOT), help="the chatd checkout to run (PYTHONPATH)")
    p.add_argument("--server-cmd", help="instead of twistd -n --pidfile= chatd")
    p.add_argument("--server-args", default="", help="more chatd options, e.g. \"--history-memory 8388608\"")
    p.add_argument("--data-dir", help="chatd --data-dir ('' for memory only); default a fresh temporary one")
    p.add_argument("--peer", default="chatd", help="label in the output")
    p.add_argument("--seed", type=int, default=14)
    p.add_argument("--out", help="append the JSON line to this file")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="chatd-memory-") as workdir:
        server = Server(args, workdir)
        try:
            server.wait_healthy()
            out = asyncio.run(run(args, server))
        finally:
            server.stop()
    line = json.dumps(out)
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    mb = 1 / 1024
    print(
        f"{out['rooms']} abandoned rooms in {out['abandon_s']} s ({out['rooms_per_s']}/s): RSS baseline "
        f"{out['rss_baseline_kb'] * mb:.1f} MiB (with {args.busy} busy rooms), during max "
        f"{out['rss_during_max_kb'] * mb:.1f} MiB, after {out['rss_after_kb'] * mb:.1f} MiB "
        f"({out['rss_after_minus_baseline_mb']:+.1f} MiB); history wrong in {out['history_wrong']} of "
        f"{out['history_checked']} rooms; /stats memory {out['stats_memory']}",
        file=sys.stderr,
    )
    if out.get("error"):
        print(f"error: {out['error']}", file=sys.stderr)
    if out["history_wrong"] or out.get("error"):
        sys.exit(1)


if __name__ == "__main__":
    main()
