"""The load client: worker processes that each run one asyncio loop.

A worker owns some connections (plain WebSocket through picows, SignalR over
WebSockets with the JSON or MessagePack hub protocol, gRPC ``StreamMessages``
or ``Chat`` streams through ``grpc.aio``) and obeys the parent over a pipe:
connect, run a step, report counts, finish a step, close. Workers with only
WebSocket connections run on uvloop; a worker with gRPC streams runs on the
standard loop, which is what ``grpc.aio`` supports.

Every chat message a sender writes is ``b:<sender>:<seq>:<intended send
unix ns>:xxx…`` padded to the payload size, the load generator's format, so
any server speaking the kit's protocol can be measured and latencies are
open-loop: receive time minus *intended* send time. A step counts messages
whose intended send time falls in its window; the parent turns the per-room
sent counts and member counts of all workers into ``expected``.
"""

from __future__ import annotations

import asyncio
import multiprocessing.connection
import os
import random
import resource
import time
from array import array
from dataclasses import dataclass

try:
    import orjson

    def _dumps(obj: object) -> bytes:
        return orjson.dumps(obj)

except ImportError:  # pragma: no cover
    import json

    def _dumps(obj: object) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()


RS = b"\x1e"
WS_KINDS = ("ws", "signalr-json", "signalr-msgpack")
GRPC_KINDS = ("grpc-stream", "grpc-chat")
KINDS = WS_KINDS + GRPC_KINDS


@dataclass
class Conn:
    """One client connection the parent asks a worker to hold."""

    kind: str
    room: int
    user: int
    sender: int = -1  # sender index, or -1 for a receiver only
    join: bool = True


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


class Worker:
    """The state of one client process: its connections, counters and the current window."""

    def __init__(self, pipe: multiprocessing.connection.Connection, urls: dict[str, str], payload: int) -> None:
        self.pipe = pipe
        self.urls = urls
        self.payload = payload
        self.loop = asyncio.get_running_loop()
        self.win_start = 0
        self.win_end = 0
        self.received = 0
        self.frames = 0
        self.disconnects = 0
        self.write_errors = 0
        self.closing = False
        self.lat = array("q")
        self.sent_room: dict[int, int] = {}
        self.members: dict[int, int] = {}
        self.senders: list[Sender] = []
        self.conns: list[object] = []
        self.tasks: set[asyncio.Task] = set()
        self.cpu_window: float | None = 0.0
        self.cpu_start: float | None = None
        self.senders_running = 0
        self.done = asyncio.get_running_loop().create_future()
        self.grpc_channels: list[object] = []

    # -- receiving ---------------------------------------------------------

    def on_payload(self, data: bytes, marker: bytes = b'"b:') -> None:
        """Count every benchmark message in a frame (a frame may hold several records)."""
        self.frames += 1
        ws = self.win_start
        i = data.find(marker)
        if i < 0 or not ws:
            return
        now = time.time_ns()
        skip = len(marker)
        while i >= 0:
            parts = data[i + skip : i + skip + 64].split(b":", 3)
            try:
                ts = int(parts[2])
            except (IndexError, ValueError):
                ts = 0
            if ws <= ts < self.win_end:
                self.received += 1
                self.lat.append((now - ts) // 1000)
            i = data.find(marker, i + skip)

    def on_message_text(self, text: str) -> None:
        """A gRPC message's text (already decoded by protobuf)."""
        self.frames += 1
        ws = self.win_start
        if not ws or not text.startswith("b:"):
            return
        try:
            ts = int(text.split(":", 4)[3])
        except (IndexError, ValueError):
            return
        if ws <= ts < self.win_end:
            self.received += 1
            self.lat.append((time.time_ns() - ts) // 1000)

    def lost_connection(self) -> None:
        if not self.closing:
            self.disconnects += 1

    # -- commands ----------------------------------------------------------

    def on_pipe(self) -> None:
        try:
            msg = self.pipe.recv()
        except EOFError:
            if not self.done.done():
                self.done.set_result(None)
            return
        cmd = msg["cmd"]
        if cmd == "counts":
            self.pipe.send(self.counts())
        elif cmd in ("connect", "step", "close"):
            task = self.loop.create_task(getattr(self, "cmd_" + cmd)(msg))
            self.tasks.add(task)
            task.add_done_callback(self._task_done)
        elif cmd == "finish":
            self.pipe.send(self.finish())
        elif cmd == "exit":
            if not self.done.done():
                self.done.set_result(None)

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self.pipe.send({"error": f"{type(exc).__name__}: {exc}"})

    def counts(self) -> dict:
        return {
            "received": self.received,
            "frames": self.frames,
            "sent_room": dict(self.sent_room),
            "senders_running": self.senders_running,
        }

    async def cmd_connect(self, msg: dict) -> None:
        conns = [Conn(**c) for c in msg["conns"]]
        rate = msg["rate"]  # connections per second for this worker
        sem = asyncio.Semaphore(msg["concurrency"])
        hs: list[float] = []
        failed = 0
        first_error = ""
        t0 = self.loop.time()

        async def one(i: int, c: Conn) -> None:
            nonlocal failed, first_error
            delay = t0 + i / rate - self.loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            async with sem:
                start = time.perf_counter()
                try:
                    conn = await asyncio.wait_for(self.open(c), msg["timeout"])
                except Exception as exc:  # every failure is counted and the first one reported
                    failed += 1
                    first_error = first_error or f"{c.kind}: {type(exc).__name__}: {exc}"
                    return
                hs.append(time.perf_counter() - start)
            self.conns.append(conn)
            self.members[c.room] = self.members.get(c.room, 0) + 1
            if c.sender >= 0:
                self.senders.append(Sender(self, conn, c))

        await asyncio.gather(*(one(i, c) for i, c in enumerate(conns)))
        self.pipe.send(
            {
                "ok": len(hs),
                "failed": failed,
                "first_error": first_error,
                "handshake_s": hs,
                "members": self.members,
                "wall_s": self.loop.time() - t0,
            }
        )

    async def open(self, c: Conn) -> object:
        if c.kind == "ws":
            return await WSClient.open(self, c)
        if c.kind.startswith("signalr"):
            return await SignalRClient.open(self, c)
        if c.kind == "grpc-stream":
            return await GrpcStream.open(self, c)
        if c.kind == "grpc-chat":
            return await GrpcChat.open(self, c)
        raise ValueError(f"unknown connection kind {c.kind}")

    async def cmd_step(self, msg: dict) -> None:
        """Start every sender on the shared schedule; measure this process's CPU over the window."""
        self.received = 0
        self.lat = array("q")
        self.sent_room = {}
        self.win_start, self.win_end = msg["win_start"], msg["win_end"]
        d0, e0 = self.disconnects, self.write_errors
        rng = random.Random(msg["seed"])
        offset = time.time_ns() - int(self.loop.time() * 1e9)  # unix ns = loop ns + offset
        for s in self.senders:
            s.start(msg["rate"], msg["t0"], msg["win_end"], rng.random(), offset)
        self._step_base = (d0, e0)
        self.cpu_window, self.cpu_start = None, None
        self.pipe.send({"started": len(self.senders)})
        await asyncio.sleep(max(0.0, (self.win_start - time.time_ns()) / 1e9))
        self.cpu_start = _cpu()
        await asyncio.sleep(max(0.0, (self.win_end - time.time_ns()) / 1e9))
        if self.cpu_window is None:  # finish() may have come first: it measured already
            self.cpu_window = _cpu() - self.cpu_start

    def finish(self) -> dict:
        """Close the window: nothing arriving from now on is counted."""
        self.win_start = self.win_end = 0
        if self.cpu_window is None:
            self.cpu_window = _cpu() - self.cpu_start if self.cpu_start is not None else 0.0
        for s in self.senders:
            s.stop()
        d0, e0 = getattr(self, "_step_base", (self.disconnects, self.write_errors))
        return {
            "received": self.received,
            "sent_room": dict(self.sent_room),
            "lat_us": self.lat.tobytes(),
            "cpu_s": self.cpu_window,
            "disconnects": self.disconnects - d0,
            "write_errors": self.write_errors - e0,
            "frames": self.frames,
            "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        }

    async def cmd_close(self, msg: dict) -> None:
        self.closing = True
        for s in self.senders:
            s.stop()
        for c in self.conns:
            try:
                c.close()  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        for ch in self.grpc_channels:
            await ch.close()  # type: ignore[attr-defined]
        await asyncio.sleep(0.2)
        self.pipe.send({"closed": len(self.conns)})


class Sender:
    """An open-loop sender: message k is due at t0 + (phase + k) / rate, whenever it really goes out."""

    def __init__(self, worker: Worker, conn: object, c: Conn) -> None:
        self.w = worker
        self.conn = conn
        self.room = c.room
        self.index = c.sender
        self.user = c.user
        self.seq = 0
        self.handle: asyncio.TimerHandle | None = None
        user = f"u{c.user}".encode()
        self.prefix = b'{"user":"' + user + b'","room":"r' + str(c.room).encode() + b'","message":"'
        self.mprefix = f"b:{c.sender}:".encode()

    def start(self, rate: float, t0: int, stop: int, phase: float, offset: int) -> None:
        self.interval = int(1e9 / rate)
        self.next = t0 + int(phase * self.interval)
        self.stop_at = stop
        self.offset = offset
        self.w.senders_running += 1
        self._schedule()

    def _schedule(self) -> None:
        if self.next >= self.stop_at:
            self.w.senders_running -= 1
            self.handle = None
            return
        self.handle = self.w.loop.call_at((self.next - self.offset) / 1e9, self._fire)

    def _fire(self) -> None:
        # The intended send time, or now if the loop fired early: uvloop's timers
        # have millisecond resolution (asyncio's run a callback up to its clock's
        # resolution early), and a message stamped later than it left made a fast
        # server's latencies negative (a p50 of -0.095 ms once). A late send keeps
        # the intended time: that is what makes the client open-loop.
        ts = min(self.next, time.time_ns())
        text = self.mprefix + str(self.seq).encode() + b":" + str(ts).encode() + b":"
        pad = self.w.payload - len(self.prefix) - len(text) - 2
        if pad > 0:
            text += b"x" * pad
        self.seq += 1
        try:
            self.conn.send_chat(self, text)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - a dead connection counts as a write error
            self.w.write_errors += 1
            self.w.senders_running -= 1
            self.handle = None
            return
        w = self.w
        if w.win_start <= ts < w.win_end:
            w.sent_room[self.room] = w.sent_room.get(self.room, 0) + 1
        self.next += self.interval
        self._schedule()

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
            self.w.senders_running -= 1


# -- WebSocket and SignalR over picows ----------------------------------------

try:
    from picows import WSListener, WSMsgType, ws_connect
except ImportError:  # pragma: no cover - the bench extra is not installed
    WSListener = object  # type: ignore[misc,assignment]
    WSMsgType = ws_connect = None  # type: ignore[assignment]


class _Listener(WSListener):  # type: ignore[misc,valid-type]
    def __init__(self, worker: Worker, marker: bytes) -> None:
        super().__init__()
        self.w = worker
        self.marker = marker
        self.first: asyncio.Future | None = None

    def on_ws_frame(self, transport, frame) -> None:
        t = frame.msg_type
        if t is WSMsgType.TEXT or t is WSMsgType.BINARY:
            data = frame.get_payload_as_bytes()
            if self.first is not None and not self.first.done():
                self.first.set_result(data)
                return
            self.w.on_payload(data, self.marker)
        elif t is WSMsgType.CLOSE:
            transport.disconnect()
        elif t is WSMsgType.PING:
            transport.send_pong(frame.get_payload_as_bytes())

    def on_ws_disconnected(self, transport) -> None:
        if self.first is not None and not self.first.done():
            self.first.set_exception(ConnectionError("closed during the handshake"))
        self.w.lost_connection()


class WSClient:
    """The kit's protocol: join, then chat frames; every frame with a message is counted."""

    def __init__(self, transport) -> None:
        self.t = transport

    @classmethod
    async def open(cls, w: Worker, c: Conn) -> WSClient:
        transport, _ = await ws_connect(lambda: _Listener(w, b'"b:'), w.urls["ws"])
        if c.join:
            transport.send(WSMsgType.TEXT, b'{"type":"join","room":"r%d","user":"u%d"}' % (c.room, c.user))
        return cls(transport)

    def send_chat(self, s: Sender, text: bytes) -> None:
        self.t.send(WSMsgType.TEXT, s.prefix + text + b'"}')

    def close(self) -> None:
        self.t.disconnect()


class SignalRClient:
    """SignalR over WebSockets without negotiate (``skipNegotiation``), JSON or MessagePack records."""

    def __init__(self, w: Worker, transport, msgpack: bool) -> None:
        self.w = w
        self.t = transport
        self.msgpack = msgpack
        self.ping = w.loop.call_later(10, self._ping)

    @classmethod
    async def open(cls, w: Worker, c: Conn) -> SignalRClient:
        msgpack = c.kind == "signalr-msgpack"
        listener = _Listener(w, b"b:" if msgpack else b'"b:')
        listener.first = w.loop.create_future()
        transport, _ = await ws_connect(lambda: listener, f"{w.urls['signalr']}?user=u{c.user}")
        proto = b"messagepack" if msgpack else b"json"
        transport.send(WSMsgType.TEXT, b'{"protocol":"' + proto + b'","version":1}' + RS)
        reply = await listener.first
        listener.first = None
        if not reply.startswith(b"{}"):
            transport.disconnect()
            raise ConnectionError(f"SignalR handshake refused: {reply[:200]!r}")
        self = cls(w, transport, msgpack)
        if c.join:
            self.invoke("JoinRoom", [f"r{c.room}", f"u{c.user}"])
        return self

    def invoke(self, target: str, args: list) -> None:
        if self.msgpack:
            import msgpack

            body = msgpack.packb([1, {}, None, target, args])
            self.t.send(WSMsgType.BINARY, _varint(len(body)) + body)
        else:
            self.t.send(WSMsgType.TEXT, _dumps({"type": 1, "target": target, "arguments": args}) + RS)

    def _ping(self) -> None:
        if self.t.is_disconnected:
            return
        if self.msgpack:
            self.t.send(WSMsgType.BINARY, b"\x02\x91\x06")  # varint 2, msgpack [6]
        else:
            self.t.send(WSMsgType.TEXT, b'{"type":6}' + RS)
        self.ping = self.w.loop.call_later(10, self._ping)

    def send_chat(self, s: Sender, text: bytes) -> None:
        self.invoke("SendToRoom", [f"r{s.room}", f"u{s.user}", text.decode()])

    def close(self) -> None:
        self.ping.cancel()
        self.t.disconnect()


# -- gRPC through grpc.aio ------------------------------------------------------


def _grpc_channel(w: Worker) -> object:
    """Streams are spread over several HTTP/2 connections, 50 streams each."""
    import grpc.aio

    n = len(w.grpc_channels)
    if not n or getattr(w, "_streams_on_last", 0) >= 50:
        w.grpc_channels.append(
            grpc.aio.insecure_channel(w.urls["grpc"], options=[("grpc.use_local_subchannel_pool", 1)])
        )
        w._streams_on_last = 0  # type: ignore[attr-defined]
    w._streams_on_last += 1  # type: ignore[attr-defined]
    return w.grpc_channels[-1]


def _pb():
    from chatd.grpc.generated import chat_pb2 as pb
    from chatd.grpc.generated.chat_pb2_grpc import ChatServiceStub

    return pb, ChatServiceStub


class GrpcStream:
    """A ``StreamMessages`` subscriber: one server-streaming call per receiver."""

    @classmethod
    async def open(cls, w: Worker, c: Conn) -> GrpcStream:
        pb, Stub = _pb()
        self = cls()
        self.w = w
        self.call = Stub(_grpc_channel(w)).StreamMessages(pb.StreamRequest(room=f"r{c.room}", user=f"u{c.user}"))
        # chatd sends initial metadata only when history was truncated, so the
        # subscription cannot be confirmed here: the step's settle time covers it.
        self.task = w.loop.create_task(self._read())
        return self

    async def _read(self) -> None:
        try:
            async for m in self.call:
                self.w.on_message_text(m.message)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the stream ended: counted as a disconnect
            pass
        self.w.lost_connection()

    def close(self) -> None:
        self.call.cancel()


class GrpcChat:
    """A two-way ``Chat`` call: joined to its room, it receives and, as a sender, sends."""

    @classmethod
    async def open(cls, w: Worker, c: Conn) -> GrpcChat:
        pb, Stub = _pb()
        self = cls()
        self.w = w
        self.pb = pb
        self.call = Stub(_grpc_channel(w)).Chat()
        await self.call.write(pb.ChatEvent(join=pb.Join(room=f"r{c.room}", user=f"u{c.user}")))
        while True:
            ev = await self.call.read()
            kind = ev.WhichOneof("event") if hasattr(ev, "WhichOneof") else None
            if kind == "joined":
                break
            if kind in (None, "error"):
                raise ConnectionError(f"gRPC join refused: {ev}")
        self.queue: asyncio.Queue = asyncio.Queue()
        self.reader = w.loop.create_task(self._read())
        self.writer = w.loop.create_task(self._write())
        return self

    async def _read(self) -> None:
        try:
            while True:
                ev = await self.call.read()
                if ev is None or not hasattr(ev, "WhichOneof"):
                    break
                if ev.WhichOneof("event") == "message":
                    self.w.on_message_text(ev.message.message)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the stream ended: counted as a disconnect
            pass
        self.w.lost_connection()

    async def _write(self) -> None:
        while True:
            room, text = await self.queue.get()
            try:
                await self.call.write(self.pb.ChatEvent(send=self.pb.Send(room=room, message=text)))
            except Exception:  # noqa: BLE001
                self.w.write_errors += 1
                return

    def send_chat(self, s: Sender, text: bytes) -> None:
        self.queue.put_nowait((f"r{s.room}", text.decode()))

    def close(self) -> None:
        self.writer.cancel()
        self.call.cancel()


# -- the process --------------------------------------------------------------


def handoffs_batched() -> None:
    """Put the calling thread, and the threads it starts, in ``SCHED_BATCH`` (where Linux has it).

    The loop thread and ``grpc.aio``'s poller thread (started from it) hand
    every completed operation to each other; as normal threads each woken one
    preempted the other at once. A batch thread keeps its fair share of the
    CPU but does not preempt on wake-up. Measured: a fifth less CPU per gRPC
    message, for the load client; not for chatd, whose streams then fell
    behind a busy reactor thread (``chatd.grpc.aio``).
    """
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or refused: only slower
        pass


def worker_main(pipe: multiprocessing.connection.Connection, urls: dict[str, str], payload: int,
                cpus: list[int] | None, uv: bool) -> None:
    """Entry point of a client process (started by the parent with ``multiprocessing``)."""
    if cpus:
        os.sched_setaffinity(0, cpus)

    async def serve() -> None:
        w = Worker(pipe, urls, payload)
        w.loop.add_reader(pipe.fileno(), w.on_pipe)
        # uvloop makes the fd non-blocking; a large reply must not fail with EAGAIN
        # (the parent reads it at once, so a blocking send only waits for it).
        os.set_blocking(pipe.fileno(), True)
        pipe.send({"ready": True, "pid": os.getpid()})
        await w.done

    if uv:
        try:
            import uvloop

            uvloop.run(serve())
            return
        except ImportError:  # pragma: no cover
            pass
    # gRPC workers: chatd's loop (grpc's wake-ups read in one go) and a batch-scheduled
    # thread (no preemption at each hand-off), so that the client's per-message cost
    # does not cap W4 before the server does.
    from chatd.grpc.aio import GrpcLoop

    handoffs_batched()
    with asyncio.Runner(loop_factory=GrpcLoop) as runner:
        runner.run(serve())
