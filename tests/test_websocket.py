"""The WebSocket protocol over real sockets, driven by the ``websockets`` library."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import orjson
import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from websockets.exceptions import ConnectionClosed, InvalidStatus

from chatd import websocket
from chatd.hub import Hub
from chatd.validate import Limits
from chatd.websocket import ChatWebSocketFactory, WebSocketSession
from tests.wsclient import Client


def get_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def on_reactor(f, *args):
    """Read hub state from a test thread safely: run ``f`` on the reactor thread."""
    from twisted.internet import reactor

    return blockingCallFromThread(reactor, f, *args)


def wait_for(condition, attempts: int = 200) -> None:
    """Poll an observable condition (each poll is a real request), bounded."""
    for _ in range(attempts):
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition never became true")


def assert_silent(client: Client) -> None:
    """Nothing (more) arrives: proven by a ping answered with the very next frame."""
    client.send(type="ping")
    assert client.recv() == {"type": "pong"}


@pytest_twisted.ensureDeferred
async def test_room_members_receive_and_other_rooms_do_not(chatd) -> None:
    def scenario():
        with Client(chatd.ws_url) as a, Client(chatd.ws_url) as b, Client(chatd.ws_url) as c:
            a.join("lobby", "alice")
            b.join("lobby", "bob")
            c.join("elsewhere", "carol")
            a.send(type="message", room="lobby", message="hello bob")
            got_a, got_b = a.recv_type("message"), b.recv_type("message")
            assert got_a == got_b
            assert got_b["user"] == "alice"
            assert got_b["message"] == "hello bob"
            assert got_b["room"] == "lobby"
            assert got_b["protocol"] == "websocket"
            assert got_b["seq"] == 1
            assert set(got_b) == {"type", "id", "seq", "room", "user", "message", "timestamp", "protocol"}
            assert got_b["timestamp"].endswith("Z")
            assert_silent(c)

    await deferToThread(scenario)


@pytest_twisted.ensureDeferred
async def test_seed_form_joins_and_publishes(chatd) -> None:
    def scenario():
        with Client(chatd.ws_url) as a, Client(chatd.ws_url) as b:
            b.join("general", "bob")
            a.send(user="alice", message="hi from the seed", room="general")
            assert b.recv_type("presence")["user"] == "alice"
            got = b.recv_type("message")
            assert (got["user"], got["message"]) == ("alice", "hi from the seed")
            assert a.recv_type("message")["id"] == got["id"]

    await deferToThread(scenario)


@pytest_twisted.ensureDeferred
async def test_200_messages_arrive_in_order(start) -> None:
    chatd = await start("--max-message-rate", "0")  # as fast as the client can send

    def scenario():
        with Client(chatd.ws_url) as a, Client(chatd.ws_url) as b:
            a.join("r", "alice")
            b.join("r", "bob")
            for i in range(200):
                a.send(type="message", room="r", message=f"m{i}")
            got = [b.recv_type("message") for _ in range(200)]
            assert [m["message"] for m in got] == [f"m{i}" for i in range(200)]
            seqs = [m["seq"] for m in got]
            assert seqs == sorted(seqs) and len(set(seqs)) == 200

    await deferToThread(scenario)


@pytest_twisted.ensureDeferred
async def test_leave_and_disconnect_emit_presence(chatd) -> None:
    def scenario():
        with Client(chatd.ws_url) as a:
            joined = a.join("r", "alice")
            assert joined["members"] == ["alice"]
            b = Client(chatd.ws_url)
            assert b.join("r", "bob")["members"] == ["alice", "bob"]
            p = a.recv_type("presence")
            assert (p["action"], p["user"], p["count"]) == ("join", "bob", 2)
            b.send(type="leave", room="r")
            assert b.recv_type("left") == {"type": "left", "room": "r"}
            p = a.recv_type("presence")
            assert (p["action"], p["user"], p["count"]) == ("leave", "bob", 1)
            b.join("r", "bob")
            a.recv_type("presence")
            b.close()
            p = a.recv_type("presence")
            assert (p["action"], p["user"], p["count"]) == ("leave", "bob", 1)

    await deferToThread(scenario)


BAD_INPUTS = [
    ("{not json", "malformed JSON", None),
    ("[1, 2]", "a request must be a JSON object", None),
    ('"just a string"', "a request must be a JSON object", None),
    ('{"type": "dance"}', "unknown type: dance", "dance"),
    ('{"type": 7}', "unknown type: 7", 7),
    ('{"hello": "world"}', "missing type", "message"),
    ('{"type": "join", "user": "zed"}', "room must be a string", "join"),
    ('{"type": "join", "room": "ok", "user": 12}', "user must be a string", "join"),
    ('{"type": "join", "room": "bad room!", "user": "zed"}', "invalid room name", "join"),
    ('{"type": "join", "room": "ok", "user": "<script>"}', "invalid user name", "join"),
    ('{"type": "join", "room": "ok", "user": "mallory"}', "user name is fixed", "join"),
    ('{"type": "message", "room": "r", "message": ""}', "message must not be empty", "message"),
    ('{"type": "message", "room": "r", "message": 5}', "message must be a string", "message"),
    ('{"type": "message", "room": "r", "message": "' + "x" * 4097 + '"}', "message too long", "message"),
    ('{"type": "message", "room": "other", "message": "hi"}', "not in room other", "message"),
    ('{"type": "leave", "room": "never"}', "not in room never", "leave"),
    ('{"type": "history", "room": "r", "limit": "ten"}', "limit must be an integer", "history"),
    ('{"type": "history", "room": "r", "limit": 0}', "limit must be at least 1", "history"),
    ('{"user": "alice", "message": "hi", "room": "a b"}', "invalid room name", "message"),
]


@pytest_twisted.ensureDeferred
async def test_bad_input_gets_an_error_and_changes_nothing(chatd) -> None:
    def scenario():
        with Client(chatd.ws_url) as a, Client(chatd.ws_url) as watcher:
            a.join("r", "alice")
            watcher.join("r", "watcher")
            a.recv_type("presence")  # watcher's join
            before = chatd.hub.stats()
            for raw, reason, request_type in BAD_INPUTS:
                a.send_raw(raw)
                error = a.recv()
                assert error["type"] == "error", raw
                assert reason in error["error"], (raw, error)
                assert error.get("request") == request_type, (raw, error)
                assert_silent(a)
            a.send_raw(b"\x00binary")
            assert "binary" in a.recv_type("error")["error"]
            # The connection still works and nobody else saw anything.
            assert_silent(watcher)
            assert chatd.hub.stats()["messages"] == before["messages"]
            assert chatd.hub.members("r") == ["alice", "watcher"]
            assert a.join("r", "alice")["members"] == ["alice", "watcher"]
            a.send(type="message", room="r", message="still works", ref=42)
            assert watcher.recv_type("message")["message"] == "still works"

    await deferToThread(scenario)


@pytest_twisted.ensureDeferred
async def test_replies_and_errors_echo_ref(chatd) -> None:
    def scenario():
        with Client(chatd.ws_url) as a:
            a.send(type="ping", ref="p1")
            assert a.recv() == {"type": "pong", "ref": "p1"}
            a.send(type="leave", room="nowhere", ref=7)
            assert a.recv()["ref"] == 7
            a.send(user="alice", room="r", message="acknowledge me", ref="m1")
            echo = a.recv_type("message")  # delivered to the room, then acknowledged
            ack = a.recv_type("sent")
            assert ack == {"type": "sent", "room": "r", "id": echo["id"], "seq": echo["seq"], "ref": "m1"}

    await deferToThread(scenario)


@pytest_twisted.ensureDeferred
async def test_history_returns_the_last_n(start) -> None:
    running = await start("--history-limit", "5")

    def scenario():
        with Client(running.ws_url) as a:
            a.join("r", "alice")
            for i in range(8):
                a.send(type="message", room="r", message=f"m{i}")
                a.recv_type("message")
            a.send(type="history", room="r", limit=3)
            reply = a.recv_type("history")
            assert [m["message"] for m in reply["messages"]] == ["m5", "m6", "m7"]
            assert [m["seq"] for m in reply["messages"]] == [6, 7, 8]
            a.send(type="history", room="r")
            assert [m["message"] for m in a.recv_type("history")["messages"]] == [
                f"m{i}" for i in range(3, 8)
            ]

    await deferToThread(scenario)


@pytest_twisted.ensureDeferred
async def test_a_history_reply_fits_the_common_client_frame_limit(start) -> None:
    """A full room of long non-Latin messages, under the default limits, is a reply a ``websockets`` client can read.

    100 kept messages of 4,096 characters (both defaults) of three-byte
    UTF-8 text are about 1.2 MB of JSON; the ``websockets`` library reads at
    most 1 MiB a message unless told otherwise, and closed the connection
    (1009, message too big) on the history reply. The reply now holds the
    newest messages that fit in 1 MiB and says some were left out.
    """
    running = await start("--max-message-rate", "0", "--max-connection-rate", "0")
    text = "漢字かな" * 1024  # 4,096 characters, 12,288 bytes

    def scenario():
        with Client(running.ws_url, max_size=None) as sender:
            sender.join("r", "alice")
            for i in range(100):
                sender.send(type="message", room="r", message=f"{i:03d}" + text[3:])
                sender.recv_type("message")
        # The library's own default frame limit (1 MiB), as most of its users run it.
        with Client(running.ws_url) as reader:
            reader.join("r", "bob")
            reader.send(type="history", room="r", ref="h1")
            frame = reader.ws.recv(timeout=10)
            assert len(frame.encode()) <= 1 << 20
            reply = json.loads(frame)
            assert reply["type"] == "history" and reply["ref"] == "h1" and reply["truncated"] is True
            seqs = [m["seq"] for m in reply["messages"]]
            assert len(seqs) >= 80 and seqs == list(range(101 - len(seqs), 101))  # the newest, in order
            assert all(m["message"][3:] == text[3:] for m in reply["messages"])
            # What fits is whole, and says nothing was left out.
            reader.send(type="history", room="r", limit=10)
            reply = reader.recv_type("history")
            assert [m["seq"] for m in reply["messages"]] == list(range(91, 101))
            assert "truncated" not in reply
            reader.send(type="ping")
            assert reader.recv_type("pong") == {"type": "pong"}  # still connected

    await deferToThread(scenario)


@pytest_twisted.ensureDeferred
async def test_health_and_stats_report_the_right_counts(chatd) -> None:
    def scenario():
        code, body = get_json(chatd.http_url + "/health")
        assert code == 200
        assert set(body) == {"status", "service", "timestamp", "clients", "uptime"}
        assert (body["status"], body["service"], body["clients"]) == ("healthy", "websocket", 0)
        with Client(chatd.ws_url) as a, Client(chatd.ws_url) as b:
            a.join("r1", "alice")
            b.join("r2", "bob")
            for i in range(3):
                a.send(type="message", room="r1", message=f"m{i}")
                a.recv_type("message")
            assert get_json(chatd.http_url + "/health")[1]["clients"] == 2
            code, stats = get_json(chatd.http_url + "/stats")
            assert code == 200
            assert stats["connections"]["total"] == 2
            assert stats["connections"]["websocket"] == 2
            assert stats["rooms"] == 2
            assert stats["messages"]["total"] == 3
            assert stats["uptime"] >= 0
        with urllib.request.urlopen(chatd.http_url + "/", timeout=10) as r:
            assert b"chatd" in r.read()

    await deferToThread(scenario)


@pytest_twisted.ensureDeferred
async def test_max_connections_refuses_the_next_with_a_reason(start) -> None:
    running = await start("--max-connections", "2")

    def scenario():
        with Client(running.ws_url) as a, Client(running.ws_url) as b:
            a.join("r", "a")
            b.join("r", "b")
            a.recv_type("presence")
            c = Client(running.ws_url)
            with pytest.raises(ConnectionClosed) as info:
                c.recv()
            assert info.value.rcvd.code == 1013
            assert "server full" in info.value.rcvd.reason
            assert_silent(a)
        # Once they have left, a new one gets in.
        wait_for(lambda: get_json(running.http_url + "/health")[1]["clients"] == 0)
        with Client(running.ws_url) as d:
            assert_silent(d)

    await deferToThread(scenario)


@pytest_twisted.ensureDeferred
async def test_origin_check(chatd) -> None:
    port = chatd.ports["ws"]

    def scenario():
        with Client(chatd.ws_url, origin=f"http://127.0.0.1:{port + 1}") as same_host:
            assert_silent(same_host)
        with pytest.raises(InvalidStatus) as info:
            Client(chatd.ws_url, origin="http://evil.example")
        assert info.value.response.status_code == 403

    await deferToThread(scenario)


@pytest_twisted.ensureDeferred
async def test_configured_origins(start) -> None:
    running = await start("--allowed-origins", "https://chat.example.com")

    def scenario():
        with Client(running.ws_url, origin="https://chat.example.com") as ok:
            assert_silent(ok)
        with pytest.raises(InvalidStatus):
            Client(running.ws_url, origin="http://127.0.0.1:1234")

    await deferToThread(scenario)


class _RawWebSocket:
    """A hand-made client socket: it reads server frames only when the test says so."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        self._buffer = b""
        self.sock.sendall(
            b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        while b"\r\n\r\n" not in self._buffer:
            self._fill()
        response, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        assert b" 101 " in response.split(b"\r\n")[0]

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise EOFError("the server closed the TCP connection")
        self._buffer += chunk

    def _take(self, n: int) -> bytes:
        while len(self._buffer) < n:
            self._fill()
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def send_json(self, body: dict) -> None:
        payload = json.dumps(body).encode()
        mask = b"\x01\x02\x03\x04"
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)

    def read_frame(self) -> tuple[int, bytes]:
        """The next server frame (unmasked): its opcode and payload."""
        first, second = self._take(2)
        n = second & 0x7F
        if n == 126:
            n = int.from_bytes(self._take(2), "big")
        elif n == 127:
            n = int.from_bytes(self._take(8), "big")
        return first & 0x0F, self._take(n)

    def close(self) -> None:
        self.sock.close()


def _stalled_websocket(port: int) -> _RawWebSocket:
    """A raw client that completes the handshake, joins ``r`` as sloth, then stops reading."""
    s = _RawWebSocket(port)
    s.send_json({"type": "join", "room": "r", "user": "sloth"})
    while True:
        opcode, payload = s.read_frame()
        if opcode == 0x1 and json.loads(payload)["type"] == "joined":
            assert json.loads(payload)["members"] == ["sloth"]
            return s


def _scrape(url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest_twisted.ensureDeferred
async def test_a_slow_reader_is_closed_and_the_room_carries_on(start) -> None:
    running = await start("--write-buffer-size", "262144", "--max-message-rate", "0")
    big = "x" * 4000
    slow_metric = ("chatd_sessions_closed_slow_total", (("protocol", "websocket"),))

    def scenario():
        assert _scrape(running.http_url + "/metrics")[slow_metric] == 0
        slow = _stalled_websocket(running.ports["ws"])  # in the room: its join was answered
        try:
            with Client(running.ws_url) as sender, Client(running.ws_url) as reader:
                assert sender.join("r", "sender")["members"] == ["sloth", "sender"]
                reader.join("r", "reader")
                count = 0
                while "sloth" in on_reactor(running.hub.members, "r"):
                    assert count < 20000, "the stalled reader was never closed"
                    for _ in range(20):
                        sender.send(type="message", room="r", message=big)
                        count += 1
                    for _ in range(20):
                        sender.recv_type("message")
                # What the slow reader finally reads ends with a 1008 close frame
                # (read now: the server drops it unread after its close timeout).
                while True:
                    opcode, payload = slow.read_frame()
                    if opcode == 0x8:
                        break
                assert int.from_bytes(payload[:2], "big") == 1008
                assert payload[2:].decode().startswith("too slow")
                for _ in range(count):
                    assert reader.recv_type("message")["message"] == big
                assert_silent(reader)
                assert sender.join("r", "sender")["members"] == ["sender", "reader"]
        finally:
            slow.close()
        assert _scrape(running.http_url + "/metrics")[slow_metric] == 1

    await deferToThread(scenario)


@pytest_twisted.ensureDeferred
async def test_an_oversized_frame_is_refused_with_1009(start) -> None:
    running = await start("--read-buffer-size", "1024")

    def scenario():
        with Client(running.ws_url) as a:
            a.send_raw(json.dumps({"type": "ping", "pad": "x" * 2000}))
            with pytest.raises(ConnectionClosed) as info:
                a.recv()
            assert info.value.rcvd.code == 1009

    await deferToThread(scenario)


@pytest_twisted.ensureDeferred
async def test_a_unix_socket_listener_works_like_tcp(start, tmp_path) -> None:
    from websockets.sync.client import unix_connect

    path = tmp_path / "chatd.sock"
    running = await start("--ws", f"unix:{path}")

    def scenario():
        with unix_connect(str(path), "ws://localhost/ws") as ws:
            ws.send(json.dumps({"type": "join", "room": "r", "user": "unixy"}))
            frames = [json.loads(ws.recv(timeout=10)) for _ in range(2)]
            assert {"type": "joined", "room": "r", "user": "unixy", "members": ["unixy"]} in frames

    await deferToThread(scenario)
    assert running.hub.stats()["connections_accepted"] == 1


@pytest_twisted.ensureDeferred
async def test_a_flooding_user_is_rate_limited_and_the_connection_lives(start) -> None:
    running = await start("--max-message-rate", "1", "--message-burst", "3")

    def scenario():
        with Client(running.ws_url) as a, Client(running.ws_url) as b:
            a.join("r", "flood")
            b.join("r", "calm")
            for i in range(3):
                a.send(type="message", room="r", message=f"m{i}")
            a.send(type="message", room="r", message="one too many", ref="x")
            error = a.recv_type("error")
            assert "rate limited" in error["error"]
            assert (error["request"], error["ref"]) == ("message", "x")
            assert [b.recv_type("message")["message"] for _ in range(3)] == ["m0", "m1", "m2"]
            assert_silent(b)
            # Another user is not affected.
            b.send(type="message", room="r", message="my turn")
            assert a.recv_type("message")["message"] == "my turn"

    await deferToThread(scenario)


# -- dispatch without sockets: fuzzed input never escapes as an exception ------------


def _unframe(data: bytes) -> bytes:
    """The payload of one unmasked server frame."""
    n = data[1] & 0x7F
    start = {126: 4, 127: 10}.get(n, 2)
    return data[start:]


class _Recorder:
    """Stands in for the Autobahn protocol's writes: replies and room frames, decoded."""

    def __init__(self) -> None:
        self.replies: list[dict] = []
        self.frames: list[dict] = []

    def sendMessage(self, payload: bytes, isBinary: bool = False) -> None:  # noqa: N802, N803
        self.replies.append(orjson.loads(payload))

    def sendPreparedMessage(self, frame) -> None:  # noqa: N802
        self.frames.append(orjson.loads(_unframe(frame.payloadHybi)))


class _Dispatch:
    """A hub, a ``/ws`` protocol whose writes are recorded, and a watcher in room ``r``."""

    def __init__(self, identified: bool, limits: Limits | None = None) -> None:
        self.hub = Hub(Clock(), limits=limits)
        self.hub.startService()
        factory = ChatWebSocketFactory(self.hub)
        self.proto = factory.buildProtocol(None)
        self.out = _Recorder()
        self.proto.sendMessage = self.out.sendMessage
        self.proto.sendPreparedMessage = self.out.sendPreparedMessage
        self.session = WebSocketSession(self.proto, "fuzz", 1 << 20)
        self.hub.connect(self.session)
        self.proto.session = self.session
        watcher_proto = factory.buildProtocol(None)
        self.seen = _Recorder()
        watcher_proto.sendMessage = self.seen.sendMessage
        watcher_proto.sendPreparedMessage = self.seen.sendPreparedMessage
        self.watcher = WebSocketSession(watcher_proto, "watcher", 1 << 20)
        self.hub.connect(self.watcher)
        self.hub.identify(self.watcher, "watcher")
        self.hub.join(self.watcher, "r")
        if identified:
            self.hub.identify(self.session, "alice")
            self.hub.join(self.session, "r")
        self.hub.publish("r", "watcher", "before", "websocket")
        self.out.frames.clear()
        self.seen.frames.clear()

    def state(self) -> tuple:
        """Everything a request could change, for before/after comparison."""
        hub = self.hub
        stats = hub.stats()
        return (
            sorted(hub.sessions),
            hub.rooms(),
            {room: hub.members(room) for room in hub.rooms()},
            stats["connections"],
            stats["messages"]["total"],
            [(s.user, sorted(s.rooms)) for s in (self.session, self.watcher)],
            [(m.seq, m.user, m.text) for m in hub.store.recent("r", hub.limits.history_limit)],
        )

    def send(self, payload: bytes, binary: bool = False) -> None:
        self.proto.onMessage(payload, binary)


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=80)
)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_FIELDS = {
    "type": st.sampled_from(["join", "leave", "message", "history", "ping", "dance"]) | _json,
    "room": st.sampled_from(["r", "s", "bad room", ""]) | _json,
    "user": st.sampled_from(["alice", "bob", "<x>"]) | _json,
    "message": st.sampled_from(["hi", "", " "]) | _json,
    "limit": st.sampled_from([1, 5, 0, -1]) | _json,
    "ref": st.sampled_from(["a", 1, 2.5]) | _json,
    "since": st.sampled_from([0, 1]) | _json,
    "extra": _json,
}
_requests = st.fixed_dictionaries({}, optional=_FIELDS)
_REPLY_TYPES = {"joined", "left", "history", "pong", "sent"}


def _check_one(d: _Dispatch, payload: bytes, binary: bool = False) -> None:
    """The dispatch contract for one frame, whatever it holds."""
    failures: list[dict] = []
    before = d.state()
    with _logged_failures(failures):
        d.send(payload, binary)
    assert not failures, failures
    assert d.session.id in d.hub.sessions, "the connection must live"
    assert len(d.out.replies) <= 1, d.out.replies
    reply = d.out.replies[0] if d.out.replies else None
    if reply is not None and reply["type"] == "error":
        assert isinstance(reply["error"], str) and reply["error"]
        assert set(reply) <= {"type", "error", "request", "ref"}, reply
        assert d.state() == before, "a refused request changed state"
        assert d.out.frames == [] and d.seen.frames == [], "a refused request reached the room"
    elif reply is not None:
        assert reply["type"] in _REPLY_TYPES, reply


class _logged_failures:
    """Collect ``log.failure`` events of ``chatd.websocket`` while the block runs."""

    def __init__(self, into: list[dict]) -> None:
        self._into = into

    def __enter__(self) -> None:
        def observe(event: dict) -> None:
            if event.get("log_namespace", "").startswith("chatd.") and "log_failure" in event:
                self._into.append(event)

        self._observe = observe
        globalLogPublisher.addObserver(observe)

    def __exit__(self, *exc) -> None:
        globalLogPublisher.removeObserver(self._observe)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=_requests, identified=st.booleans())
def test_fuzzed_requests_get_a_reply_or_a_clean_error_and_refusals_change_nothing(
    request, identified
) -> None:
    _check_one(_Dispatch(identified), orjson.dumps(request))


@settings(max_examples=200, deadline=None)
@given(value=_json)
def test_any_json_value_as_a_frame_is_answered_cleanly(value) -> None:
    _check_one(_Dispatch(identified=True), orjson.dumps(value))


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=64), binary=st.booleans())
def test_any_bytes_as_a_frame_are_answered_cleanly(payload, binary) -> None:
    d = _Dispatch(identified=True)
    _check_one(d, payload, binary)
    assert d.out.replies and d.out.replies[0]["type"] in {"error", *_REPLY_TYPES}


@pytest.mark.parametrize(
    "request_, reason",
    [
        ({"type": [1]}, "unknown type"),
        ({"type": {"a": 1}}, "unknown type"),
        ({"type": "message", "room": "r", "user": "bob", "message": "hi"}, "not in room r"),
        ({"type": "message", "room": "r", "user": "bob", "message": ""}, "message must not be empty"),
        ({"type": "ping", "ref": [1]}, "ref must be a string or a number"),
        ({"user": "bob", "message": "hi", "room": "r", "ref": {"a": 1}}, "ref must be a string or a number"),
    ],
)
def test_known_bad_requests_are_refused_without_side_effects(request_, reason) -> None:
    d = _Dispatch(identified=False)
    _check_one(d, orjson.dumps(request_))
    assert reason in d.out.replies[0]["error"]
    assert d.session.user is None


def test_an_unexpected_error_in_a_handler_answers_internal_error_logs_once_and_lives(monkeypatch) -> None:
    d = _Dispatch(identified=True)

    def broken(hub, session, request):
        raise RuntimeError("a bug")

    monkeypatch.setitem(websocket._HANDLERS, "ping", broken)
    failures: list[dict] = []
    with _logged_failures(failures):
        d.send(b'{"type": "ping", "ref": 9}')
    assert d.out.replies == [{"type": "error", "error": "internal error", "request": "ping", "ref": 9}]
    assert len(failures) == 1 and failures[0]["log_failure"].check(RuntimeError)
    assert d.session.id in d.hub.sessions
    d.send(b'{"type": "history", "room": "r"}')
    assert d.out.replies[-1]["type"] == "history"
    m = _scrape_metrics(d.hub)
    assert m[("chatd_errors_total", (("kind", "internal"), ("protocol", "websocket")))] == 1


def _scrape_metrics(hub) -> dict[tuple[str, tuple], float]:
    text = generate_latest(hub.metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest_twisted.ensureDeferred
async def test_malformed_fields_over_a_real_socket_get_errors_and_the_connection_lives(
    chatd, monkeypatch
) -> None:
    def broken(hub, session, request):
        raise RuntimeError("a bug")

    monkeypatch.setitem(websocket._HANDLERS, "history", broken)

    def scenario():
        with Client(chatd.ws_url) as a, Client(chatd.ws_url) as watcher:
            a.join("r", "alice")
            watcher.join("r", "watcher")
            a.recv_type("presence")
            for body in (
                {"type": [1]},
                {"type": {"join": 1}},
                {"type": "join", "room": ["r"], "user": "alice"},
                {"type": "message", "room": "r", "message": {"text": "hi"}},
                {"type": "ping", "ref": [1, 2]},
                {"type": "history", "room": "r", "ref": "h"},
            ):
                a.send(**body)
                error = a.recv()
                assert error["type"] == "error", (body, error)
                assert_silent(a)
            assert error == {"type": "error", "error": "internal error", "request": "history", "ref": "h"}
            assert_silent(watcher)
            a.send(type="message", room="r", message="still here")
            assert watcher.recv_type("message")["message"] == "still here"

    await deferToThread(scenario)


class _LogLines:
    """Formatted log lines of ``chatd.*`` and the access log while the block runs."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def _observe(self, event: dict) -> None:
        self.lines.append(formatEvent(event))

    def __enter__(self) -> _LogLines:
        globalLogPublisher.addObserver(self._observe)
        return self

    def __exit__(self, *exc) -> None:
        globalLogPublisher.removeObserver(self._observe)


def _raw_http(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


@pytest_twisted.ensureDeferred
async def test_client_text_reaches_the_logs_escaped(chatd) -> None:
    port = chatd.ports["ws"]

    def scenario():
        with Client(chatd.ws_url) as a:
            a.join("r", "alice")
            a.ws.close(code=1000, reason="bye\nforged: admin logged in\x1b[2J")
        response = _raw_http(
            port,
            b"GET /health HTTP/1.1\r\nHost: x\r\nUser-Agent: curl\x1b[31m\x7f\x01evil\r\nConnection: close\r\n\r\n",
        )
        assert b" 200 " in response.split(b"\r\n")[0]

    def closed_logged(log: _LogLines) -> bool:
        return any("disconnected" in line and "bye" in line for line in log.lines)

    with _LogLines() as log:
        await deferToThread(scenario)
        while not closed_logged(log):  # the server logs the close when it sees the TCP end
            await deferToThread(lambda: None)
    closed = [line for line in log.lines if "disconnected" in line and "bye" in line]
    assert closed == [closed[0]] and r"bye\nforged: admin logged in\x1b[2J" in closed[0], closed
    access = [line for line in log.lines if "GET /health" in line]
    assert len(access) == 1 and r"curl\x1b[31m\x7f\x01evil" in access[0], access
    for line in closed + access:
        assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in line), repr(line)


def test_a_connection_takes_the_factory_options_without_printing_them(monkeypatch) -> None:
    """Options come from the factory (one set on the protocol wins), and none is pretty-printed per connection."""
    import autobahn.websocket.protocol as autobahn_protocol
    from twisted.internet.error import ConnectionDone
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure

    printed: list = []
    monkeypatch.setattr(autobahn_protocol, "pformat", lambda value: printed.append(value) or "")
    factory = ChatWebSocketFactory(Hub(Clock()), read_limit=1234, handshake_timeout=0)
    proto = factory.buildProtocol(None)
    proto.autoPingInterval = 0  # set on the connection: kept
    proto.makeConnection(StringTransport())
    assert (proto.maxFramePayloadSize, proto.maxMessagePayloadSize) == (1234, 1234)
    assert (proto.openHandshakeTimeout, proto.autoPingTimeout, proto.failByDrop) == (0, 30, False)
    assert proto.autoPingInterval == 0
    assert printed == [[]]
    proto.connectionLost(Failure(ConnectionDone()))


_UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.mark.parametrize("complete", [True, False])
def test_the_handshake_timer_runs_only_while_a_handshake_waits(monkeypatch, complete) -> None:
    """A handshake that ends in the call that began it never starts Autobahn's timer; one that waits does."""
    from twisted.internet.error import ConnectionDone
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure

    hub = Hub(Clock())
    hub.startService()
    factory = ChatWebSocketFactory(hub, handshake_timeout=5)
    timers: list[float] = []
    real = factory._batched_timer.call_later
    monkeypatch.setattr(factory._batched_timer, "call_later", lambda d, f, *a: timers.append(d) or real(d, f, *a))
    proto = factory.buildProtocol(None)
    proto.makeConnection(StringTransport())
    proto.dataReceived(_UPGRADE if complete else _UPGRADE[:40])
    if complete:
        assert proto.state == proto.STATE_OPEN and proto.session is not None
        assert 5 not in timers and proto.openHandshakeTimeoutCall is None
    else:
        assert proto.state == proto.STATE_CONNECTING
        assert timers == [5] and proto.openHandshakeTimeoutCall is not None
    proto.connectionLost(Failure(ConnectionDone()))
    assert proto.openHandshakeTimeoutCall is None


def test_an_open_connection_keeps_only_its_own_state(monkeypatch) -> None:
    """Options live on the class, handshake leftovers are dropped, and no send queue exists until one is needed."""
    from collections import deque

    from twisted.internet.error import ConnectionDone
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure

    hub = Hub(Clock())
    hub.startService()
    factory = ChatWebSocketFactory(hub, read_limit=4321)
    first = factory.buildProtocol(None)
    first.makeConnection(StringTransport())
    first.dataReceived(_UPGRADE)
    assert first.state == first.STATE_OPEN and first.session is not None
    assert isinstance(first, websocket.ChatServerProtocol)
    assert first.maxFramePayloadSize == 4321 and "maxFramePayloadSize" not in first.__dict__
    assert not any(option in first.__dict__ for option in websocket._OPTIONS)
    # a function option stays a plain function (chatd refuses every compression offer)
    assert first.perMessageCompressionAccept([object()]) is None
    assert first.http_request_data is None and first.http_response_data is None and first.http_headers == {}
    assert not isinstance(first.send_queue, deque)
    # options changed on the factory reach the next connection, not the open one
    factory.setProtocolOptions(maxFramePayloadSize=999)
    second = factory.buildProtocol(None)
    second.makeConnection(StringTransport())
    assert (second.maxFramePayloadSize, first.maxFramePayloadSize) == (999, 4321)
    # Autobahn's chopped writes get a queue of the connection's own, and still send everything
    import txaio

    monkeypatch.setattr(txaio.config, "loop", hub.clock)  # Autobahn's queued writes wait on txaio's clock
    sent = first.transport.value()
    first.sendData(b"abcdefgh", chopsize=3)
    assert isinstance(first.send_queue, deque) and not isinstance(second.send_queue, deque)
    assert first.transport.value()[len(sent) :] == b"abc"
    for _ in range(3):
        hub.clock.advance(1)  # Autobahn writes the rest a chunk a turn
    assert first.transport.value()[len(sent) :] == b"abcdefgh"
    for proto in (first, second):
        proto.connectionLost(Failure(ConnectionDone()))


@settings(max_examples=2000, deadline=None)
@given(
    st.one_of(
        st.floats(min_value=0, max_value=4e9, allow_nan=False),
        st.builds(
            lambda whole, frac: whole + frac,
            st.integers(0, 4_000_000_000),
            st.sampled_from([0.0, 5e-7, 0.0005, 0.9995, 0.9999995, 0.9999996, 1 - 5e-7]),
        ),
    )
)
def test_event_timestamps_format_like_datetime_does(seconds) -> None:
    """The per-second cache of ``rfc3339`` gives datetime's text, rounding and carries included."""
    from chatd import events

    assert events.rfc3339(seconds) == events._rfc3339_slow(seconds)
    assert events.rfc3339(seconds + 1.0005) == events._rfc3339_slow(seconds + 1.0005)


class _Closed:
    """What :class:`chatd.websocket.CloseLog` reads of a session."""

    def __init__(self, i: int, opened: float, close_reason: str | None = None) -> None:
        self.peer, self.user, self.opened, self.close_reason = f"tcp4:127.0.0.1:{i}", f"u{i}", opened, close_reason


def test_closes_are_logged_one_by_one_and_past_the_rate_counted_in_one_line_a_second() -> None:
    clock = Clock()
    closes = websocket.CloseLog(clock)
    closes.startService()
    clock.advance(100)
    with _LogLines() as log:
        for i in range(closes.per_second):
            closes.closed(_Closed(i, 90.0), True, 1000, None)
        assert len(log.lines) == closes.per_second
        assert log.lines[0] == "tcp4:127.0.0.1:0 (u0) disconnected after 10.0 s: closed (code 1000)"
        clock.advance(0.5)
        for i in range(3):
            closes.closed(_Closed(100 + i, 90.0), True, 1000, "bye")
        closes.closed(_Closed(200, 90.0), False, 1006, None)
        closes.closed(_Closed(300, 90.0, "too slow"), True, 1008, None)
        assert len(log.lines) == closes.per_second  # counted, not written yet
        clock.advance(0.5)
        assert log.lines[closes.per_second:] == [
            "5 more connections closed in 1.0 s, not logged one by one: "
            "3 with code 1000, 1 with code 1006, 1 with code 1008"
        ]
        clock.advance(5)
        closes.closed(_Closed(400, 104.0, "idle"), True, 4008, None)  # a new second: one by one again
        assert log.lines[-1] == "tcp4:127.0.0.1:400 (u400) disconnected after 2.0 s: idle (code 4008)"
        for i in range(closes.per_second):
            closes.closed(_Closed(500 + i, 104.0), True, 1000, None)
        closes.stopService()  # a summary still due is written at stop, and not again
        assert log.lines[-1] == "1 more connections closed in 0.0 s, not logged one by one: 1 with code 1000"
        lines = len(log.lines)
        clock.advance(2)
        assert len(log.lines) == lines
    assert not clock.getDelayedCalls()


def test_refusals_share_the_line_budget_and_are_counted_by_kind_past_it() -> None:
    clock = Clock()
    closes = websocket.CloseLog(clock)
    closes.startService()
    clock.advance(100)
    with _LogLines() as log:
        closes.refused("server full", "tcp4:10.0.0.1:1", "server full (20000 connections)")
        assert log.lines == ["tcp4:10.0.0.1:1 refused: server full (20000 connections)"]
        for i in range(closes.per_second - 1):
            closes.closed(_Closed(i, 90.0), True, 1000, None)
        for i in range(3):
            closes.refused("server full", f"tcp4:10.0.0.1:{i}", "server full (20000 connections)")
        closes.refused("unauthenticated", "tcp4:10.0.0.2:1", "token expired")
        closes.closed(_Closed(99, 90.0), True, 1001, None)
        assert len(log.lines) == closes.per_second  # the rest counted, not written yet
        clock.advance(1)
        assert log.lines[closes.per_second :] == [
            "4 more connections refused in 1.0 s, not logged one by one: 3 server full, 1 unauthenticated",
            "1 more connections closed in 1.0 s, not logged one by one: 1 with code 1001",
        ]
    closes.stopService()
    assert not clock.getDelayedCalls()


def test_the_close_log_stops_after_the_listeners_and_before_the_hub(tmp_path) -> None:
    """So the drain's closes are in it, and its last summary is written before the process ends."""
    from twisted.internet.testing import MemoryReactorClock

    from chatd import tap

    options = tap.Options(environ={})
    options.parseOptions(["--data-dir", str(tmp_path)])
    names = [s.name for s in tap.makeService(options, reactor=MemoryReactorClock())]
    assert names.index("hub") < names.index("websocket-closes") < names.index("ws")
