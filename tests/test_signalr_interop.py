"""The official SignalR clients against a live chatd.

``@microsoft/signalr`` (and its MessagePack protocol) runs in Node from
``tests/node/client.js``, scripted over stdin/stdout by :class:`NodeClient`;
Python's ``signalrcore`` runs in a worker thread. Plain WebSocket users
(``tests/wsclient.py``) share the rooms, so every test here is also a
cross-protocol test.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import queue
import subprocess
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.conftest import require, require_tool
from tests.wsclient import Client as WsClient

NODE_DIR = Path(__file__).parent / "node"
CLIENT_JS = NODE_DIR / "client.js"
TIMEOUT = 20

#: every transport x hub protocol the spec allows (SSE carries text only)
MATRIX = [
    ("WebSockets", "json"),
    ("WebSockets", "messagepack"),
    ("ServerSentEvents", "json"),
    ("LongPolling", "json"),
    ("LongPolling", "messagepack"),
]
MATRIX_IDS = [f"{t}-{p}" for t, p in MATRIX]

CLIENT_METHODS = ["ReceiveMessage", "UserJoined", "UserLeft"]


def node() -> str:
    path = require_tool("node")
    require(
        (NODE_DIR / "node_modules" / "@microsoft" / "signalr").is_dir(),
        "tests/node/node_modules is missing: run scripts/install-test-deps",
    )
    return path


class NodeClient:
    """One ``@microsoft/signalr`` HubConnection in a Node process (blocking API)."""

    _ids = itertools.count(1)

    def __init__(self, node_path: str) -> None:
        self.proc = subprocess.Popen(
            [node_path, str(CLIENT_JS)],
            cwd=NODE_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.events: queue.Queue[dict] = queue.Queue()
        self.seen: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if line:
                self.events.put(json.loads(line))
        self.events.put({"event": "exited"})

    def command(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def wait(self, pred, timeout: float = TIMEOUT) -> dict:
        """The first event (kept or new) matching ``pred``; it is consumed."""
        for i, event in enumerate(self.seen):
            if pred(event):
                return self.seen.pop(i)
        while True:
            try:
                event = self.events.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no matching event within {timeout}s; saw {self.seen}") from None
            if pred(event):
                return event
            if event["event"] == "exited":
                raise AssertionError(f"node exited: {self.stderr()}")
            self.seen.append(event)

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return ""
        return self.proc.stderr.read() if self.proc.stderr else ""

    def start(self, url: str, transport: str = "WebSockets", protocol: str = "json", **options: Any) -> dict:
        self.command(op="start", url=url, transport=transport, protocol=protocol, methods=CLIENT_METHODS, **options)
        event = self.wait(lambda e: e["event"] in ("started", "startFailed"))
        return event

    def connect(self, url: str, transport: str = "WebSockets", protocol: str = "json", **options: Any) -> None:
        event = self.start(url, transport, protocol, **options)
        assert event["event"] == "started", event

    def invoke(self, method: str, *args: Any) -> dict:
        """``{"result": ...}`` or ``{"error": ...}``."""
        n = next(self._ids)
        self.command(op="invoke", id=n, method=method, args=list(args))
        return self.wait(lambda e: e["event"] == "result" and e["id"] == n)

    def call(self, method: str, *args: Any) -> Any:
        reply = self.invoke(method, *args)
        assert "error" not in reply, reply
        return reply["result"]

    def send(self, method: str, *args: Any) -> None:
        n = next(self._ids)
        self.command(op="send", id=n, method=method, args=list(args))
        event = self.wait(lambda e: e.get("id") == n and e["event"] in ("sent", "result"))
        assert event["event"] == "sent", event

    def stream(self, method: str, *args: Any) -> int:
        n = next(self._ids)
        self.command(op="stream", id=n, method=method, args=list(args))
        self.wait(lambda e: e["event"] == "subscribed" and e["id"] == n)
        return n

    def received(self, pred=lambda args: True, target: str = "ReceiveMessage") -> list:
        event = self.wait(lambda e: e["event"] == "call" and e["target"] == target and pred(e["args"]))
        return event["args"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.command(op="stop")
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> NodeClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def hub_url(chatd, query: str = "") -> str:
    return chatd.url("signalr", path="/signalr") + query


def in_thread(fn):
    """Run a blocking scenario off the reactor thread, so the server keeps serving."""
    return deferToThread(fn)


# -- the official JS client, every transport x protocol ---------------------------


@pytest.mark.parametrize(("transport", "protocol"), MATRIX, ids=MATRIX_IDS)
@pytest_twisted.ensureDeferred
async def test_js_client_chats_with_websocket_users(chatd, transport, protocol):
    node_path = node()

    def scenario():
        with NodeClient(node_path) as js, WsClient(chatd.ws_url) as ws:
            js.connect(hub_url(chatd, "?user=ada"), transport, protocol)
            ws.join("general", "bob")
            # SignalR -> WebSocket: the tutorial's call lands in "general".
            js.call("SendMessage", "ada", f"hello over {transport}")
            frame = ws.recv_until(lambda f: f.get("type") == "message")
            assert (frame["user"], frame["message"], frame["room"], frame["protocol"]) == (
                "ada",
                f"hello over {transport}",
                "general",
                "signalr",
            )
            # WebSocket -> SignalR: ReceiveMessage(user, message, room).
            ws.send(type="message", room="general", message="hi ada")
            assert js.received(lambda a: a[0] == "bob") == ["bob", "hi ada", "general"]
            # The sender hears its own message too, like every member.
            assert js.received(lambda a: a[0] == "ada")[1] == f"hello over {transport}"

    await in_thread(scenario)


@pytest.mark.parametrize(("transport", "protocol"), MATRIX, ids=MATRIX_IDS)
@pytest_twisted.ensureDeferred
async def test_js_client_hub_methods(chatd, transport, protocol):
    node_path = node()

    def scenario():
        with NodeClient(node_path) as a, NodeClient(node_path) as b:
            a.connect(hub_url(chatd), transport, protocol)
            b.connect(hub_url(chatd), transport, protocol)
            assert a.call("JoinRoom", "blue", "amy") == ["amy"]
            assert b.call("JoinRoom", "red", "ben") == ["ben"]
            # Room isolation: a message to "red" reaches ben, not amy.
            a.call("SendToRoom", "red", "amy", "into red")
            assert b.received(lambda args: args[2] == "red") == ["amy", "into red", "red"]
            a.call("SendToRoom", "blue", "amy", "into blue")
            assert a.received(lambda args: args[2] == "blue") == ["amy", "into blue", "blue"]
            b.call("GetUsers", "red")  # anything sent to b before this reply has arrived by now
            assert not any(
                e["event"] == "call" and e["target"] == "ReceiveMessage" and e["args"][2] == "blue"
                for e in b.seen
            )
            # History, users.
            history = a.call("GetHistory", "red", 10)
            assert [(m["user"], m["message"], m["room"]) for m in history] == [("amy", "into red", "red")]
            assert set(history[0]) >= {"id", "seq", "timestamp", "protocol"}
            assert sorted(a.call("GetUsers", "red")) == ["amy", "ben"]
            # Unknown method and bad input: an error, and the connection lives on.
            reply = a.invoke("NoSuchMethod", 1)
            assert "Unknown hub method 'NoSuchMethod'" in reply["error"]
            reply = a.invoke("SendToRoom", "bad room!", "amy", "x")
            assert "invalid room name" in reply["error"]
            reply = a.invoke("SendMessage", "amy")
            assert "expects 2" in reply["error"]
            assert a.call("GetUsers", "blue") == ["amy"]
            # LeaveRoom: presence reaches the others.
            b.call("JoinRoom", "blue")
            assert a.received(lambda args: args == ["ben", "blue"], target="UserJoined")
            b.call("LeaveRoom", "blue")
            assert a.received(lambda args: args == ["ben", "blue"], target="UserLeft")

    await in_thread(scenario)


@pytest.mark.parametrize(("transport", "protocol"), MATRIX, ids=MATRIX_IDS)
@pytest_twisted.ensureDeferred
async def test_js_client_streams(chatd, transport, protocol):
    node_path = node()

    def scenario():
        with NodeClient(node_path) as js, WsClient(chatd.ws_url) as ws:
            js.connect(hub_url(chatd, "?user=sam"), transport, protocol)
            n = js.stream("StreamRoom", "news")
            # The stream has started on the server once its room shows the join.
            js.received(lambda a: a == ["sam", "news"], target="UserJoined")
            ws.join("news", "wes")
            ws.send(type="message", room="news", message="first")
            ws.send(type="message", room="news", message="second")
            items = [js.wait(lambda e: e["event"] == "item" and e["id"] == n)["item"] for _ in range(2)]
            assert [(i["user"], i["message"], i["room"]) for i in items] == [
                ("wes", "first", "news"),
                ("wes", "second", "news"),
            ]
            # Client-to-server stream: each item becomes a message.
            k = next(NodeClient._ids)
            js.command(op="upload", id=k, method="UploadMessages", args=["news", "sam"], items=["u1", "u2"])
            assert js.wait(lambda e: e["event"] == "result" and e["id"] == k) == {
                "event": "result",
                "id": k,
                "result": 2,
            }
            got = [
                ws.recv_until(lambda f: f.get("type") == "message" and f["user"] == "sam")["message"]
                for _ in range(2)
            ]
            assert got == ["u1", "u2"]

    await in_thread(scenario)


@pytest_twisted.ensureDeferred
async def test_js_client_skip_negotiation(chatd):
    node_path = node()

    def scenario():
        with NodeClient(node_path) as js, WsClient(chatd.ws_url) as ws:
            js.connect(hub_url(chatd), "WebSockets", "json", skipNegotiation=True)
            ws.join("general", "wes")
            js.call("SendMessage", "kim", "no negotiate")
            frame = ws.recv_until(lambda f: f.get("type") == "message")
            assert (frame["user"], frame["message"]) == ("kim", "no negotiate")

    await in_thread(scenario)


@pytest.mark.parametrize("transport", ["WebSockets", "LongPolling"])
@pytest_twisted.ensureDeferred
async def test_server_close_reaches_js_client(chatd, transport):
    """A kick closes the client for good; a shutdown's Close allows an automatic reconnect."""
    node_path = node()
    hub = chatd.hub

    def sessions_of(user):
        return [s for s in hub.sessions.values() if s.user == user]

    kicked, returning = NodeClient(node_path), NodeClient(node_path)
    try:
        await in_thread(lambda: kicked.connect(hub_url(chatd, "?user=zed"), transport, "json"))
        await in_thread(
            lambda: returning.connect(hub_url(chatd, "?user=yan"), transport, "json", automaticReconnect=True)
        )
        (zed,) = sessions_of("zed")
        zed.close("closed by an operator")
        event = await in_thread(lambda: kicked.wait(lambda e: e["event"] == "closed"))
        assert "closed by an operator" in event["error"]
        assert not sessions_of("zed")

        (yan,) = sessions_of("yan")
        yan.going_away("server shutting down")
        await in_thread(lambda: returning.wait(lambda e: e["event"] == "reconnecting"))
        await in_thread(lambda: returning.wait(lambda e: e["event"] == "reconnected"))
        (again,) = sessions_of("yan")
        assert again is not yan and "general" in again.rooms
        assert not any(e["event"] == "closed" for e in returning.seen)
    finally:
        await in_thread(kicked.stop)
        await in_thread(returning.stop)


@pytest.mark.parametrize("protocol", ["json", "messagepack"])
@pytest_twisted.ensureDeferred
async def test_stateful_reconnect_loses_nothing(chatd, protocol):
    """The server drops the client's socket and keeps talking; the client reconnects and has it all."""
    node_path = node()
    hub = chatd.hub

    ws = await in_thread(lambda: WsClient(chatd.ws_url))
    js = NodeClient(node_path)
    try:
        await in_thread(
            lambda: js.connect(hub_url(chatd, "?user=rio"), "WebSockets", protocol, statefulReconnect=True)
        )
        await in_thread(lambda: ws.join("general", "wes"))
        (session,) = [s for s in hub.sessions.values() if s.user == "rio"]
        connection = session.connection
        assert connection.stateful
        # Cut the socket, then publish in the same reactor turn: these
        # messages are written to a dead socket and must be sent again.
        connection.transport.transport.abortConnection()
        for i in range(5):
            hub.publish("general", "wes", f"during the gap {i}", "websocket")

        def after():
            got = [js.received(lambda a: a[0] == "wes")[1] for _ in range(5)]
            assert got == [f"during the gap {i}" for i in range(5)]
            # Same connection, still working both ways.
            js.call("SendMessage", "rio", "back again")
            frame = ws.recv_until(lambda f: f.get("type") == "message" and f["user"] == "rio")
            assert frame["message"] == "back again"
            assert not any(e["event"] == "closed" for e in js.seen)

        await in_thread(after)
        assert session.connection is connection and session.id in hub.sessions
    finally:
        # Blocking closes run off the reactor, which must answer them.
        await in_thread(ws.close)
        await in_thread(js.stop)


# -- plain HTTP: negotiate, errors, CORS, health ----------------------------------


def http(method: str, url: str, headers: dict | None = None, data: bytes | None = None):
    request = urllib.request.Request(url, method=method, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest_twisted.ensureDeferred
async def test_negotiate_versions_and_errors(chatd):
    base = hub_url(chatd)

    def scenario():
        status, headers, body = http("POST", base + "/negotiate?negotiateVersion=1")
        v1 = json.loads(body)
        assert status == 200 and headers["Content-Type"] == "application/json"
        assert v1["negotiateVersion"] == 1
        assert v1["connectionToken"] != v1["connectionId"] and len(v1["connectionToken"]) >= 22
        assert [t["transport"] for t in v1["availableTransports"]] == [
            "WebSockets",
            "ServerSentEvents",
            "LongPolling",
        ]
        assert "useStatefulReconnect" not in v1
        v0 = json.loads(http("POST", base + "/negotiate")[2])
        assert v0["negotiateVersion"] == 0 and "connectionToken" not in v0
        assert json.loads(http("POST", base + "/negotiate?NegotiateVersion=7")[2])["negotiateVersion"] == 1
        stateful = json.loads(http("POST", base + "/negotiate?negotiateVersion=1&useStatefulReconnect=true")[2])
        assert stateful["useStatefulReconnect"] is True
        assert json.loads(http("POST", base + "/negotiate?negotiateVersion=1&user=%20")[2])["error"]
        assert http("GET", base + "/negotiate")[0] == 405
        # The connection endpoint's errors.
        assert http("GET", base)[0] == 400  # no id
        assert http("GET", base + "?id=nope")[0] == 404
        assert http("POST", base + "?id=nope", data=b"x")[0] == 404
        assert http("PUT", base + "?id=" + v1["connectionToken"], data=b"")[0] == 405
        # v1 connections are reached by token, not by id.
        assert http("GET", base + "?id=" + v1["connectionId"])[0] == 404
        token = v1["connectionToken"]
        assert http("GET", base + "?id=" + token)[0] == 200  # the first poll returns at once
        sse = {"Accept": "text/event-stream"}
        assert http("GET", base + "?id=" + token, headers=sse)[0] == 400  # another transport
        assert http("DELETE", base + "?id=" + token)[0] == 202
        assert http("GET", base + "?id=" + token)[0] == 404
        # A v0 connection is reached by its connection id.
        assert http("GET", base + "?id=" + v0["connectionId"])[0] == 200
        # A second WebSocket on one connection is a conflict.
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect

        token = json.loads(http("POST", base + "/negotiate?negotiateVersion=1")[2])["connectionToken"]
        ws_url = chatd.url("signalr", "ws", "/signalr?id=" + token)
        with connect(ws_url, open_timeout=10) as first:
            first.send('{"protocol":"json","version":1}\x1e')
            assert first.recv(timeout=10) == "{}\x1e"
            with pytest.raises(InvalidStatus) as e:
                connect(ws_url, open_timeout=10)
            assert e.value.response.status_code == 409
            assert http("POST", base + "?id=" + token, data=b'{"type":6}\x1e')[0] == 405
        status, _, body = http("GET", chatd.url("signalr", path="/signalr/health"))
        assert status == 200 and json.loads(body)["service"] == "signalr"
        assert json.loads(body)["status"] == "healthy"

    await in_thread(scenario)


@pytest_twisted.ensureDeferred
async def test_cors_echoes_allowed_origins_only(start):
    running = await start("--allowed-origins", "https://chat.example.com")
    base = hub_url(running)

    def scenario():
        good = {"Origin": "https://chat.example.com"}
        status, headers, _ = http(
            "OPTIONS",
            base + "/negotiate?negotiateVersion=1",
            headers={**good, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "x-requested-with,x-signalr-user-agent"},
        )
        assert status == 204
        assert headers["Access-Control-Allow-Origin"] == "https://chat.example.com"
        assert headers["Access-Control-Allow-Credentials"] == "true"
        assert "POST" in headers["Access-Control-Allow-Methods"]
        assert "x-signalr-user-agent" in headers["Access-Control-Allow-Headers"].lower()
        status, headers, body = http("POST", base + "/negotiate?negotiateVersion=1", headers=good)
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "https://chat.example.com"
        token = json.loads(body)["connectionToken"]
        status, headers, _ = http("GET", base + "?id=" + token, headers=good)
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "https://chat.example.com"
        evil = {"Origin": "https://evil.example.net"}
        status, headers, _ = http("POST", base + "/negotiate?negotiateVersion=1", headers=evil)
        assert status == 403 and "Access-Control-Allow-Origin" not in headers
        assert http("OPTIONS", base + "/negotiate", headers=evil)[0] == 403
        # The WebSocket upgrade checks the same policy.
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect

        with pytest.raises(InvalidStatus) as e:
            connect(running.url("signalr", "ws", "/signalr"), origin="https://evil.example.net", open_timeout=10)
        assert e.value.response.status_code == 403
        with connect(running.url("signalr", "ws", "/signalr"), origin="https://chat.example.com") as ws:
            ws.send('{"protocol":"json","version":1}\x1e')
            assert ws.recv(timeout=10) == "{}\x1e"

    await in_thread(scenario)


# -- signalrcore (Python) ---------------------------------------------------------


SIGNALRCORE_MATRIX = [
    ("web_sockets", "json"),
    ("skip_negotiation", "json"),
    ("web_sockets", "messagepack"),
    ("server_sent_events", "json"),
    ("long_polling", "json"),
]


@pytest.mark.parametrize(("transport", "protocol"), SIGNALRCORE_MATRIX, ids=[f"{t}-{p}" for t, p in SIGNALRCORE_MATRIX])
@pytest_twisted.ensureDeferred
async def test_signalrcore_client(chatd, transport, protocol):
    require(importlib.util.find_spec("signalrcore") is not None, "signalrcore is not installed (test extra)")
    from signalrcore.hub_connection_builder import HubConnectionBuilder
    from signalrcore.protocol.messagepack_protocol import MessagePackHubProtocol
    from signalrcore.types import HttpTransportType

    url = hub_url(chatd)

    def scenario():
        received: queue.Queue = queue.Queue()
        opened = threading.Event()
        if transport == "skip_negotiation":
            options = {"skip_negotiation": True, "transport": HttpTransportType.web_sockets}
        else:
            options = {"transport": HttpTransportType[transport]}
        builder = HubConnectionBuilder().with_url(url, options=options)
        if protocol == "messagepack":
            builder = builder.with_hub_protocol(MessagePackHubProtocol())
        conn = builder.build()
        conn.on_open(opened.set)
        conn.on("ReceiveMessage", received.put)
        conn.start()
        try:
            assert opened.wait(TIMEOUT)
            with WsClient(chatd.ws_url) as ws:
                ws.join("general", "wes")
                conn.send("SendMessage", ["pyuser", "from signalrcore"])
                frame = ws.recv_until(lambda f: f.get("type") == "message")
                assert (frame["user"], frame["message"]) == ("pyuser", "from signalrcore")
                ws.send(type="message", room="general", message="to signalrcore")
                while True:
                    args = received.get(timeout=TIMEOUT)
                    if args[0] == "wes":
                        break
                assert args == ["wes", "to signalrcore", "general"]
        finally:
            # signalrcore's stop() joins a reader blocked in recv() until the
            # server sends something (its next ping, 15 s on); don't wait for it.
            threading.Thread(target=conn.stop, daemon=True).start()

    await in_thread(scenario)


# -- gRPC in the same rooms ---------------------------------------------------------


@pytest.mark.parametrize(("transport", "protocol"), MATRIX, ids=MATRIX_IDS)
@pytest_twisted.ensureDeferred
async def test_js_client_chats_with_grpc_users(chatd, transport, protocol):
    node_path = node()
    require(importlib.util.find_spec("grpc") is not None, "grpcio is not installed")
    import grpc

    from chatd.grpc.generated import chat_pb2 as pb
    from chatd.grpc.generated.chat_pb2_grpc import ChatServiceStub

    def scenario():
        with NodeClient(node_path) as js, grpc.insecure_channel(chatd.grpc_target) as channel:
            js.connect(hub_url(chatd, "?user=ada"), transport, protocol)
            stub = ChatServiceStub(channel)
            stream = stub.StreamMessages(pb.StreamRequest(room="general", user="gus"), timeout=TIMEOUT * 2)
            js.received(lambda a: a == ["gus", "general"], target="UserJoined")  # the gRPC stream is live
            js.call("SendMessage", "ada", "to grpc")
            got = next(stream)
            stream.cancel()
            assert (got.user, got.message, got.room, got.protocol) == ("ada", "to grpc", "general", "signalr")
            stub.SendMessage(pb.MessageRequest(user="gina", message="from grpc", room="general"), timeout=TIMEOUT)
            assert js.received(lambda a: a[0] == "gina") == ["gina", "from grpc", "general"]

    await in_thread(scenario)


# -- disconnect detection ---------------------------------------------------------------


def _when_closed(chatd, user: str):
    """A Deferred firing when the SignalR session of ``user`` leaves the hub."""
    from twisted.internet import defer

    hub = chatd.hub
    (session,) = [s for s in hub.sessions.values() if s.user == user]
    done: defer.Deferred = defer.Deferred()
    original = session.connection._on_closed

    def closed(connection):
        if original is not None:
            original(connection)
        done.callback(connection)

    session.connection._on_closed = closed
    return session, done


@pytest.mark.parametrize("transport", ["WebSockets", "ServerSentEvents"])
@pytest_twisted.ensureDeferred
async def test_a_vanished_client_frees_its_session(chatd, transport):
    """Kill the Node process: the server notices the dead socket or stream and cleans up."""
    node_path = node()
    js = NodeClient(node_path)
    try:
        await in_thread(lambda: js.connect(hub_url(chatd, "?user=gone"), transport, "json"))
        await in_thread(lambda: js.call("JoinRoom", "elsewhere"))
        session, closed = _when_closed(chatd, "gone")
        js.proc.kill()
        await closed
        assert session.id not in chatd.hub.sessions
        assert "gone" not in chatd.hub.members("general") + chatd.hub.members("elsewhere")
        manager = chatd.service.getServiceNamed("signalr").factory.manager
        assert session.connection.token not in manager.connections
    finally:
        js.proc.kill()
        js.proc.wait()


@pytest_twisted.ensureDeferred
async def test_client_stop_over_long_polling_frees_its_session(chatd):
    node_path = node()
    js = NodeClient(node_path)
    try:
        await in_thread(lambda: js.connect(hub_url(chatd, "?user=lp"), "LongPolling", "json"))
        session, closed = _when_closed(chatd, "lp")
        js.command(op="stop")
        await closed
        assert session.id not in chatd.hub.sessions
        await in_thread(lambda: js.wait(lambda e: e["event"] == "stopped"))  # after its DELETE
        manager = chatd.service.getServiceNamed("signalr").factory.manager
        assert session.connection.token not in manager.connections
    finally:
        await in_thread(js.stop)


@pytest_twisted.ensureDeferred
async def test_keep_alive_options_reach_the_wire(start):
    """--signalr-keep-alive and --signalr-client-timeout: pings while idle, then a silent client is closed."""
    running = await start("--signalr-keep-alive", "1", "--signalr-client-timeout", "3")

    def scenario():
        from websockets.sync.client import connect

        with connect(running.url("signalr", "ws", "/signalr?user=quiet"), open_timeout=10) as ws:
            ws.send('{"protocol":"json","version":1}\x1e')
            assert ws.recv(timeout=10) == "{}\x1e"
            records = []
            while not records or records[-1]["type"] != 7:
                records += [json.loads(r) for r in ws.recv(timeout=10).split("\x1e") if r]
            kinds = [r["type"] for r in records if r["type"] != 1]  # presence invocations aside
            assert kinds[0] == 6 and kinds[-1] == 7
            assert "Client timeout" in records[-1]["error"]

    await in_thread(scenario)
    assert not running.hub.sessions
