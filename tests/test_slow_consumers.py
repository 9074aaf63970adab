"""Slow consumers and connection storms, over real sockets against ``twistd -n chatd``.

A WebSocket reader that stops reading must be closed once its send bound is
reached, told where to resume (the 1008 close reason ends with ``resume with
ROOM since=N``, N the last message it was sent), and must not slow the room's
other members. A storm of thousands of handshakes from one address must not
stop normal clients from chatting, and the daemon's memory must come back
near where it was once the storm is over.

These are behavioural bounds, not benchmarks: the limits are generous so
that two busy shared cores do not make them flaky.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import orjson
from twisted.internet.task import Clock

from chatd.hub import Hub
from chatd.websocket import CLOSE_POLICY, ChatWebSocketFactory, WebSocketSession
from tests.daemon import Daemon
from tests.test_websocket import _unframe
from tests.wsclient import Client

# -- the resume point, without sockets -------------------------------------------------


class _Closes:
    """A ``/ws`` protocol whose writes are counted and whose close frame is recorded."""

    def __init__(self, proto) -> None:
        self.sent: list[dict] = []
        self.close: tuple[int, str] | None = None
        proto.sendPreparedMessage = self._frame
        proto.sendMessage = lambda payload, isBinary=False: None
        proto.sendCloseFrame = self._close

    def _frame(self, frame) -> None:
        self.sent.append(orjson.loads(_unframe(frame.payloadHybi)))

    def _close(self, code: int, reasonUtf8: bytes, isReply: bool) -> None:  # noqa: N803
        self.close = (code, reasonUtf8.decode())


def test_a_websocket_reader_closed_as_too_slow_is_told_the_seq_to_resume_from_in_each_room() -> None:
    hub = Hub(Clock())
    hub.startService()
    factory = ChatWebSocketFactory(hub, write_limit=300)
    proto = factory.buildProtocol(None)
    out = _Closes(proto)
    session = WebSocketSession(proto, "slow", factory.write_limit)
    hub.connect(session)
    hub.identify(session, "slow")
    hub.join(session, "a")
    hub.join(session, "b")
    hub.publish("a", "bob", "first in a", "websocket")
    hub.publish("b", "bob", "first in b", "websocket")
    session.budget.pauseProducing()  # the kernel buffer is full: from now on bytes are counted
    published = 0
    while out.close is None:
        hub.publish("a", "bob", "x" * 50, "websocket")
        published += 1
        assert published < 100, "never closed"
    code, reason = out.close
    assert code == CLOSE_POLICY
    assert reason.startswith("too slow: more than 300 bytes waiting to be sent")
    # Every message written before the bound was reached is the client's; it resumes after the last.
    last_written_in_a = [m["seq"] for m in out.sent if m["type"] == "message" and m["room"] == "a"][-1]
    assert last_written_in_a > 1
    assert reason.endswith(f"; resume with a since={last_written_in_a}, b since=1"), reason
    assert session.id not in hub.sessions


# -- real sockets --------------------------------------------------------------------------


def _stats(daemon: Daemon) -> dict:
    with urllib.request.urlopen(daemon.url(path="/stats"), timeout=10) as r:
        return json.loads(r.read())


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _poll(condition, timeout: float = 20, every: float = 0.05) -> None:
    """Poll cross-process state until ``condition()`` holds, bounded."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition never became true")
        time.sleep(every)


class RawWebSocket:
    """A WebSocket client by hand on a plain socket, so the test decides when (if ever) it reads.

    ``rcvbuf`` shrinks the kernel's receive buffer before connecting, so a
    reader that stops reading pushes back on the server quickly.
    """

    def __init__(self, port: int, rcvbuf: int | None = None, source: str = "127.0.0.1", timeout: float = 10) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.bind((source, 0))
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        self._buffer = b""
        while b"\r\n\r\n" not in self._buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            self._buffer += chunk
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        self.status = int(head.split(b" ", 2)[1])

    def send(self, **body) -> None:
        payload = orjson.dumps(body)
        mask = os.urandom(4)
        n = len(payload)
        header = bytes([0x81]) + (
            bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n)
        )
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def _read(self, n: int) -> bytes:
        while len(self._buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection ended")
            self._buffer += chunk
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def frame(self) -> tuple[int, bytes]:
        """The next frame from the server (opcode, payload); servers do not mask."""
        first, second = self._read(2)
        n = second & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._read(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._read(8))
        return first & 0x0F, self._read(n)

    def close(self) -> None:
        self.sock.close()


def test_a_websocket_reader_that_stops_reading_is_closed_with_a_resume_point_and_the_room_keeps_its_latency(
) -> None:
    write_limit = 65536
    with Daemon("--write-buffer-size", str(write_limit), "--max-message-rate", "0", "--history-limit", "5000") as d:
        d.wait_healthy()
        port = d.ports["ws"]
        stuck = RawWebSocket(port, rcvbuf=4096)
        assert stuck.status == 101
        stuck.send(type="join", room="busy", user="stuck")
        while orjson.loads(stuck.frame()[1])["type"] != "joined":  # its own presence comes first
            pass
        # From here on, ``stuck`` reads nothing until the server has given up on it.
        readers = [Client(d.ws_url) for _ in range(3)]
        sender = Client(d.ws_url)
        for i, reader in enumerate(readers):
            reader.join("busy", f"reader{i}")
        sender.join("busy", "sender")
        latencies: list[list[float]] = [[] for _ in readers]
        sent_at: dict[str, float] = {}
        done = threading.Event()
        text = "y" * 2000

        def read(i: int, client: Client) -> None:
            while not done.is_set() or len(latencies[i]) < len(sent_at):
                frame = client.recv(timeout=20)
                if frame.get("type") == "message":
                    latencies[i].append(time.monotonic() - sent_at[frame["message"][:12]])

        with ThreadPoolExecutor(len(readers)) as pool:
            futures = [pool.submit(read, i, r) for i, r in enumerate(readers)]
            n = 0
            deadline = time.monotonic() + 60
            while _stats(d)["connections"]["websocket"] == 5:  # the stuck one is still in
                # Bursts well under the bound: a reader that keeps reading is never at risk.
                for _ in range(10):
                    tag = f"{n:012d}"
                    sent_at[tag] = time.monotonic()
                    sender.send(type="message", room="busy", message=tag + text)
                    n += 1
                assert time.monotonic() < deadline, "the stuck reader was never closed"
                time.sleep(0.01)  # pace the sender like a busy chat, not a flood
            # It was closed: now it reads what the server had queued, then the close frame.
            seqs = []
            while True:
                opcode, payload = stuck.frame()
                if opcode == 0x8:
                    break
                if opcode == 0x1 and orjson.loads(payload)["type"] == "message":
                    seqs.append(orjson.loads(payload)["seq"])
            code = struct.unpack("!H", payload[:2])[0]
            reason = payload[2:].decode()
            # The room goes on after the stuck reader is gone.
            for _ in range(50):
                tag = f"{n:012d}"
                sent_at[tag] = time.monotonic()
                sender.send(type="message", room="busy", message=tag + text)
                n += 1
            done.set()
            for future in futures:
                future.result(timeout=60)
        stuck.close()
        for client in (*readers, sender):
            client.close()
    assert code == CLOSE_POLICY
    assert reason.startswith(f"too slow: more than {write_limit} bytes waiting to be sent"), reason
    assert seqs == list(range(1, len(seqs) + 1)), "what was sent is gap-free"
    assert reason.endswith(f"; resume with busy since={seqs[-1]}"), (reason, seqs[-1])
    print(f"stuck reader took {len(seqs)} messages of {n}; latencies p99", [sorted(g)[int(len(g) * 0.99)] for g in latencies])
    for got in latencies:
        assert len(got) == n, "every other member got every message"
        p99 = sorted(got)[int(len(got) * 0.99)]
        assert p99 < 0.5, f"p99 delivery latency {p99:.3f}s while one reader was stuck"


def _send_queue(port: int, client_port: int) -> int:
    """Bytes the kernel holds for the server's socket to one client (``ss`` Send-Q), 0 once it is gone."""
    out = subprocess.run(["ss", "-tnH", "state", "established", f"( sport = :{port} and dport = :{client_port} )"],
                         capture_output=True, text=True).stdout.split()  # fmt: skip
    return int(out[1]) if out else 0


def test_a_reader_that_sends_a_close_and_never_reads_its_answer_is_dropped() -> None:
    """A peer's close is answered, and the connection ended, even when the peer reads nothing more.

    The server's answer waits behind what the client never read (below
    --write-buffer-size, so it was not closed as too slow); a clean close
    waits for that to drain, which never happens. Without a deadline the
    session, its rooms and its buffers were held for ever.
    """
    with Daemon("--max-message-rate", "0") as d:
        d.wait_healthy()
        port = d.ports["ws"]
        frozen = RawWebSocket(port, rcvbuf=4096)
        frozen.send(type="join", room="r", user="frozen")
        while orjson.loads(frozen.frame()[1])["type"] != "joined":
            pass
        client_port = frozen.sock.getsockname()[1]
        with Client(d.ws_url) as sender:
            sender.join("r", "sender")
            last = -1
            for _ in range(200):  # fill the kernel's buffers for the frozen reader
                for _ in range(20):
                    sender.send(type="message", room="r", message="q" * 4000)
                time.sleep(0.15)
                queued = _send_queue(port, client_port)
                if queued == last:
                    break
                last = queued
            for _ in range(40):  # 160 KB more, held by the server itself: well under the 1 MiB bound
                sender.send(type="message", room="r", message="q" * 4000)
            time.sleep(0.5)
            assert _stats(d)["connections"]["websocket"] == 2  # not closed as too slow
            frozen.sock.sendall(bytes([0x88, 0x82]) + b"\0\0\0\0" + struct.pack("!H", 1000))  # and reads nothing
            _poll(lambda: _stats(d)["connections"]["websocket"] == 1, timeout=15)
            with Client(d.ws_url) as probe:
                assert probe.join("r", "probe")["members"] == ["sender", "probe"]
        frozen.close()


def test_a_close_answer_waiting_behind_a_slow_but_reading_client_is_not_cut_short() -> None:
    """The close deadline above is for a reader that stopped: one that still reads gets everything, then the answer."""
    with Daemon("--max-message-rate", "0") as d:
        d.wait_healthy()
        port = d.ports["ws"]
        slow = RawWebSocket(port, rcvbuf=4096, timeout=30)
        slow.send(type="join", room="r", user="slow")
        while orjson.loads(slow.frame()[1])["type"] != "joined":
            pass
        client_port = slow.sock.getsockname()[1]
        sent = 0
        with Client(d.ws_url) as sender:
            sender.join("r", "sender")
            last = -1
            for _ in range(200):
                for _ in range(20):
                    sender.send(type="message", room="r", message="q" * 4000)
                    sent += 1
                time.sleep(0.15)
                queued = _send_queue(port, client_port)
                if queued == last:
                    break
                last = queued
            for _ in range(100):  # 400 KB more in the server's own buffer, under the 1 MiB bound
                sender.send(type="message", room="r", message="q" * 4000)
                sent += 1
            time.sleep(0.5)
            slow.sock.sendall(bytes([0x88, 0x82]) + b"\0\0\0\0" + struct.pack("!H", 1000))
            # Read on, at about 1.3 MB/s: several close deadlines pass before the answer is reached.
            started = time.monotonic()
            while True:
                chunk = slow.sock.recv(65536)
                if not chunk:
                    break
                slow._buffer += chunk
                time.sleep(0.05)
            took = time.monotonic() - started
        seqs, close = [], None
        while slow._buffer:
            opcode, payload = slow.frame()
            if opcode == 0x8:
                close = payload
                break
            if opcode == 0x1 and orjson.loads(payload)["type"] == "message":
                seqs.append(orjson.loads(payload)["seq"])
        slow.close()
    assert took > 3, f"the answer came after {took:.1f} s: the test did not read slowly enough to mean anything"
    assert close is not None and struct.unpack("!H", close[:2])[0] == 1000, "the close answer arrived"
    assert seqs == list(range(1, sent + 1)), (len(seqs), sent)


def _storm_connect(port: int, i: int) -> int:
    """One handshake from the storm's address; every third also joins a room; then gone."""
    try:
        ws = RawWebSocket(port, source="127.0.0.2", timeout=20)
    except OSError:
        return 0
    try:
        if ws.status == 101 and i % 3 == 0:
            ws.send(type="join", room=f"storm{i % 7}", user=f"s{i}")
        return ws.status
    finally:
        ws.close()


def _storm(port: int, count: int, threads: int = 32) -> list[int]:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda i: _storm_connect(port, i), range(count)))


def test_a_storm_of_2000_handshakes_from_one_address_neither_stops_chat_nor_grows_memory() -> None:
    with Daemon("--max-message-rate", "0") as d:
        d.wait_healthy()
        port = d.ports["ws"]
        pid = d.proc.pid
        # Warm up (allocator arenas, module caches), then take the baseline.
        _storm(port, 200)
        _poll(lambda: _stats(d)["connections"]["total"] == 0)
        baseline_rss, baseline_fds = _rss_kib(pid), _fds(pid)

        alice, bob = Client(d.ws_url), Client(d.ws_url)
        alice.join("calm", "alice")
        bob.join("calm", "bob")
        acks: list[float] = []
        storming = threading.Event()
        storm_over = threading.Event()

        def chat() -> None:
            i = 0
            while not storm_over.is_set() or i < 20:
                start = time.monotonic()
                alice.send(type="message", room="calm", message=f"m{i}", ref=i)
                sent = alice.recv_until(lambda f, i=i: f.get("type") == "sent" and f.get("ref") == i, timeout=10)
                acks.append(time.monotonic() - start)
                got = bob.recv_type("message", timeout=10)
                assert (got["message"], got["seq"]) == (f"m{i}", sent["seq"])
                storming.set()
                i += 1
                time.sleep(0.02)

        with ThreadPoolExecutor(1) as pool:
            chatting = pool.submit(chat)
            assert storming.wait(10)
            started = time.monotonic()
            statuses = _storm(port, 2000)
            storm_seconds = time.monotonic() - started
            storm_over.set()
            chatting.result(timeout=60)
        # Only the two chatting clients are left once the storm's sockets are all seen closed.
        _poll(lambda: _stats(d)["connections"]["total"] == 2, timeout=30)
        after_rss, after_fds = _rss_kib(pid), _fds(pid)
        alice.close()
        bob.close()
    print(
        f"storm: {statuses.count(101)} upgraded of {len(statuses)} in {storm_seconds:.1f}s; "
        f"acks max {max(acks):.3f}s over {len(acks)}; RSS {baseline_rss} -> {after_rss} KiB; fds {baseline_fds} -> {after_fds}"
    )
    assert storm_seconds < 120, "the storm is bounded in time"
    assert statuses.count(101) > 1000, "the server took the storm (most handshakes upgraded)"
    assert len(acks) >= 20 and max(acks) < 2.0, f"a send took {max(acks):.3f}s to be acknowledged during the storm"
    assert after_rss - baseline_rss < 20 * 1024, f"RSS grew {after_rss - baseline_rss} KiB over the storm"
    assert after_fds <= baseline_fds + 2 + 4, "file descriptors leaked"  # the two clients' sockets, some slack
