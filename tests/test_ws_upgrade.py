"""The ``--ws`` port's short way into a WebSocket: a whole ``GET /ws`` head in a
connection's first bytes goes to Autobahn directly, anything else through
twisted.web, and a client cannot tell which way it went."""

from __future__ import annotations

import base64
import io
import socket

import pytest
import pytest_twisted
from autobahn.twisted.resource import WebSocketResource
from autobahn.util import hltype
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from zope.interface import implementer

from chatd import tap, websocket
from chatd.hub import SendBudget
from chatd.websocket import ChatServerProtocol, UpgradeChannel, _TypeName, _whole_upgrade
from tests.wsclient import Client

KEY = base64.b64encode(b"0123456789abcdef")


def upgrade(*extra: bytes, path: bytes = b"/ws", version: bytes = b"13", key: bytes = KEY) -> bytes:
    """An upgrade request head as a WebSocket client library writes it."""
    lines = [
        b"GET " + path + b" HTTP/1.1",
        b"Host: 127.0.0.1:8080",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Key: " + key,
        b"Sec-WebSocket-Version: " + version,
        *extra,
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def through_site(head: bytes) -> bytes:
    """The same request, made to take twisted.web's way (a request with a body never takes the short one)."""
    return head[:-2] + b"Content-Length: 0\r\n\r\n"


class SocketTransport(StringTransport):
    """A fake transport that, like Twisted's socket and TLS transports, lets a protocol unregister no producer."""

    def unregisterProducer(self) -> None:
        self.producer = self.streaming = None


class Server:
    """The ``--ws`` site as ``twistd chatd`` builds it, on a fake clock, fed through fake transports."""

    def __init__(self, *args: str) -> None:
        options = tap.Options(environ={})
        options.parseOptions([*args, "--data-dir", "", "--handshake-timeout", "5"])
        self.clock = MemoryReactorClock()
        service = tap.makeService(options, reactor=self.clock)
        self.hub = service.getServiceNamed("hub")
        self.hub.startService()
        self.site = service.getServiceNamed("ws").factory
        self.site.reactor = self.clock  # the channels' timers too

    def connect(self, port: int = 40000) -> tuple[object, StringTransport]:
        transport = SocketTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", port))
        channel = self.site.buildProtocol(transport.getPeer())
        transport.protocol = channel
        channel.makeConnection(transport)
        return channel, transport

    def send(self, *chunks: bytes) -> StringTransport:
        """Open a connection and write ``chunks`` as separate reads; the transport, with what came back."""
        channel, transport = self.connect()
        for chunk in chunks:
            transport.protocol.dataReceived(chunk)
        return transport


@pytest.fixture
def rendered(monkeypatch) -> list[bytes]:
    """Paths of the requests that reached ``WebSocketResource`` (twisted.web's way)."""
    seen: list[bytes] = []
    render = WebSocketResource.render

    def spy(self, request):
        seen.append(request.path)
        return render(self, request)

    monkeypatch.setattr(WebSocketResource, "render", spy)
    return seen


def status_and_body(response: bytes) -> tuple[bytes, bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], body


def test_the_ws_site_takes_upgrades_the_short_way_and_keeps_its_deadline() -> None:
    server = Server()
    channel, _ = server.connect()
    channel = channel._channel  # behind twisted.web's ALPN switch (HTTP/1.1 or HTTP/2 on TLS)
    assert isinstance(channel, UpgradeChannel)
    assert channel.deadline == 5
    assert channel.upgrades is server.site.resource.children[b"ws"]._factory


def test_a_whole_upgrade_in_the_first_bytes_goes_straight_to_autobahn(rendered) -> None:
    server = Server()
    transport = server.send(upgrade())
    assert transport.value().startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert rendered == []
    assert isinstance(transport.protocol, ChatServerProtocol)
    assert isinstance(transport.producer, SendBudget)  # the session's, in the channel's place
    assert len(server.hub.sessions) == 1
    server.clock.advance(60)  # past --handshake-timeout: the channel's timers were stopped at the hand-over
    assert not transport.disconnecting


def refusals(server: Server, limit: str) -> float:
    value = server.hub.metrics.registry.get_sample_value(
        "chatd_limit_refusals_total", {"limit": limit, "protocol": "websocket"}
    )
    return value or 0.0


def test_before_its_first_bytes_a_connection_holds_one_timer_and_no_producer() -> None:
    server = Server()
    before = set(server.clock.getDelayedCalls())
    _, transport = server.connect()
    (timer,) = set(server.clock.getDelayedCalls()) - before  # twisted.web's idle timer is not started
    assert timer.getTime() == 5  # the deadline
    assert transport.producer is None


def test_a_connection_that_sends_nothing_is_closed_by_the_deadline_as_by_twisted_webs_idle_timer() -> None:
    server = Server()  # --handshake-timeout 5: the deadline and twisted.web's idle timeout alike
    _, transport = server.connect()
    server.clock.advance(4.9)
    assert not transport.disconnecting
    server.clock.advance(0.1)
    assert transport.disconnecting and not transport.disconnected
    assert refusals(server, "handshake_timeout") == 1
    server.clock.advance(15)  # twisted.web's abortTimeout: a peer that does not go is aborted
    assert transport.disconnected


def test_with_a_shorter_idle_timeout_twisted_webs_timer_still_closes_first() -> None:
    server = Server()
    server.site.timeOut = 2
    _, transport = server.connect()
    server.clock.advance(2)
    assert transport.disconnecting
    assert refusals(server, "handshake_timeout") == 0  # the deadline (5 s) did not fire


def test_a_request_taken_by_twisted_web_is_timed_registered_and_logged() -> None:
    server = Server()
    server.site._logFile = log = io.StringIO()
    channel, transport = server.connect()
    channel.dataReceived(b"GET /health HTTP/1.1\r\n")  # not a whole upgrade: twisted.web's from here
    assert transport.producer is channel._channel  # so a paused transport pauses the response
    server.clock.advance(4.9)
    channel.dataReceived(b"Host: 127.0.0.1\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 200 OK\r\n")
    assert '"GET /health HTTP/1.1" 200' in log.getvalue()
    server.clock.advance(4.9)  # the deadline is armed again for the next request
    assert not transport.disconnecting
    server.clock.advance(0.1)
    assert transport.disconnecting


def test_a_trickled_request_is_closed_by_the_deadline() -> None:
    server = Server()
    channel, transport = server.connect()
    server.clock.advance(3)
    channel.dataReceived(b"GET /health HTTP/1.1\r\n")
    server.clock.advance(1.9)
    assert not transport.disconnecting
    server.clock.advance(0.1)  # 5 s after the accept, not after the first bytes
    assert transport.disconnecting
    assert refusals(server, "handshake_timeout") == 1


def test_a_connection_that_negotiated_http_2_is_handed_to_twisted_webs_http_2() -> None:
    from twisted.web._http2 import H2Connection

    server = Server()
    negotiated, transport = server.connect()
    transport.negotiatedProtocol = b"h2"  # as ALPN on a TLS listener sets it
    negotiated.dataReceived(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert isinstance(negotiated._channel, H2Connection)
    assert transport.producer is negotiated._channel
    assert transport.value().startswith(b"\x00")  # its SETTINGS frame


def test_an_upgrade_split_across_reads_goes_through_twisted_web_and_still_opens(rendered) -> None:
    server = Server()
    head = upgrade()
    transport = server.send(head[:20], head[20:])
    assert transport.value().startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert rendered == [b"/ws"]
    assert len(server.hub.sessions) == 1


def test_other_requests_on_the_ws_port_are_twisted_webs(rendered) -> None:
    server = Server()
    health = server.send(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").value()
    assert health.startswith(b"HTTP/1.1 200 OK\r\n") and b'"service":"websocket"' in health
    # an upgrade after another request on a kept-alive connection: twisted.web's way, as before
    kept = server.send(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", upgrade()).value()
    assert b"HTTP/1.1 101 Switching Protocols\r\n" in kept
    assert rendered == [b"/ws"]


@pytest.mark.parametrize(
    "head",
    [
        upgrade(b"Origin: http://evil.example"),  # refused by the Origin policy: 403
        upgrade(version=b"9"),  # 400, naming the supported versions
        upgrade(key=b"short"),  # 400
        upgrade(b"Sec-WebSocket-Protocol: a, a"),  # 400
        upgrade().replace(b"Upgrade: websocket\r\n", b""),  # no Upgrade: Autobahn's status page
        upgrade().replace(b"Upgrade: websocket", b"Upgrade: h2c"),  # 400
        upgrade(path=b"/ws?token=x#frag"),  # 400
    ],
)
def test_a_refused_upgrade_gets_the_same_answer_either_way(head: bytes, rendered) -> None:
    server = Server()
    short = server.send(head)
    long = server.send(through_site(head))
    assert rendered == [b"/ws"]  # only the second went through twisted.web
    assert not short.value().startswith(b"HTTP/1.1 101")
    assert status_and_body(short.value()) == status_and_body(long.value())
    assert server.hub.sessions == {}


def test_a_token_is_checked_the_short_way_too(rendered) -> None:
    server = Server("--auth-secret", "s" * 32)
    short = server.send(upgrade(path=b"/ws?token=nonsense"))
    long = server.send(through_site(upgrade(path=b"/ws?token=nonsense")))
    assert status_and_body(short.value())[0].startswith(b"HTTP/1.1 401 ")
    assert status_and_body(short.value()) == status_and_body(long.value())
    assert rendered == [b"/ws"]


@pytest.mark.parametrize(
    ("data", "short"),
    [
        (upgrade(), True),
        (upgrade(path=b"/ws?token=abc"), True),
        (upgrade()[:-2], False),  # the head is not all in yet
        (upgrade(path=b"/ws/"), False),
        (upgrade(path=b"/wsx"), False),
        (upgrade(path=b"/"), False),
        (upgrade().replace(b"HTTP/1.1", b"HTTP/1.0", 1), False),  # the site answers other versions
        (upgrade().replace(b"GET", b"POST", 1), False),
        (through_site(upgrade()), False),  # a body
        (upgrade(b"Transfer-Encoding: chunked"), False),
        (upgrade(*[b"X-%d: y" % i for i in range(100)]), False),  # more header lines than an upgrade has
        (upgrade(b"X-Big: " + b"y" * 16384), False),  # longer than twisted.web takes
    ],
)
def test_which_requests_take_the_short_way(data: bytes, short: bool) -> None:
    assert _whole_upgrade(data) is short


def test_autobahns_debug_type_names_are_formatted_only_when_used() -> None:
    from autobahn.websocket import protocol

    assert protocol.hltype is _TypeName
    name = _TypeName(websocket.ServerProtocol.processHandshake)
    assert str(name) == hltype(websocket.ServerProtocol.processHandshake)
    assert f"{name}!" == hltype(websocket.ServerProtocol.processHandshake) + "!"


def test_autobahns_debug_values_are_formatted_only_when_used() -> None:
    """A lost connection's reason (a Failure: its traceback) is not turned into text for a dropped debug line."""
    from autobahn.twisted import websocket as autobahn_twisted
    from autobahn.util import hlval
    from autobahn.websocket import protocol

    formatted: list[int] = []

    class Reason:
        def __str__(self) -> str:
            formatted.append(1)
            return "reason"

    for module in (protocol, autobahn_twisted):
        formatted.clear()
        value = module.hlval(Reason())
        assert formatted == []
        assert str(value) == hlval("reason") and f"{value}" == hlval("reason")


def test_autobahns_empty_option_dump_is_not_pretty_printed(monkeypatch) -> None:
    """Its per-connection debug dump is always an empty list (see ServerProtocol): "[]" without a PrettyPrinter."""
    import pprint

    from autobahn.websocket import protocol

    printers: list = []
    monkeypatch.setattr(pprint, "PrettyPrinter", lambda *a, **k: printers.append(a))
    assert protocol.pformat([]) == "[]"
    assert printers == []


def test_sites_with_a_deadline_still_offer_tls_clients_http_2() -> None:
    # The deadline channel sits behind twisted.web's ALPN switch, so h2 is spoken when chosen.
    server = Server()
    assert server.site.acceptableProtocols()[0] == b"h2"


@pytest_twisted.ensureDeferred
async def test_over_real_sockets_a_client_library_takes_the_short_way_and_a_body_the_long_one(chatd, rendered) -> None:
    def scenario() -> bytes:
        with Client(chatd.ws_url) as client:  # the websockets library writes its request head at once
            client.send(type="join", room="lobby", user="alice")
            assert client.recv_type("joined")["members"] == ["alice"]
        assert rendered == []
        with socket.create_connection(("127.0.0.1", chatd.ports["ws"]), timeout=10) as sock:
            sock.sendall(through_site(upgrade()))
            return sock.recv(4096)

    answer = await deferToThread(scenario)
    assert answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert rendered == [b"/ws"]


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One whole masked client frame (a short payload)."""
    mask = b"\x01\x02\x03\x04"
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_no_data_frame_follows_the_close_frame_while_the_connection_closes() -> None:
    """RFC 6455 5.5.1: once the server has answered the peer's close, a presence or reply for it goes nowhere."""
    server = Server()
    transports = {}
    for user in ("alice", "bob"):
        transports[user] = server.send(upgrade())
        transports[user].protocol.dataReceived(client_frame(1, b'{"type":"join","room":"r","user":"%s"}' % user.encode()))
    bob = transports["bob"]
    (session,) = [s for s in server.hub.sessions.values() if s.user == "bob"]
    bob.protocol.dataReceived(client_frame(8, b"\x03\xe8"))
    assert bob.value().endswith(b"\x88\x02\x03\xe8") and bob.disconnecting  # the close answered; the TCP end pending
    bob.clear()
    transports["alice"].protocol.dataReceived(client_frame(1, b'{"type":"leave","room":"r"}'))
    session.send({"type": "pong"})
    assert bob.value() == b""
    assert session.id in server.hub.sessions  # gone only when the connection is


@implementer(ITCPTransport)
class TcpTransport(SocketTransport):
    """A fake TCP transport that records its ``TCP_NODELAY`` setting."""

    no_delay = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled


def test_tcp_nodelay_is_set_at_the_accept_for_either_way_in() -> None:
    server = Server()
    for first in (upgrade(), b"GET /health HTTP/1.1\r\n"):
        transport = TcpTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        channel = server.site.buildProtocol(transport.getPeer())
        transport.protocol = channel
        channel.makeConnection(transport)
        assert transport.no_delay
        transport.protocol.dataReceived(first)
        assert transport.no_delay


def test_a_connections_transport_details_are_autobahns() -> None:
    from autobahn.twisted.util import create_transport_details

    server = Server()
    transport = server.send(upgrade())
    expected = create_transport_details(transport, True)
    expected.channel_framing = expected.CHANNEL_FRAMING_WEBSOCKET
    assert transport.protocol.peer == "tcp4:127.0.0.1:40000"
    assert transport.protocol._transport_details.marshal() == expected.marshal()


def test_a_connection_closed_before_its_first_bytes_leaves_no_timer() -> None:
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    server = Server()
    before = set(server.clock.getDelayedCalls())
    channel, _ = server.connect()
    channel.connectionLost(Failure(ConnectionDone()))
    assert set(server.clock.getDelayedCalls()) == before
    server.clock.advance(60)
    assert refusals(server, "handshake_timeout") == 0
