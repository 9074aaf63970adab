"""W5: a reconnect storm. N WebSocket clients connect, chat, are drained by a
SIGTERM, and all come back to a restarted server, resuming with ``since``.

    .venv/bin/python bench/storm.py -n 500                        # smoke run, < 1 min
    .venv/bin/python bench/storm.py -n 10000 --server-cpu 0 --client-cpu 1 \\
        --out bench/results/$(date +%Y%m%d)-storm.jsonl          # the measured W5

What it does, all on 127.0.0.1, bounded in count and time, stopping by itself:

1. starts ``twistd -n chatd`` (``--server-cmd``; fresh ``--data-dir`` in a
   temporary directory; every rate and per-address limit off), optionally
   pinned with ``taskset`` to ``--server-cpu``, and records its PID;
2. opens N connections as fast as the server takes them (at most
   ``--concurrency`` handshakes + joins in flight), each joining a room of
   ``--room-size``; reports the accept rate, handshake (TCP connect + HTTP
   upgrade) and join-reply latency, failures, and the server's CPU seconds per
   connection (utime+stime from /proc/PID/stat);
3. sends ``--messages`` messages per room (so every client has a last seen
   ``seq``), then SIGTERM: when each client got its close (and which code),
   when the process exited;
4. as soon as a client is closed it reconnects with backoff (``--backoff``),
   like real clients, hitting the draining server (refused), then a closed
   port, then the restarted server (same ports, same data dir: history and
   ``seq`` survive in SQLite), re-joining with ``"since": last_seq``. The
   first client back in every ``--away-every``-th room sends
   ``--away-messages`` messages while the rest of its room is still away, so
   resume has something to deliver. Reports the time from the restart until
   every client is back, and until every client holds exactly every ``seq``
   of its room (1..last, checked per client: no gap, no duplicate).

One JSON line on stdout (``--out FILE`` appends it too), then a short summary
on stderr.

Backoff policies (``--backoff``): ``full-jitter`` (default) sleeps
uniform(0, min(cap, base * 2**attempt)), the AWS "full jitter" scheme;
``browser`` is what web/app.js does: 0.5, 1, 2, 4, 8, 15, 30 s, each
x uniform(0.75, 1.25) (jitter of +-25 %, not full jitter); ``signalr`` is
the official SignalR client's withAutomaticReconnect() default: 0, 2, 10,
30 s, no jitter at all (it then gives up; here it keeps 30 s).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import os
import random
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

try:
    import orjson

    loads = orjson.loads

    def dumps(obj) -> str:
        return orjson.dumps(obj).decode()
except ImportError:  # pragma: no cover
    loads = json.loads
    dumps = json.dumps

ROOT = Path(__file__).resolve().parent.parent
TWISTD = Path(sys.executable).with_name("twistd")
CLK_TCK = os.sysconf("SC_CLK_TCK")
BROWSER_BACKOFF = [0.5, 1, 2, 4, 8, 15, 30]
#: ``--socket-activation``: exec argv[2:] with fd argv[1] passed as systemd passes a socket
SD_EXEC = """
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.environ.update(LISTEN_FDS="1", LISTEN_FDNAMES="chatd", LISTEN_PID=str(os.getpid()))
os.execvp(sys.argv[2], sys.argv[2:])
"""
SIGNALR_BACKOFF = [0, 2, 10, 30]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy() -> float:
    """CPU seconds every CPU of the machine has spent busy (not idle, not iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def sec(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def backoff(policy: str, attempt: int, base: float, cap: float, rng: random.Random) -> float:
    if policy == "full-jitter":
        return rng.uniform(0, min(cap, base * 2**attempt))
    if policy == "browser":
        return min(cap, BROWSER_BACKOFF[min(attempt, len(BROWSER_BACKOFF) - 1)]) * rng.uniform(0.75, 1.25)
    if policy == "signalr":
        return min(cap, SIGNALR_BACKOFF[min(attempt, len(SIGNALR_BACKOFF) - 1)])
    raise ValueError(policy)


class Server:
    """``twistd -n chatd`` on fixed loopback ports; the same ports and data dir on every start."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.ws_port = args.port or free_port()
        self.other_ports = [free_port() for _ in range(3)]
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.inherited: socket.socket | None = None
        if args.socket_activation:
            # systemd's part (chatd.socket): one listening socket, bound once, kept across the restart.
            self.inherited = socket.socket()
            self.inherited.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.inherited.bind(("127.0.0.1", self.ws_port))
            self.inherited.listen(4096)

    def argv(self) -> list[str]:
        log = self.workdir / f"chatd-{self.starts}.log"
        cmd = self.args.server_cmd or f"{TWISTD} -n --pidfile= -l {{log}} chatd"
        argv = shlex.split(cmd.replace("{log}", str(log)))
        signalr, web, grpc = self.other_ports
        ws = f"tcp:{self.ws_port}:interface=127.0.0.1"
        if self.inherited is not None:
            ws = "systemd:domain=INET:index=0"
            argv = [sys.executable, "-c", SD_EXEC, str(self.inherited.fileno()), *argv]
        argv += [
            "--ws", ws,
            "--signalr", f"tcp:{signalr}:interface=127.0.0.1",
            "--web", f"tcp:{web}:interface=127.0.0.1",
            "--grpc", f"127.0.0.1:{grpc}",
            "--data-dir", str(self.data_dir),
            "--max-connections-per-ip", "0",
            "--max-connection-rate", "0",
            "--max-message-rate", "0",
            "--max-connections", str(self.args.max_connections),
            "--drain-timeout", str(self.args.drain_timeout),
        ]  # fmt: skip
        if self.args.server_cpu is not None:
            argv = ["taskset", "-c", str(self.args.server_cpu), *argv]  # taskset execs: same PID
        return argv

    def start(self) -> None:
        self.starts += 1
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        out = open(self.workdir / f"chatd-{self.starts}.out", "wb")  # noqa: SIM115
        with out:
            fds = () if self.inherited is None else (self.inherited.fileno(),)
            self.proc = subprocess.Popen(
                self.argv(), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, pass_fds=fds
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def wait_listening(self, timeout: float = 60) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"chatd exited with {self.proc.returncode} during start; see {self.workdir}"
                )
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.ws_port)
                if self.inherited is not None:
                    # The socket always listens: wait for the process to answer on it.
                    writer.write(b"GET /health HTTP/1.0\r\n\r\n")
                    await asyncio.wait_for(reader.read(1), timeout)
                writer.close()
                return time.monotonic() - t0
            except OSError:
                await asyncio.sleep(0.02)
        raise RuntimeError(f"chatd did not listen within {timeout}s; see {self.workdir}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Client:
    __slots__ = (
        "idx", "room", "user", "ws", "seqs", "got", "joined", "closed_at", "close_code", "back_at",
        "attempts", "refusals", "resumed", "task", "reader", "drain_at", "drain_code",
    )  # fmt: skip

    def __init__(self, idx: int, room: str, user: str) -> None:
        self.idx, self.room, self.user = idx, room, user
        self.ws = None
        self.seqs: list[int] = []  # every seq received, in order, over every connection
        self.got: list[float] = []  # when each of those arrived
        self.joined: asyncio.Future | None = None
        self.closed_at: float | None = None
        self.close_code: int | None = None
        self.back_at: float | None = None
        self.attempts = 0
        self.refusals: Counter = Counter()
        self.resumed = 0
        self.task: asyncio.Task | None = None
        self.reader: asyncio.Task | None = None
        self.drain_at: float | None = None  # when the first connection closed (the drain), and how
        self.drain_code: int | None = None


class HandshakeError(Exception):
    pass


class WS(asyncio.Protocol):
    """A lean WebSocket client (RFC 6455) for many connections from one core.

    The ``websockets`` library cost the client more CPU per handshake than the
    server spent, so in a storm the client, not the server, was the limit.
    This one writes the upgrade request, checks for ``101``, parses the
    server's (unmasked, unfragmented) frames in place, answers pings and the
    closing handshake, and masks what it sends with a zero key (legal: the
    key is not secret from a server, and a zero key makes masking a no-op).
    """

    def __init__(self, storm: Storm, client: Client, upgraded: asyncio.Future) -> None:
        self.storm, self.client, self.upgraded = storm, client, upgraded
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.close_code: int | None = None
        self.close_sent = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.client.ws = self
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            (
                f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{self.storm.server.ws_port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded.done():
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[: buf.find(b"\r\n")])
            del buf[: end + 4]
            if not status.startswith(b"HTTP/1.1 101"):
                self.upgraded.set_exception(HandshakeError(status.decode("latin-1")[:60]))
                self.transport.abort()
                return
            self.upgraded.set_result(None)
        while len(buf) >= 2:
            opcode, n = buf[0] & 0x0F, buf[1] & 0x7F
            off = 2
            if n == 126:
                if len(buf) < 4:
                    return
                n, off = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n, off = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < off + n:
                return
            payload = bytes(buf[off : off + n])
            del buf[: off + n]
            if opcode == 1:
                self.storm.on_text(self.client, self, payload)
            elif opcode == 8:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                if not self.close_sent:
                    self._frame(8, payload[:2])  # echo the code; the server then closes TCP
                    self.close_sent = True
            elif opcode == 9:
                self._frame(10, payload)

    def _frame(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            head = bytes((0x80 | opcode, 0x80 | n))
        elif n < 65536:
            head = bytes((0x80 | opcode, 0xFE)) + n.to_bytes(2, "big")
        else:
            head = bytes((0x80 | opcode, 0xFF)) + n.to_bytes(8, "big")
        self.transport.write(head + b"\0\0\0\0" + payload)

    def send(self, text: str) -> None:
        self._frame(1, text.encode())

    def close(self, code: int = 1000) -> None:
        if not self.close_sent and self.transport is not None and not self.transport.is_closing():
            self._frame(8, code.to_bytes(2, "big"))
            self.close_sent = True

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc) -> None:
        if self.close_code is None:
            self.close_code = 1006
        if not self.upgraded.done():
            self.upgraded.set_exception(ConnectionError("closed during the upgrade"))
        self.storm.on_lost(self.client, self)


class Storm:
    def __init__(self, args: argparse.Namespace, server: Server) -> None:
        self.args = args
        self.server = server
        self.url = f"ws://127.0.0.1:{server.ws_port}/ws"
        self.rng = random.Random(args.seed)
        self.clients = [Client(i, f"storm{i // args.room_size}", f"u{i}") for i in range(args.n)]
        self.rooms: dict[str, list[Client]] = {}
        for c in self.clients:
            self.rooms.setdefault(c.room, []).append(c)
        self.room_last: dict[str, int] = dict.fromkeys(self.rooms, 0)  # highest acknowledged seq
        self.acks: dict[str, asyncio.Future] = {}
        self.refs = itertools.count(1)
        self.errors: Counter = Counter()
        self.away_rooms = {
            r for i, r in enumerate(self.rooms) if args.away_every and i % args.away_every == 0
        }
        self.away_sent: set[str] = set()
        self.away_tasks: list[asyncio.Task] = []
        self.away_while_missing = 0  # away messages sent while at least one member was not back
        self.reconnecting = False
        self.lag_max = 0.0  # the client's own event loop falling behind (is the client the limit?)

    async def watch_lag(self) -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.05)
            self.lag_max = max(self.lag_max, time.monotonic() - t - 0.05)

    # -- one connection -------------------------------------------------

    async def open(self, c: Client, since: int | None, timeout: float) -> tuple[float, float]:
        """Connect, join (with ``since`` if given); returns (handshake, join) seconds."""
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        upgraded = loop.create_future()
        c.joined = loop.create_future()
        c.reader = loop.create_future()
        c.ws = None  # WS.connection_made sets it: frames of an older, aborted connection are ignored
        try:
            _, ws = await asyncio.wait_for(
                loop.create_connection(lambda: WS(self, c, upgraded), "127.0.0.1", self.server.ws_port),
                timeout,
            )
        except BaseException:
            c.reader.set_result(None)
            raise
        try:
            await asyncio.wait_for(upgraded, timeout)
        except BaseException:
            ws.abort()
            raise
        t1 = time.perf_counter()
        join = {"type": "join", "room": c.room, "user": c.user}
        if since is not None:
            join["since"] = since
        ws.send(dumps(join))
        try:
            await asyncio.wait_for(asyncio.shield(c.joined), timeout)
        except BaseException:
            ws.abort()
            raise
        return t1 - t0, time.perf_counter() - t1

    def on_text(self, c: Client, ws: WS, raw: bytes) -> None:
        if ws is not c.ws:
            return
        m = loads(raw)
        kind = m.get("type")
        if kind == "message":
            c.seqs.append(m["seq"])
            c.got.append(time.monotonic())
            if c.joined is not None and not c.joined.done():
                c.resumed += 1  # replayed before "joined"
        elif kind == "joined":
            if c.joined is not None and not c.joined.done():
                c.joined.set_result(m)
        elif kind == "sent":
            fut = self.acks.pop(m.get("ref"), None)
            if fut is not None and not fut.done():
                fut.set_result(m["seq"])
        elif kind == "error":
            self.errors[m.get("error", "?")[:60]] += 1
            fut = self.acks.pop(m.get("ref"), None)
            if fut is not None and not fut.done():
                fut.set_exception(RuntimeError(m.get("error")))
            if c.joined is not None and not c.joined.done() and m.get("request") == "join":
                c.joined.set_exception(RuntimeError(m.get("error")))

    def on_lost(self, c: Client, ws: WS) -> None:
        if ws is not c.ws:
            return
        c.closed_at = time.monotonic()
        c.close_code = ws.close_code
        if c.joined is not None and not c.joined.done():
            c.joined.set_exception(ConnectionError(f"closed {ws.close_code} before joined"))
            c.joined.exception()  # mark retrieved
        if c.reader is not None and not c.reader.done():
            c.reader.set_result(None)

    async def send(self, c: Client, text: str) -> int:
        ref = f"r{next(self.refs)}"
        fut = asyncio.get_running_loop().create_future()
        self.acks[ref] = fut
        c.ws.send(dumps({"type": "message", "room": c.room, "message": text, "ref": ref, "client_id": ref}))
        seq = await asyncio.wait_for(fut, 30)
        self.room_last[c.room] = max(self.room_last[c.room], seq)
        return seq

    # -- phase 2: connect -----------------------------------------------

    async def connect_all(self) -> dict:
        sem = asyncio.Semaphore(self.args.concurrency)
        hs: list[float] = []
        js: list[float] = []
        failures: Counter = Counter()

        async def one(c: Client) -> None:
            async with sem:
                try:
                    h, j = await self.open(c, None, self.args.open_timeout)
                    hs.append(h)
                    js.append(j)
                except Exception as e:
                    failures[type(e).__name__] += 1
                    c.ws = None

        pid = self.server.pid
        cpu0, cc0, m0, t0 = cpu_seconds(pid), time.process_time(), machine_busy(), time.monotonic()
        self.lag_max = 0.0
        await asyncio.gather(*(one(c) for c in self.clients))
        wall = time.monotonic() - t0
        cpu = cpu_seconds(pid) - cpu0
        client_cpu = time.process_time() - cc0
        other = machine_busy() - m0 - cpu - client_cpu
        ok = len(hs)
        return {
            "conns_ok": ok,
            "conns_failed": sum(failures.values()),
            "connect_failures": dict(failures),
            "connect_time_s": sec(wall),
            "accept_rate": round(ok / wall, 1) if wall else None,
            "handshake_p50_ms": ms(pct(hs, 50)),
            "handshake_p99_ms": ms(pct(hs, 99)),
            "handshake_max_ms": ms(max(hs, default=None)),
            "join_p50_ms": ms(pct(js, 50)),
            "join_p99_ms": ms(pct(js, 99)),
            "server_cpu_s_connect": round(cpu, 3),
            "server_cpu_ms_per_conn": round(1000 * cpu / ok, 3) if ok else None,
            "server_cpu_pct_connect": round(100 * cpu / wall, 1) if wall else None,
            "client_cpu_pct_connect": round(100 * client_cpu / wall, 1) if wall else None,
            # anything else busy on the machine meanwhile (another benchmark?), % of one CPU
            "other_cpu_pct_connect": round(100 * other / wall, 1) if wall else None,
            "client_lag_max_ms_connect": ms(self.lag_max),
        }

    # -- phase 3: chat, then SIGTERM --------------------------------------

    async def chat(self) -> dict:
        sem = asyncio.Semaphore(self.args.concurrency)
        failed = 0

        async def room(members: list[Client]) -> None:
            nonlocal failed
            sender = next((c for c in members if c.ws is not None and c.closed_at is None), None)
            if sender is None:
                return
            async with sem:
                for k in range(self.args.messages):
                    try:
                        await self.send(sender, f"before {k}")
                    except Exception:
                        failed += 1

        t0 = time.monotonic()
        await asyncio.gather(*(room(m) for m in self.rooms.values()))
        # Every connected client must have its room's last seq before the SIGTERM.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all(
                c.closed_at is not None or (c.seqs and c.seqs[-1] >= self.room_last[c.room])
                for c in self.clients
            ):
                break
            await asyncio.sleep(0.05)
        missing = sum(
            1
            for c in self.clients
            if c.closed_at is None and (not c.seqs or c.seqs[-1] < self.room_last[c.room])
        )
        return {
            "chat_send_failed": failed,
            "chat_missing": missing,
            "chat_time_s": sec(time.monotonic() - t0),
        }

    # -- phase 4: come back ------------------------------------------------

    async def come_back(self, c: Client) -> None:
        """Reconnect with backoff until joined again with ``since``; bounded by the deadline."""
        if c.reader is not None:
            await c.reader
        c.drain_at, c.drain_code = c.closed_at, c.close_code
        since = c.seqs[-1] if c.seqs else None
        attempt = 0
        args = self.args
        while time.monotonic() < self.deadline:
            await asyncio.sleep(backoff(args.backoff, attempt, args.backoff_base, args.backoff_cap, self.rng))
            if time.monotonic() >= self.deadline:
                break
            c.attempts += 1
            attempt += 1
            c.ws = None
            try:
                await self.open(c, since, args.open_timeout)
            except Exception as e:
                code = getattr(c.ws, "close_code", None) if c.ws is not None else None
                c.refusals[f"{type(e).__name__}{'' if code is None else f' {code}'}"] += 1
                c.ws = None
                continue
            if not self.reconnecting:  # the old server took us back during its drain: should not happen
                self.errors["rejoined the draining server"] += 1
            c.back_at = time.monotonic()
            if c.room in self.away_rooms and c.room not in self.away_sent:
                self.away_sent.add(c.room)
                self.away_tasks.append(asyncio.create_task(self.send_away(c)))
            return

    async def send_away(self, c: Client) -> None:
        members = self.rooms[c.room]
        for k in range(self.args.away_messages):
            if any(m.back_at is None for m in members):
                self.away_while_missing += 1
            try:
                await self.send(c, f"while away {k}")
            except Exception as e:
                self.errors[f"away send: {type(e).__name__}"] += 1

    async def storm(self) -> dict:
        args, server = self.args, self.server
        old_pid = server.pid
        self.deadline = time.monotonic() + args.drain_timeout + args.timeout
        for c in self.clients:
            if c.ws is not None:
                c.task = asyncio.create_task(self.come_back(c))
        cpu_before_term = cpu_seconds(old_pid)
        t_term = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        status = await asyncio.to_thread(server.proc.wait, args.drain_timeout + 60)
        t_exit = time.monotonic()
        # Restart on the same ports and data dir.
        self.reconnecting = True
        t_restart = time.monotonic()
        server.start()
        listen = await server.wait_listening()
        new_pid = server.pid
        cpu0, cc0, m0 = cpu_seconds(new_pid), time.process_time(), machine_busy()
        window0 = cpu0  # for the CPU anything else used in the same window
        if server.inherited is not None:
            # It took queued connections before it could answer the readiness
            # check: count from its start (start-up included, about 0.5 s of CPU).
            cpu0 = 0.0
        self.lag_max = 0.0
        tasks = [c.task for c in self.clients if c.task is not None]
        await asyncio.gather(*tasks)
        await asyncio.gather(*self.away_tasks)
        # Each task noted its drain close before its first reconnect; read them
        # only now, as a busy client may still have been reading them at the exit.
        drained = [c for c in self.clients if c.task is not None]
        closes = [c.drain_at - t_term for c in drained if c.drain_at is not None]
        codes = Counter(str(c.drain_code) for c in drained if c.drain_at is not None)
        not_closed = sum(1 for c in drained if c.drain_at is None)
        # Wait until every client holds its room's last seq (or the deadline).
        while time.monotonic() < self.deadline:
            if all(c.seqs and c.seqs[-1] >= self.room_last[c.room] for c in self.clients if c.back_at):
                break
            await asyncio.sleep(0.05)
        t_done = time.monotonic()
        cpu_now = cpu_seconds(new_pid)
        cpu = cpu_now - cpu0
        client_cpu = time.process_time() - cc0
        other = machine_busy() - m0 - (cpu_now - window0) - client_cpu
        lag = self.lag_max
        back = [c.back_at - t_restart for c in self.clients if c.back_at is not None]
        expected = [c for c in self.clients if c.task is not None]
        not_back = sum(1 for c in expected if c.back_at is None)
        gaps = dups = wrong = 0
        resumed_at: list[float] = []
        for c in expected:
            want = list(range(1, self.room_last[c.room] + 1))
            if c.seqs != want:
                wrong += 1
                seen = Counter(c.seqs)
                dups += sum(n - 1 for n in seen.values() if n > 1)
                gaps += sum(1 for s in want if s not in seen)
            elif c.back_at is not None:
                # when it had everything: back, and holding the room's last seq
                resumed_at.append(max(c.back_at, c.got[-1]) - t_restart)
        refusals: Counter = Counter()
        for c in expected:
            refusals.update(c.refusals)
        attempts = [c.attempts for c in expected]
        return {
            "drain_exit_status": status,
            "drain_exit_s": sec(t_exit - t_term),
            "drain_close_codes": dict(codes),
            "drain_not_closed": not_closed,
            "drain_close_first_s": sec(min(closes, default=None)),
            "drain_close_p50_s": sec(pct(closes, 50)),
            "drain_close_p99_s": sec(pct(closes, 99)),
            "drain_close_last_s": sec(max(closes, default=None)),
            "server_cpu_s_before_term": round(cpu_before_term, 3),
            "down_s": sec(t_restart - t_exit),
            "restart_listen_s": sec(listen),
            "back_first_s": sec(min(back, default=None)),
            "back_p50_s": sec(pct(back, 50)),
            "back_p99_s": sec(pct(back, 99)),
            "back_all_s": sec(max(back)) if back and not not_back else None,
            "not_back": not_back,
            "resumed_p50_s": sec(pct(resumed_at, 50)),
            "resumed_all_s": sec(max(resumed_at)) if len(resumed_at) == len(expected) and expected else None,
            "resume_wrong": wrong,
            "resume_gaps": gaps,
            "resume_dups": dups,
            "resumed_msgs": sum(c.resumed for c in expected),
            "away_rooms": len(self.away_sent),
            "away_msgs_while_missing": self.away_while_missing,
            "reconnect_attempts_mean": round(sum(attempts) / len(attempts), 2) if attempts else None,
            "reconnect_attempts_max": max(attempts, default=None),
            "reconnect_refusals": dict(refusals.most_common(6)),
            "server_cpu_s_reconnect": round(cpu, 3),
            "server_cpu_ms_per_reconnect": round(1000 * cpu / len(back), 3) if back else None,
            "server_cpu_reconnect_includes_start": server.inherited is not None,
            "reconnect_phase_s": sec(t_done - t_restart),
            "client_cpu_pct_reconnect": round(100 * client_cpu / (t_done - t_restart), 1)
            if t_done > t_restart
            else None,
            "client_lag_max_ms_reconnect": ms(lag),
            "other_cpu_pct_reconnect": round(100 * other / (t_done - t_restart), 1)
            if t_done > t_restart
            else None,
        }

    async def close_all(self) -> None:
        for c in self.clients:
            if c.ws is not None and c.closed_at is None:
                c.ws.close(1000)
        await asyncio.sleep(0.5)


async def run(args: argparse.Namespace) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the server inherits it too
    if args.client_cpu is not None:
        os.sched_setaffinity(0, {args.client_cpu})
    workdir = Path(tempfile.mkdtemp(prefix="chatd-storm-"))
    server = Server(args, workdir)
    started = time.time()
    result: dict = {
        "tool": "storm",
        "tag": "W5",
        "peer": args.peer,
        "run_id": args.run_id or time.strftime("%Y%m%dT%H%M%S"),
        "n": args.n,
        "room_size": args.room_size,
        "rooms": 0,
        "concurrency": args.concurrency,
        "messages_per_room": args.messages,
        "backoff": f"{args.backoff} base={args.backoff_base}s cap={args.backoff_cap}s",
        "drain_timeout": args.drain_timeout,
        "socket_activation": args.socket_activation,
        "server_cpu": args.server_cpu,
        "client_cpu": args.client_cpu,
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }
    storm = None
    try:
        server.start()
        result["server_start_s"] = sec(await server.wait_listening())
        result["server_pid"] = server.pid
        storm = Storm(args, server)
        lag_task = asyncio.create_task(storm.watch_lag())
        result["rooms"] = len(storm.rooms)
        result.update(await storm.connect_all())
        result.update(await storm.chat())
        result.update(await storm.storm())
        result["server_pid_restarted"] = server.pid
        lag_task.cancel()
        result["errors"] = dict(storm.errors)
        result["failures"] = (
            result["conns_failed"]
            + result["chat_send_failed"]
            + result["chat_missing"]
            + result["drain_not_closed"]
            + sum(n for code, n in result["drain_close_codes"].items() if code != "1001")
            + result["not_back"]
            + result["resume_wrong"]
            + sum(storm.errors.values())
        )
        result["pass"] = result["failures"] == 0 and result["conns_ok"] == args.n
    except Exception as e:  # still one JSON line, saying what went wrong
        result["error"] = f"{type(e).__name__}: {e}"
        result["pass"] = False
    finally:
        if storm is not None:
            await storm.close_all()
        if server.proc is not None and server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(server.proc.wait, args.drain_timeout + 10)
            except subprocess.TimeoutExpired:
                server.kill()
        result["wall_s"] = round(time.time() - started, 1)
        if args.keep or not result.get("pass"):
            result["workdir"] = str(workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return result


def summary(r: dict) -> str:
    f = r.get
    return "\n".join(
        [
            f"W5 storm: {f('n')} clients in {f('rooms')} rooms of {f('room_size')}, "
            f"server CPU {f('server_cpu')}, client CPU {f('client_cpu')}, backoff {f('backoff')}"
            + (", WebSocket port socket-activated" if r.get("socket_activation") else ""),
            f"connect: {f('conns_ok')} ok, {f('conns_failed')} failed in {f('connect_time_s')} s = "
            f"{f('accept_rate')} conn/s; handshake p50/p99/max {f('handshake_p50_ms')}/{f('handshake_p99_ms')}/"
            f"{f('handshake_max_ms')} ms; join p50/p99 {f('join_p50_ms')}/{f('join_p99_ms')} ms; "
            f"server {f('server_cpu_ms_per_conn')} ms CPU/conn ({f('server_cpu_pct_connect')} %), "
            f"client {f('client_cpu_pct_connect')} % (lag {f('client_lag_max_ms_connect')} ms), "
            f"other {f('other_cpu_pct_connect')} %",
            f"drain: closes {f('drain_close_codes')} first/p50/last {f('drain_close_first_s')}/"
            f"{f('drain_close_p50_s')}/{f('drain_close_last_s')} s; exit {f('drain_exit_status')} "
            f"after {f('drain_exit_s')} s",
            f"restart: listening {f('restart_listen_s')} s; back first/p50/p99/all {f('back_first_s')}/"
            f"{f('back_p50_s')}/{f('back_p99_s')}/{f('back_all_s')} s ({f('not_back')} not back); "
            f"resumed all {f('resumed_all_s')} s; {f('resumed_msgs')} msgs by resume; "
            f"wrong/gaps/dups {f('resume_wrong')}/{f('resume_gaps')}/{f('resume_dups')}; "
            f"attempts mean/max {f('reconnect_attempts_mean')}/{f('reconnect_attempts_max')}; "
            f"server {f('server_cpu_ms_per_reconnect')} ms CPU/reconnect, client {f('client_cpu_pct_reconnect')} % "
            f"(lag {f('client_lag_max_ms_reconnect')} ms), other {f('other_cpu_pct_reconnect')} %",
            f"failures {f('failures')} errors {f('errors')} -> {'PASS' if f('pass') else 'FAIL'} ({f('wall_s')} s)",
        ]
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("-n", type=int, default=10_000, help="clients (default 10000)")
    p.add_argument("--room-size", type=int, default=5)
    p.add_argument(
        "--concurrency", type=int, default=256, help="handshakes + joins in flight while connecting"
    )
    p.add_argument("--messages", type=int, default=3, help="messages per room before the SIGTERM")
    p.add_argument(
        "--away-every", type=int, default=10, help="every Kth room gets messages while clients are away"
    )
    p.add_argument("--away-messages", type=int, default=2)
    p.add_argument(
        "--backoff",
        choices=["browser", "signalr", "full-jitter"],
        default="browser",
        help="reconnect schedule (default: the browser client's, web/app.js)",
    )
    p.add_argument("--backoff-base", type=float, default=0.5, help="seconds (full-jitter)")
    p.add_argument("--backoff-cap", type=float, default=30.0, help="seconds")
    p.add_argument("--drain-timeout", type=int, default=10, help="the server's --drain-timeout")
    p.add_argument(
        "--socket-activation",
        action="store_true",
        help="pass the WebSocket port as systemd does (chatd.socket): one socket kept across the restart",
    )
    p.add_argument("--timeout", type=float, default=120, help="seconds allowed for everyone to come back")
    p.add_argument("--open-timeout", type=float, default=30, help="seconds per handshake + join")
    p.add_argument("--server-cmd", help="server command before chatd's options; {log} is replaced by a log path "
                   "(default: twistd -n --pidfile= -l {log} chatd, the twistd next to this Python)")  # fmt: skip
    p.add_argument("--port", type=int, help="WebSocket port (default: a free one)")
    p.add_argument("--max-connections", type=int, default=20_000)
    p.add_argument("--server-cpu", type=int, help="pin the server to this CPU (taskset)")
    p.add_argument("--client-cpu", type=int, help="pin this client to this CPU")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--peer", default="chatd", help="label in the output")
    p.add_argument("--run-id", help="label in the output")
    p.add_argument("--out", help="append the JSON line to this file")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, data)")
    args = p.parse_args(argv)
    if args.n < 1 or args.room_size < 1 or args.concurrency < 1:
        p.error("-n, --room-size and --concurrency must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    result = asyncio.run(run(args))
    line = json.dumps(result, separators=(",", ":"))
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    print(summary(result), file=sys.stderr)
    return 0 if result.get("pass") else 1


if __name__ == "__main__":
    sys.exit(main())
