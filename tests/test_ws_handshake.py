"""The WebSocket opening handshake's short way (chatd.wshandshake): real clients' plain
requests are read without Autobahn's ``processHandshake``, every other request still
by it, and either way the client gets the same bytes and the server the same state."""

from __future__ import annotations

import base64
import hashlib
import re
import socket
import threading
from unittest.mock import Mock

import jwt
import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.protocol import WebSocketServerProtocol
from prometheus_client import generate_latest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from websockets.sync.client import connect

from chatd.websocket import ChatServerProtocol
from chatd.wshandshake import FastHandshake
from tests.test_browser import chromium, in_browser  # noqa: F401 (chromium: a fixture)
from tests.test_ws_upgrade import KEY, Server, client_frame, upgrade
from tests.wsclient import Client

SECRET = "s" * 32


@pytest.fixture
def autobahn_reads(monkeypatch) -> list[bytes]:
    """The request heads Autobahn's own ``processHandshake`` was given."""
    seen: list[bytes] = []
    original = WebSocketServerProtocol.processHandshake

    def spy(self):
        seen.append(self.data)
        return original(self)

    monkeypatch.setattr(WebSocketServerProtocol, "processHandshake", spy)
    return seen


def head(*lines: bytes) -> bytes:
    return b"\r\n".join(lines) + b"\r\n\r\n"


def accept(key: bytes = KEY) -> bytes:
    return base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())


#: request heads as real clients write them
CHROME = head(
    b"GET /ws HTTP/1.1",
    b"Host: 127.0.0.1:8080",
    b"Connection: Upgrade",
    b"Pragma: no-cache",
    b"Cache-Control: no-cache",
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
    b"Upgrade: websocket",
    b"Origin: http://127.0.0.1:8080",
    b"Sec-WebSocket-Version: 13",
    b"Accept-Encoding: gzip, deflate, br",
    b"Accept-Language: en-US,en;q=0.9",
    b"Sec-WebSocket-Key: " + KEY,
    b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
)
FIREFOX = head(
    b"GET /ws?token=abc HTTP/1.1",
    b"Host: localhost:8080",
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
    b"Accept: */*",
    b"Accept-Language: en-US,en;q=0.5",
    b"Accept-Encoding: gzip, deflate, br",
    b"Sec-WebSocket-Version: 13",
    b"Origin: http://localhost:8080",
    b"Sec-WebSocket-Extensions: permessage-deflate",
    b"Sec-WebSocket-Key: " + KEY,
    b"Connection: keep-alive, Upgrade",
    b"Sec-Fetch-Dest: empty",
    b"Sec-Fetch-Mode: websocket",
    b"Sec-Fetch-Site: same-origin",
    b"Pragma: no-cache",
    b"Cache-Control: no-cache",
    b"Upgrade: websocket",
)
GORILLA = head(
    b"GET /ws HTTP/1.1",
    b"Host: 127.0.0.1:9450",
    b"User-Agent: Go-http-client/1.1",
    b"Connection: Upgrade",
    b"Sec-WebSocket-Key: " + KEY,
    b"Sec-WebSocket-Version: 13",
    b"Upgrade: websocket",
)


def written_by_websockets() -> bytes:
    """The request head the ``websockets`` library writes (read off a socket that never answers)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]

        def dial() -> None:
            try:
                with connect(f"ws://127.0.0.1:{port}/ws?token=t", open_timeout=2):
                    pass
            except Exception:
                pass  # no answer comes: only the request matters

        threading.Thread(target=dial, daemon=True).start()
        conn, _ = listener.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(4096)
    return data


def written_by_autobahn() -> bytes:
    """The request head Autobahn's own Twisted client writes."""
    factory = WebSocketClientFactory("ws://127.0.0.1:8080/ws")
    factory.protocol = WebSocketClientProtocol
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return transport.value()


def opened(server: Server, data: bytes) -> tuple[ChatServerProtocol, StringTransport]:
    transport = server.send(data)
    return transport.protocol, transport


def state(proto: object, transport: StringTransport) -> dict:
    """What a client sees and what Autobahn's handshake leaves on the protocol."""
    names = (
        "state",
        "websocket_version",
        "websocket_protocols",
        "websocket_origin",
        "websocket_extensions",
        "websocket_protocol_in_use",
        "websocket_extensions_in_use",
        "http_request_data",
        "http_response_data",
        "http_headers",
        "http_request_uri",
        "http_request_path",
        "http_request_params",
        "http_request_host",
        "http_status_line",
        "_wskey",
        "wasNotCleanReason",
        "data",
        "peer",
    )
    seen = {name: getattr(proto, name, "<unset>") for name in names}
    seen["open handshake timer"] = getattr(proto, "openHandshakeTimeoutCall", None) is not None
    seen["auto ping"] = getattr(proto, "autoPingPendingCall", None) is not None
    seen["session"] = getattr(proto, "session", None) is not None
    # twisted.web's Date header says when: the two servers compared may answer in different seconds.
    seen["sent"] = re.sub(rb"\r\nDate: [^\r]*", b"\r\nDate: -", transport.value())
    seen["disconnecting"] = transport.disconnecting
    return seen


def direct(server: Server, data: bytes) -> tuple[ChatServerProtocol, StringTransport]:
    """``data`` given to a ``/ws`` protocol itself, whatever the request's target (no HTTP routing before it)."""
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    proto = server.site.resource.children[b"ws"]._factory.buildProtocol(transport.getPeer())
    transport.protocol = proto
    transport.registerProducer(Mock(), True)  # the HTTP channel's place, as behind twisted.web
    proto.makeConnection(transport)
    proto.dataReceived(data)
    return proto, transport


def both_ways(head: bytes, *args: str, monkeypatch, how=opened) -> tuple[dict, dict]:
    """``head`` answered with the short way and with Autobahn's alone, each by a fresh server."""
    fast = state(*how(Server(*args), head))
    with monkeypatch.context() as patch:
        patch.setattr(FastHandshake, "_plain_handshake", lambda self: False)
        slow = state(*how(Server(*args), head))
    return fast, slow


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(upgrade(), id="tests' own"),
        pytest.param(CHROME, id="chrome"),
        pytest.param(FIREFOX, id="firefox"),
        pytest.param(GORILLA, id="gorilla"),
        pytest.param(written_by_websockets(), id="websockets"),
        pytest.param(written_by_autobahn(), id="autobahn"),
        pytest.param(
            head(
                b"GET /ws HTTP/1.1",
                b"host: 127.0.0.1:8080",
                b"UPGRADE: WebSocket",
                b"connection: upgrade",
                b"sec-websocket-key: " + KEY,
                b"sec-websocket-version: 13",
            ),
            id="names and tokens in any case",
        ),
        pytest.param(upgrade(b"Sec-WebSocket-Protocol: chat, superchat"), id="subprotocols offered"),
        pytest.param(upgrade(b"X-Forwarded-For: 10.0.0.1"), id="untrusted x-forwarded-for"),
        pytest.param(upgrade(b"Cookie: a=1", b"Cookie: b=2"), id="a repeated header Autobahn joins"),
        pytest.param(upgrade(path=b"/ws?token=a&token=b&x=%20y"), id="query"),
        pytest.param(upgrade().replace(b"127.0.0.1:8080", b"[::1]:8080"), id="ipv6 host"),
    ],
)
def test_real_clients_requests_are_read_the_short_way_and_open_as_before(
    data, autobahn_reads, monkeypatch
) -> None:
    fast, slow = both_ways(data, monkeypatch=monkeypatch)
    assert fast["sent"].startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert fast == slow
    assert fast["session"] and fast["auto ping"] and not fast["open handshake timer"]
    assert autobahn_reads == [data]  # only the second server's, with the short way switched off


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(upgrade(b"Origin: http://evil.example"), id="origin chatd refuses"),
        pytest.param(upgrade(b"Origin: null"), id="origin null"),
        pytest.param(upgrade(b"Origin: http://["), id="origin unparsable"),
        pytest.param(upgrade(b"Origin:"), id="origin empty"),
        pytest.param(
            upgrade(b"Origin: http://127.0.0.1:8080", b"Origin: http://127.0.0.1:8080"), id="origin twice"
        ),
        pytest.param(upgrade(version=b"8"), id="version 8"),
        pytest.param(upgrade(version=b"9"), id="version 9"),
        pytest.param(upgrade(version=b"x"), id="version unparsable"),
        pytest.param(upgrade(b"Sec-WebSocket-Version: 13"), id="version twice"),
        pytest.param(upgrade().replace(b"Sec-WebSocket-Version: 13\r\n", b""), id="no version"),
        pytest.param(upgrade(key=b"short"), id="key short"),
        pytest.param(upgrade(key=b"0123456789abcdef012345=="), id="key not base64 of 16"),
        pytest.param(upgrade(key=b"!" * 22 + b"=="), id="key bad characters"),
        pytest.param(upgrade(b"Sec-WebSocket-Key: " + KEY), id="key twice"),
        pytest.param(upgrade().replace(b"Sec-WebSocket-Key: " + KEY + b"\r\n", b""), id="no key"),
        pytest.param(upgrade().replace(b"Upgrade: websocket\r\n", b""), id="no upgrade: status page"),
        pytest.param(upgrade().replace(b"Upgrade: websocket", b"Upgrade: h2c"), id="upgrade h2c"),
        pytest.param(
            upgrade().replace(b"Connection: Upgrade", b"Connection: keep-alive"), id="connection keep-alive"
        ),
        pytest.param(upgrade().replace(b"Connection: Upgrade\r\n", b""), id="no connection"),
        pytest.param(upgrade().replace(b"Host: 127.0.0.1:8080\r\n", b""), id="no host"),
        pytest.param(upgrade(b"Host: other"), id="host twice"),
        pytest.param(upgrade().replace(b"127.0.0.1:8080", b"127.0.0.1:x"), id="host port unparsable"),
        pytest.param(upgrade(b"Sec-WebSocket-Protocol: a, a"), id="subprotocol twice"),
        pytest.param(
            upgrade(b"Sec-WebSocket-Extensions: permessage-deflate; nonsense=1"), id="bad deflate offer"
        ),
        pytest.param(upgrade(b"Sec-WebSocket-Extensions: x-webkit-deflate-frame"), id="unknown extension"),
        pytest.param(
            upgrade(b"Sec-WebSocket-Extensions: a", b"Sec-WebSocket-Extensions: b"), id="extensions twice"
        ),
        pytest.param(upgrade(b"X-Tab:\tvalue"), id="tab"),
        pytest.param(upgrade(b"X-Ctl: a\x01b"), id="control byte"),
        pytest.param(upgrade(b"X-Utf8: caf\xc3\xa9"), id="non-ascii value"),
        pytest.param(upgrade(b" folded"), id="obs-fold"),
        pytest.param(upgrade(b"No colon"), id="no colon"),
        pytest.param(upgrade(b"Bad Name: x"), id="bad name"),
        pytest.param(upgrade(b"X-Bare: a\nb"), id="bare lf"),
        pytest.param(upgrade(path=b"/ws#frag"), id="fragment"),
        pytest.param(upgrade().replace(b"HTTP/1.1", b"HTTP/1.0", 1), id="http/1.0"),
        pytest.param(upgrade().replace(b"GET", b"POST", 1), id="post"),
        pytest.param(upgrade().replace(b"GET ", b"GET  ", 1), id="two spaces"),
        pytest.param(upgrade() + client_frame(1, b'{"type":"ping"}'), id="a frame with the request"),
        pytest.param(
            upgrade() + client_frame(1, b'{"type":"ping"}')[:5], id="part of a frame with the request"
        ),
        pytest.param(upgrade() + client_frame(9, b"hi"), id="a ping with the request"),
    ],
)
def test_every_other_request_gets_autobahns_answer(data, monkeypatch) -> None:
    fast, slow = both_ways(data, monkeypatch=monkeypatch)
    assert fast == slow


def refusals(server: Server) -> list[bytes]:
    """The server's counts of refused requests and limits said no."""
    return [
        line
        for line in generate_latest(server.hub.metrics.registry).splitlines()
        if line.startswith((b"chatd_errors_total", b"chatd_limit_refusals_total"))
    ]


@pytest.mark.parametrize(
    "target",
    [b"/ws;p=1", b"/ws;p=1?token=x", b"//host/ws", b"/ws?a#b", b"/other?x=1", b"/ws?", b"/ws/?token=a%20b&c"],
)
def test_any_target_is_read_as_autobahn_reads_it(target: bytes, monkeypatch) -> None:
    """Behind twisted.web's resource any path may come: parameters (``;``) and a network-path are Autobahn's."""
    fast, slow = both_ways(upgrade(path=target), monkeypatch=monkeypatch, how=direct)
    assert fast == slow


@pytest.mark.parametrize(
    ("args", "data"),
    [
        pytest.param((), upgrade(b"Origin: http://evil.example"), id="foreign origin"),
        pytest.param(("--auth-secret", SECRET), upgrade(), id="no token"),
        pytest.param(("--auth-secret", SECRET), upgrade(path=b"/ws?token=nonsense"), id="bad token"),
        pytest.param(("--auth-secret", SECRET), upgrade(b"Authorization: Bearer nonsense"), id="bad bearer"),
        pytest.param(("--max-connections", "1"), upgrade(), id="server full"),
    ],
)
def test_chatds_refusals_answer_as_before_and_are_counted_once(args, data, monkeypatch) -> None:
    servers = []
    for short in (True, False):
        with monkeypatch.context() as patch:
            if not short:
                patch.setattr(FastHandshake, "_plain_handshake", lambda self: False)
            server = Server(*args)
            if "--max-connections" in args:
                server.send(upgrade())  # the one the server has room for
            servers.append((server, state(*opened(server, data))))
    (fast_server, fast), (slow_server, slow) = servers
    assert fast == slow
    assert not fast["session"]
    assert refusals(fast_server) == refusals(slow_server)
    assert fast_server.site.resource.children[b"ws"]._factory.closes._lines == 1  # one log line, as before
    assert slow_server.site.resource.children[b"ws"]._factory.closes._lines == 1


@pytest.mark.parametrize("where", ["query", "header"])
def test_a_good_token_opens_the_short_way(where, autobahn_reads) -> None:
    server = Server("--auth-secret", SECRET)
    token = jwt.encode(
        {"sub": "alice", "exp": server.clock.seconds() + 60}, SECRET, algorithm="HS256"
    ).encode()
    data = (
        upgrade(path=b"/ws?token=" + token)
        if where == "query"
        else upgrade(b"Authorization: Bearer " + token)
    )
    proto, transport = opened(server, data)
    assert transport.value().startswith(b"HTTP/1.1 101 ")
    assert proto.session.user == "alice"
    assert autobahn_reads == []


def test_a_session_opened_the_short_way_works(autobahn_reads) -> None:
    server = Server()
    join = client_frame(1, b'{"type":"join","room":"r","user":"alice","ref":1}')
    proto, transport = opened(server, upgrade() + join)  # the first frame in the same read as the request
    response, _, rest = transport.value().partition(b"\r\n\r\n")
    assert response.split(b"\r\n") == [
        b"HTTP/1.1 101 Switching Protocols",
        b"Server: " + proto.factory.server.encode(),
        b"Upgrade: WebSocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Accept: " + accept(),
    ]
    assert b'"type":"joined"' in rest and b'"ref":1' in rest
    transport.clear()
    proto.dataReceived(client_frame(9, b"hello"))
    assert transport.value() == b"\x8a\x05hello"  # a pong
    transport.clear()
    proto.dataReceived(client_frame(8, b"\x03\xe8bye"))
    assert transport.value() == b"\x88\x02\x03\xe8" and transport.disconnecting
    assert autobahn_reads == []


def test_an_answer_onconnect_gives_later_is_waited_for(monkeypatch) -> None:
    """Like Autobahn: the handshake timer runs meanwhile, and the 101 goes out when the answer comes."""
    answers: list[defer.Deferred] = []
    monkeypatch.setattr(
        ChatServerProtocol, "onConnect", lambda self, request: answers.append(defer.Deferred()) or answers[-1]
    )
    server = Server()
    proto, transport = opened(server, upgrade())
    assert transport.value() == b"" and proto.openHandshakeTimeoutCall is not None
    answers[0].callback(None)
    assert transport.value().startswith(b"HTTP/1.1 101 ")
    assert proto.openHandshakeTimeoutCall is None and proto.session is not None


def test_a_bug_in_onconnect_answers_500_as_autobahn_does(monkeypatch) -> None:
    def broken(self, request):
        raise RuntimeError("oops")

    monkeypatch.setattr(ChatServerProtocol, "onConnect", broken)
    fast, slow = both_ways(upgrade(), monkeypatch=monkeypatch)
    assert fast["sent"].startswith(b"HTTP/1.1 500 Internal server error: oops\r\n")
    assert fast == slow


@pytest_twisted.ensureDeferred
async def test_over_real_sockets_client_libraries_take_the_short_way(chatd, autobahn_reads) -> None:
    # the websockets library (in a thread: it blocks)
    def chat() -> dict:
        with Client(chatd.ws_url) as client:
            client.send(type="join", room="lobby", user="alice")
            return client.recv_type("joined")

    assert (await deferToThread(chat))["members"] == ["alice"]

    # Autobahn's own client, on this reactor
    received: list[bytes] = []
    done: defer.Deferred = defer.Deferred()

    class Probe(WebSocketClientProtocol):
        def onOpen(self) -> None:
            self.sendMessage(b'{"type":"join","room":"lobby","user":"bob"}')

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            received.append(payload)
            if b'"type":"joined"' in payload:
                self.sendClose(1000)

        def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
            done.callback(code)

    from autobahn.twisted.websocket import connectWS

    factory = WebSocketClientFactory(chatd.ws_url)
    factory.protocol = Probe
    connectWS(factory)
    assert await done == 1000
    assert any(b'"type":"joined"' in frame for frame in received)
    assert autobahn_reads == []


def fragment(opcode: int, payload: bytes, fin: bool) -> bytes:
    """One masked client frame with or without FIN (a short payload)."""
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([(0x80 if fin else 0) | opcode, 0x80 | len(payload)]) + mask + masked


def test_a_connection_makes_its_utf8_validator_only_when_autobahn_reads_text() -> None:
    server = Server()
    proto, transport = opened(server, upgrade())
    proto.dataReceived(client_frame(1, b'{"type":"ping","ref":1}'))  # read the short way (chatd.wsframes)
    assert b'"type":"pong"' in transport.value()
    assert proto.utf8validator._validator is None  # none made for it
    # A fragmented message is Autobahn's to read, and still checked as it comes in.
    transport.clear()
    proto.dataReceived(fragment(1, b'{"type":"ping",', fin=False) + fragment(0, b'"ref":2}', fin=True))
    assert b'"ref":2' in transport.value()
    proto.dataReceived(fragment(1, b'{"type":"ping","x":"\xc3', fin=False) + fragment(0, b'\x28"}', fin=True))
    assert b"\x03\xefencountered invalid UTF-8" in transport.value()  # closed with 1007


def test_a_close_reason_that_is_not_utf8_is_still_refused() -> None:
    server = Server()
    proto, transport = opened(server, upgrade())
    transport.clear()
    proto.dataReceived(client_frame(8, b"\x03\xe8\xff"))
    closing = transport.value()
    assert closing[:1] == b"\x88" and closing[2:4] == b"\x03\xef"  # 1007
    assert b"invalid close reason" in closing


@pytest_twisted.ensureDeferred
async def test_a_browser_takes_the_short_way(chatd, chromium, autobahn_reads) -> None:  # noqa: F811 (the fixture)
    """Chromium's request (an Origin, a deflate offer, a dozen headers) is read the short way."""

    def scenario(browser) -> list[str]:
        page = browser.new_page()
        page.goto(chatd.url("web", path="/"))
        return page.evaluate(
            """url => new Promise((resolve, reject) => {
                const ws = new WebSocket(url);
                ws.onopen = () => ws.send(JSON.stringify({type: "join", room: "lobby", user: "carol"}));
                ws.onmessage = e => {
                    const m = JSON.parse(e.data);
                    if (m.type === "joined") { ws.close(1000); resolve(m.members); }
                };
                ws.onerror = () => reject(new Error("WebSocket error"));
            })""",
            chatd.ws_url,
        )

    assert await in_browser(chromium, scenario) == ["carol"]
    assert autobahn_reads == []
