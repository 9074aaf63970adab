"""Limits per address and per connection (README, Security: Limits).

Unit tests drive the hub, the idle timer and the SignalR core with fakes and
a ``Clock``; the limits that show on the wire are then checked with clients
chatd did not write: ``websockets``, grpcio and raw HTTP for SignalR.
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.request

import grpc
import pytest
import pytest_twisted
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from websockets.exceptions import ConnectionClosed

from chatd import tap
from chatd.grpc.generated import chat_pb2 as pb
from chatd.grpc.generated.chat_pb2_grpc import ChatServiceStub
from chatd.hub import AddressFull, Hub, Session
from chatd.limits import IdleTimer, address
from chatd.signalr.connection import CLOSED, Options
from chatd.signalr.transports import ConnectionManager
from chatd.validate import ConnectionRateLimited, Limits, RateLimited, TooManyRooms
from tests import grpcservers
from tests.test_hub import FakeSession, publish
from tests.wsclient import Client

grpc_server = grpcservers.grpc_server  # a test that asks for it runs on both gRPC servers

TIMEOUT = 15


def refusals(hub: Hub, limit: str, protocol: str) -> float:
    value = hub.metrics.registry.get_sample_value(
        "chatd_limit_refusals_total", {"limit": limit, "protocol": protocol}
    )
    return value or 0.0


class PeerSession(FakeSession):
    def __init__(self, peer: str, user: str | None = None, protocol: str = "fake") -> None:
        super().__init__(user)
        self.peer = peer
        self.protocol = protocol


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(1_700_000_000)
    return c


# -- addresses -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "peer, expected",
    [
        ("tcp4:10.0.0.1:5555", "10.0.0.1"),  # Autobahn
        ("tcp6:::1:5555", "::1"),
        ("tcp6:::ffff:10.0.0.1:5555", "10.0.0.1"),  # an IPv4 client on a dual-stack socket
        ("ipv4:10.0.0.1:5555", "10.0.0.1"),  # grpcio
        ("ipv6:[::1]:5555", "::1"),
        ("ipv6:%5B::1%5D:5555", "::1"),
        ("10.0.0.1:5555", "10.0.0.1"),  # twisted.web (SignalR)
        ("[2001:db8::1]:5555", "2001:db8::1"),
        ("unix:/run/chatd.sock", None),  # local: not limited
        ("unix", None),
        ("", None),
    ],
)
def test_every_adapters_peer_form_reduces_to_one_address(peer, expected) -> None:
    assert address(peer) == expected


def test_connections_per_address_count_every_protocol_together(clock) -> None:
    hub = Hub(clock, max_connections_per_ip=2)
    hub.startService()
    ws = PeerSession("tcp4:10.0.0.1:1", protocol="websocket")
    stream = PeerSession("ipv4:10.0.0.1:2", protocol="grpc")
    hub.connect(ws)
    hub.connect(stream)
    third = PeerSession("tcp6:::ffff:10.0.0.1:3", protocol="websocket")
    with pytest.raises(AddressFull, match="too many connections from 10.0.0.1: at most 2"):
        hub.connect(third)
    assert third.id not in hub.sessions
    assert refusals(hub, "connections_per_ip", "websocket") == 1
    hub.connect(PeerSession("tcp4:10.0.0.2:1"))  # another address is not affected
    hub.connect(PeerSession("unix:/run/chatd.sock"))  # nor a local socket
    hub.disconnect(ws)
    hub.connect(third)  # a slot came free
    assert hub.addresses.counts == {"10.0.0.1": 2, "10.0.0.2": 1}


def test_zero_turns_the_per_address_limit_off(clock) -> None:
    hub = Hub(clock, max_connections_per_ip=0)
    for i in range(5):
        hub.connect(PeerSession(f"tcp4:10.0.0.1:{i}"))
    assert hub.addresses.counts == {}


def test_signalr_counts_a_connection_from_negotiate_until_it_closes(clock) -> None:
    hub = Hub(clock, max_connections_per_ip=1)
    hub.startService()
    manager = ConnectionManager(hub, clock, Options(disconnect_timeout=15))
    first = manager.create("10.0.0.1:1", "ada")  # negotiated, no transport yet
    with pytest.raises(AddressFull):
        manager.create("10.0.0.1:2", "bob")
    assert refusals(hub, "connections_per_ip", "signalr") == 1
    clock.advance(15)  # no transport came: the connection ends, its slot with it
    assert first.state == CLOSED
    manager.create("10.0.0.1:3", "bob")


# -- rooms per connection -------------------------------------------------------------------


def test_a_join_past_the_rooms_per_connection_limit_is_refused_and_changes_nothing(clock) -> None:
    hub = Hub(clock, limits=Limits(rooms_per_connection=2))
    hub.startService()
    s = FakeSession("ada")
    hub.connect(s)
    hub.join(s, "a")
    hub.join(s, "b")
    hub.join(s, "a")  # joined already: not one more
    with pytest.raises(TooManyRooms, match="a connection may be in 2 at once"):
        hub.join(s, "c")
    assert s.rooms == {"a", "b"} and "c" not in hub.rooms()
    assert refusals(hub, "rooms_per_connection", "fake") == 1
    hub.leave(s, "a")
    hub.join(s, "c")


# -- message rate per connection ----------------------------------------------------------------


def test_a_connection_cannot_dodge_the_rate_by_naming_a_new_user_per_message(clock) -> None:
    hub = Hub(clock, limits=Limits(message_rate=100, connection_rate=1, connection_burst=2))
    hub.startService()
    s = FakeSession()
    hub.connect(s)
    publish(hub, "r", "u1", "hi", "fake", source=s)
    publish(hub, "r", "u2", "hi", "fake", source=s)
    with pytest.raises(ConnectionRateLimited, match="this connection may send 1 messages a second"):
        publish(hub, "r", "u3", "hi", "fake", source=s)
    assert refusals(hub, "connection_rate", "fake") == 1
    other = FakeSession()
    hub.connect(other)
    publish(hub, "r", "u3", "hi", "fake", source=other)  # another connection has its own bucket
    clock.advance(1)
    publish(hub, "r", "u4", "hi", "fake", source=s)
    assert hub.messages_total == 4


def test_one_shot_calls_share_a_bucket_per_client_address(clock) -> None:
    hub = Hub(clock, limits=Limits(connection_rate=1, connection_burst=1))
    hub.startService()
    publish(hub, "r", "u1", "hi", "grpc", source="ipv4:10.0.0.1:1000")
    with pytest.raises(ConnectionRateLimited, match="address 10.0.0.1"):
        publish(hub, "r", "u2", "hi", "grpc", source="ipv4:10.0.0.1:1001")  # a new channel, same address
    publish(hub, "r", "u2", "hi", "grpc", source="ipv4:10.0.0.2:1000")


def test_the_per_user_limit_still_holds_over_connections_and_a_refusal_charges_neither(clock) -> None:
    hub = Hub(clock, limits=Limits(message_rate=1, message_burst=1, connection_rate=5, connection_burst=1))
    hub.startService()
    a, b = FakeSession(), FakeSession()
    hub.connect(a)
    hub.connect(b)
    publish(hub, "r", "ada", "hi", "fake", source=a)
    with pytest.raises(RateLimited, match="ada may send 1 messages"):
        publish(hub, "r", "ada", "hi", "fake", source=b)
    # b's own bucket was not charged by the refusal: it may still send once as someone else.
    publish(hub, "r", "bob", "hi", "fake", source=b)


# -- timeouts on a clock ----------------------------------------------------------------------------


def test_the_idle_timer_fires_only_after_a_whole_quiet_timeout(clock) -> None:
    fired: list[float] = []
    timer = IdleTimer(clock, 10, lambda: fired.append(clock.seconds()))
    timer.start()
    start = clock.seconds()
    clock.advance(6)
    timer.touch()
    clock.advance(6)  # the first deadline passes, but 6 s after a touch
    assert fired == []
    clock.advance(4)
    assert fired == [start + 16]
    assert clock.getDelayedCalls() == []


def test_a_stopped_idle_timer_never_fires(clock) -> None:
    fired: list[bool] = []
    timer = IdleTimer(clock, 10, lambda: fired.append(True))
    timer.start()
    timer.stop()
    clock.advance(100)
    assert fired == [] and clock.getDelayedCalls() == []


def test_signalr_handshake_timeout_is_the_option_and_is_counted(clock) -> None:
    hub = Hub(clock)
    hub.startService()
    manager = ConnectionManager(hub, clock, Options(handshake_timeout=4, disconnect_timeout=60))
    connection = manager.create("10.0.0.1:1", "ada")

    class Transport:
        name = "LongPolling"
        supports_binary = True
        inherent_keep_alive = True
        written: list[bytes] = []

        def write(self, data: bytes, binary: bool) -> None:
            self.written.append(data)

        def close(self) -> None:
            pass

    connection.attach(Transport())
    clock.advance(3.9)
    assert connection.state != CLOSED
    clock.advance(0.1)
    assert connection.state == CLOSED and connection.close_error == "Handshake was canceled."
    assert refusals(hub, "handshake_timeout", "signalr") == 1


# -- options -------------------------------------------------------------------------------------


def parse(*argv: str, **environ: str) -> tap.Options:
    options = tap.Options(environ=environ)
    options.parseOptions(list(argv))
    return options


def test_limit_defaults_and_what_they_follow() -> None:
    options = parse()
    assert options["max-connections-per-ip"] == 256
    assert options["max-rooms-per-connection"] == 100
    assert options["max-connection-rate"] == 40  # 2 x --max-message-rate
    assert options["connection-burst"] == 100  # 2 x --message-burst
    assert options["handshake-timeout"] == 15
    assert options["idle-timeout"] == 0
    assert options["signalr-handshake-timeout"] == 15
    assert options["signalr-max-post"] == 16 * 65536  # 16 x --read-buffer-size
    off = parse("--max-message-rate", "0", "--read-buffer-size", "1000")
    assert (off["max-connection-rate"], off["signalr-max-post"]) == (0, 16000)
    env = parse(MAX_CONNECTION_RATE="7", MAX_CONNECTIONS_PER_IP="0", SIGNALR_MAX_POST="70000")
    assert (env["max-connection-rate"], env["max-connections-per-ip"], env["signalr-max-post"]) == (7, 0, 70000)


def test_a_post_limit_below_one_record_is_refused() -> None:
    from twisted.python import usage

    with pytest.raises(usage.UsageError, match="--signalr-max-post must be at least --read-buffer-size"):
        parse("--signalr-max-post", "1000")


def test_the_service_tree_carries_every_limit() -> None:
    options = parse(
        "--max-connections-per-ip", "3", "--max-rooms-per-connection", "4", "--max-connection-rate", "5",
        "--connection-burst", "6", "--idle-timeout", "7", "--handshake-timeout", "8",
        "--signalr-handshake-timeout", "9", "--signalr-max-post", "100000", "--data-dir", "",
    )
    service = tap.makeService(options, reactor=MemoryReactorClock())
    hub = service.getServiceNamed("hub")
    assert hub.addresses.limit == 3
    assert (hub.limits.rooms_per_connection, hub.limits.connection_rate, hub.limits.connection_burst) == (4, 5, 6)
    ws_site = service.getServiceNamed("ws").factory
    assert ws_site.timeOut == 8
    ws_factory = ws_site.resource.children[b"ws"]._factory
    assert (ws_factory.idle_timeout, ws_factory.openHandshakeTimeout) == (7, 8)
    signalr_site = service.getServiceNamed("signalr").factory
    assert (signalr_site.timeOut, signalr_site.body_limit) == (8, 100000)
    assert signalr_site.manager.options.handshake_timeout == 9
    assert service.getServiceNamed("web").factory.timeOut == 8


# -- on the wire -----------------------------------------------------------------------------------


def _negotiate(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("POST", "/signalr/negotiate?negotiateVersion=1")
        response = conn.getresponse()
        assert response.status == 200
        return json.loads(response.read())
    finally:
        conn.close()


def _closed_with(url: str) -> tuple[int, str]:
    """Open a WebSocket and wait for the server to close it; the close code and reason."""
    client = Client(url)
    try:
        client.recv(timeout=TIMEOUT)
    except ConnectionClosed as e:
        return e.rcvd.code, e.rcvd.reason
    finally:
        client.close()
    raise AssertionError("the connection was not closed")


@pytest_twisted.ensureDeferred
async def test_connections_per_address_hold_over_websocket_signalr_and_grpc(start, grpc_server) -> None:
    running = await start("--max-connections-per-ip", "2", "--grpc-server", grpc_server)
    signalr = running.ports["signalr"]

    def scenario() -> None:
        with Client(running.ws_url) as a:
            a.join("r", "ada")
            negotiated = _negotiate(signalr)  # counts, though no transport came yet
            assert "connectionToken" in negotiated
            code, reason = _closed_with(running.ws_url)
            assert (code, reason) == (1013, "too many connections from 127.0.0.1: at most 2 at once, "
                                      "close one or try again later")
            assert _negotiate(signalr) == {"error": reason}  # SignalR's own form: clients show it
            with grpc.insecure_channel(running.grpc_target) as channel:
                stream = ChatServiceStub(channel).StreamMessages(
                    pb.StreamRequest(room="r", user="gus"), timeout=TIMEOUT
                )
                with pytest.raises(grpc.RpcError) as info:
                    next(stream)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert info.value.details() == reason
                # One-shot calls are not connections: they still work.
                ChatServiceStub(channel).SendMessage(pb.MessageRequest(user="gus", message="hi", room="r"))
        with urllib.request.urlopen(running.http_url + "/metrics", timeout=TIMEOUT) as r:
            metrics = r.read().decode()
        for protocol in ("websocket", "signalr", "grpc"):
            assert f'chatd_limit_refusals_total{{limit="connections_per_ip",protocol="{protocol}"}} 1.0' in metrics

    await deferToThread(scenario)


@pytest_twisted.ensureDeferred
async def test_a_websocket_join_past_the_room_limit_gets_an_error_and_the_connection_lives(start) -> None:
    running = await start("--max-rooms-per-connection", "2")

    def scenario() -> None:
        with Client(running.ws_url) as c:
            c.join("a", "ada")
            c.join("b", "ada")
            c.send(type="join", room="c", user="ada", ref=1)
            error = c.recv_type("error")
            assert error == {
                "type": "error",
                "error": "too many rooms: a connection may be in 2 at once; leave one first",
                "request": "join",
                "ref": 1,
            }
            c.send(type="leave", room="a")
            c.recv_type("left")
            assert c.join("c", "ada")["room"] == "c"

    await deferToThread(scenario)


@pytest_twisted.ensureDeferred
async def test_grpc_send_message_is_rate_limited_per_address_whatever_the_user(start, grpc_server) -> None:
    running = await start(
        "--max-message-rate", "100", "--max-connection-rate", "1", "--connection-burst", "2", "--grpc-server", grpc_server
    )

    def scenario() -> None:
        with grpc.insecure_channel(running.grpc_target) as channel:
            chat = ChatServiceStub(channel)
            for user in ("u1", "u2"):
                chat.SendMessage(pb.MessageRequest(user=user, message="hi", room="r"), timeout=TIMEOUT)
            with pytest.raises(grpc.RpcError) as info:
                chat.SendMessage(pb.MessageRequest(user="u3", message="hi", room="r"), timeout=TIMEOUT)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert info.value.details().startswith("rate limited: address 127.0.0.1 may send 1 messages a second")

    await deferToThread(scenario)
    assert running.hub.messages_total == 2


@pytest_twisted.ensureDeferred
async def test_a_websocket_connection_is_rate_limited_even_with_the_per_user_limit_off(start) -> None:
    running = await start("--max-message-rate", "0", "--max-connection-rate", "1", "--connection-burst", "2")

    def scenario() -> None:
        with Client(running.ws_url) as c:
            c.join("r", "ada")
            for i in range(2):
                c.send(type="message", room="r", message=f"m{i}")
            c.send(type="message", room="r", message="m2", ref="x")
            error = c.recv_type("error")
            assert error["error"].startswith("rate limited: this connection may send 1 messages a second")
            assert error["ref"] == "x"

    await deferToThread(scenario)
    assert running.hub.messages_total == 2


@pytest_twisted.ensureDeferred
async def test_a_silent_websocket_is_closed_after_the_idle_timeout_and_a_talking_one_is_not(start) -> None:
    running = await start("--idle-timeout", "1", "--handshake-timeout", "1")

    def scenario() -> None:
        with Client(running.ws_url) as talker:
            talker.join("r", "ada")
            # Sending more often than the timeout, for longer than it (and past the
            # HTTP request timeout, which an upgraded connection no longer has), it stays.
            for _ in range(6):
                try:
                    talker.recv(timeout=0.4)
                except TimeoutError:
                    pass
                talker.send(type="ping")
                assert talker.recv_type("pong") == {"type": "pong"}
        code, reason = _closed_with(running.ws_url)  # sends nothing at all
        assert (code, reason) == (4008, "idle: nothing received for 1 s")

    await deferToThread(scenario)
    assert refusals(running.hub, "idle_timeout", "websocket") == 1


@pytest_twisted.ensureDeferred
async def test_a_client_that_never_finishes_its_request_is_dropped_after_the_handshake_timeout(start) -> None:
    running = await start("--handshake-timeout", "1")

    def scenario(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            sock.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
            return sock.recv(1024)  # b"" once the server hangs up (twisted.web's own default: 12 hours)

    for listener in ("ws", "signalr"):
        assert await deferToThread(scenario, running.ports[listener]) == b""


@pytest_twisted.ensureDeferred
async def test_signalr_post_body_limit_is_the_option_and_is_counted(start) -> None:
    running = await start("--signalr-max-post", "70000")
    port = running.ports["signalr"]

    def scenario() -> tuple[int, bytes]:
        token = _negotiate(port)["connectionToken"]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        try:
            conn.request("POST", "/signalr?id=" + token, body=b'{"type":6}\x1e' * 7000)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    status, text = await deferToThread(scenario)
    assert (status, text) == (413, b"Request body too large: the limit is 70000 bytes")
    assert refusals(running.hub, "post_body", "signalr") == 1


def test_connection_sessions_count_their_address_unless_the_adapter_holds_it() -> None:
    from chatd.signalr.chat import SignalRSession

    assert Session.counts_address is True
    assert SignalRSession.counts_address is False
