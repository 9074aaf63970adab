"""The direct write path (``chatd.fastwrite``) over real loopback sockets.

Each test runs a Twisted server on 127.0.0.1 whose connections get the fast
path, and talks to it with a plain socket, so what is checked is what the
kernel and the peer see: bytes sent without the reactor's write
registration, every byte in order when the peer stops reading and resumes,
the streaming producer paused and resumed as Twisted does, the connection
closed only after its data, and a peer's reset reported by the reactor, not
from inside ``write``.
"""

from __future__ import annotations

import select
import socket
import struct

import pytest_twisted
from twisted.internet import defer, protocol, reactor, threads
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import deferLater
from twisted.internet.threads import blockingCallFromThread

from chatd import fastwrite
from chatd.hub import SendBudget
from tests.test_cross_protocol import SignalRClient
from tests.tlscert import make_certificate
from tests.wsclient import Client


class _Server(protocol.Protocol):
    def connectionMade(self) -> None:
        self.factory.installed = fastwrite.install(self.transport)
        self.factory.connected.callback(self)

    def connectionLost(self, reason) -> None:
        self.factory.lost.callback(reason.value)


class _Factory(protocol.ServerFactory):
    protocol = _Server

    def __init__(self) -> None:
        self.connected: defer.Deferred = defer.Deferred()
        self.lost: defer.Deferred = defer.Deferred()
        self.installed = False


class _Producer:
    """A streaming producer that records what the transport told it."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


async def _pair(rcvbuf: int | None = None):
    """A listening fast-path server and a connected client socket; returns (server protocol, client, factory, port)."""
    factory = _Factory()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    client = socket.socket()
    if rcvbuf is not None:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    client.settimeout(10)
    client.connect(("127.0.0.1", port.getHost().port))
    server = await factory.connected
    assert factory.installed
    return server, client, factory, port


def _recv_exactly(client: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = client.recv(min(n, 1 << 16))
        assert chunk, "the server closed early"
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _recv_to_eof(client: socket.socket) -> bytes:
    chunks = []
    while chunk := client.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _numbered(i: int, size: int) -> bytes:
    """Chunk ``i``: its number repeated, so a reordered or lost chunk shows."""
    return struct.pack(">I", i) * (size // 4)


def _idle(transport) -> bool:
    """Nothing buffered and the socket not registered for writing."""
    return not transport.dataBuffer and not transport._tempDataLen and transport not in reactor.getWriters()


@pytest_twisted.ensureDeferred
async def test_a_small_write_reaches_the_peer_without_buffering_or_write_registration() -> None:
    server, client, factory, port = await _pair()
    try:
        server.transport.write(b"hello")
        assert _idle(server.transport)
        server.transport.writeSequence([b", ", b"world"])
        assert _idle(server.transport)
        assert _recv_exactly(client, 12) == b"hello, world"
    finally:
        client.close()
        await port.stopListening()
        await factory.lost


@pytest_twisted.ensureDeferred
async def test_a_reader_that_stops_then_resumes_gets_every_byte_in_order_and_the_producer_is_paused_and_resumed() -> (
    None
):
    server, client, factory, port = await _pair(rcvbuf=4096)
    transport = server.transport
    producer = _Producer()
    transport.registerProducer(producer, True)
    size, expected = 4096, []
    try:
        # The client reads nothing: the kernel buffers fill, then Twisted's does.
        i = 0
        while "pause" not in producer.calls:
            expected.append(_numbered(i, size))
            transport.write(expected[-1])
            i += 1
            assert i < 10_000, "the producer was never paused"
        assert transport.dataBuffer or transport._tempDataLen
        # The client resumes reading while more is written, a chunk per reactor
        # turn, sometimes into a non-empty buffer and sometimes into an empty one.
        total = sum(map(len, expected)) + 200 * size
        reading = threads.deferToThread(_recv_exactly, client, total)
        for j in range(i, i + 200):
            expected.append(_numbered(j, size))
            transport.write(expected[-1])
            await deferLater(reactor, 0, lambda: None)
        assert await reading == b"".join(expected)
        # (Twisted pauses again on every write into a full buffer.)
        assert producer.calls[0] == "pause"
        assert producer.calls[-1] == "resume"
    finally:
        transport.unregisterProducer()
        client.close()
        await port.stopListening()
        await factory.lost


@pytest_twisted.ensureDeferred
async def test_direct_says_whether_a_write_may_go_to_the_socket_now_through_every_change_of_state() -> None:
    server, client, factory, port = await _pair(rcvbuf=4096)
    transport = server.transport
    try:
        assert transport.direct
        # The client reads nothing: once the kernel's buffers are full, Twisted's takes the rest.
        chunks, i = [], 0
        while transport.direct:
            chunks.append(_numbered(i, 4096))
            transport.send_direct(chunks[-1])
            i += 1
            assert i < 10_000, "the kernel never pushed back"
        assert transport.dataBuffer or transport._tempDataLen
        transport.write(b"behind the buffer")  # not direct: queued after what waits
        assert not transport.direct
        # The client reads it all; the reactor drains the buffer and direct comes back.
        expected = b"".join(chunks) + b"behind the buffer"
        assert await threads.deferToThread(_recv_exactly, client, len(expected)) == expected
        for _ in range(100):
            if transport.direct:
                break
            await deferLater(reactor, 0.01, lambda: None)
        assert transport.direct and _idle(transport)
        transport.loseConnection()
        assert not transport.direct
        assert await threads.deferToThread(_recv_to_eof, client) == b""
        await factory.lost
        assert not transport.direct
    finally:
        client.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_an_aborted_connection_is_not_direct() -> None:
    server, client, factory, port = await _pair()
    try:
        assert server.transport.direct
        server.transport.abortConnection()
        assert not server.transport.direct
        server.transport.write(b"dropped")  # Twisted's path: aborted, nothing is sent
        await factory.lost
    finally:
        client.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_the_send_budget_closes_a_frozen_reader_written_to_on_the_fast_path() -> None:
    server, client, factory, port = await _pair(rcvbuf=4096)
    overflowed = []
    budget = SendBudget(256 * 1024, lambda: overflowed.append(True))
    budget.attach(server.transport)
    frame = b"x" * 1000
    try:
        written = 0
        while budget.charge(len(frame)):
            server.transport.write(frame)
            written += 1
            assert written < 100_000, "never over budget"
        assert overflowed == [True]
        assert budget.paused
    finally:
        server.transport.unregisterProducer()
        server.transport.abortConnection()
        client.close()
        await port.stopListening()
        await factory.lost


@pytest_twisted.ensureDeferred
async def test_lose_connection_after_writes_delivers_everything_first() -> None:
    server, client, factory, port = await _pair(rcvbuf=4096)
    data = [_numbered(i, 8192) for i in range(256)]  # 2 MB: more than the kernel holds
    for chunk in data:
        server.transport.write(chunk)
    server.transport.loseConnection()
    server.transport.write(b"after the close was asked for")
    try:
        received = await threads.deferToThread(_recv_to_eof, client)
        assert received == b"".join(data) + b"after the close was asked for"
    finally:
        client.close()
        await port.stopListening()
        await factory.lost


@pytest_twisted.ensureDeferred
async def test_a_peer_reset_is_reported_by_the_reactor_not_raised_from_write() -> None:
    server, client, factory, port = await _pair()
    try:
        # An RST, not a FIN: the next send fails with ECONNRESET or EPIPE. The
        # reactor gets no turn between the reset and the writes, as in a fan-out.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        assert select.select([server.transport.socket], [], [], 10)[0], "the reset never arrived"
        for _ in range(3):
            server.transport.write(b"x" * 1000)  # must not raise
        assert not factory.lost.called, "connectionLost ran inside write()"
        await factory.lost
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_tls_connections_keep_twisteds_own_write_path(tmp_path) -> None:
    key, cert = make_certificate(tmp_path)
    factory = _Factory()
    endpoint = serverFromString(reactor, f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}")
    port = await endpoint.listen(factory)
    context = _tls_client_context()
    raw = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
    client = await threads.deferToThread(context.wrap_socket, raw, server_hostname="localhost")
    try:
        server = await factory.connected
        assert factory.installed is False
        server.transport.write(b"over tls")
        assert await threads.deferToThread(client.recv, 100) == b"over tls"
    finally:
        client.close()
        await port.stopListening()
        await factory.lost


def _tls_client_context():
    import ssl as stdlib_ssl

    context = stdlib_ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = stdlib_ssl.CERT_NONE
    return context


def test_only_plain_accepted_tcp_connections_get_the_fast_path() -> None:
    class NotTCP:
        TLS = False

    assert fastwrite.install(NotTCP()) is False


# -- chatd's WebSocket connections use it ---------------------------------------------


def _transport_of(running, user: str):
    """The server-side transport of ``user``'s connection (read in the reactor thread)."""
    (session,) = [s for s in running.hub.sessions.values() if s.user == user]
    if hasattr(session, "connection"):  # SignalR: its WebSocket protocol is the connection's transport
        return session.connection.transport.transport
    return session._proto.transport


@pytest_twisted.ensureDeferred
async def test_a_ws_connection_writes_deliveries_and_replies_at_once(chatd) -> None:
    def scenario():
        with Client(chatd.ws_url) as alice:
            alice.join("r", "alice")
            transport = blockingCallFromThread(reactor, _transport_of, chatd, "alice")
            assert type(transport) is fastwrite.FastServer
            alice.send(type="message", room="r", message="hi")
            assert alice.recv_type("message")["message"] == "hi"
            assert blockingCallFromThread(reactor, _idle, transport)

    await threads.deferToThread(scenario)


@pytest_twisted.ensureDeferred
async def test_a_ws_port_connection_has_the_fast_path_from_its_accept_so_the_101_is_sent_at_once(
    chatd, monkeypatch
) -> None:
    registered: list = []
    add_writer = reactor.addWriter
    monkeypatch.setattr(reactor, "addWriter", lambda writer: registered.append(writer) or add_writer(writer))

    def scenario():
        with Client(chatd.ws_url) as alice:
            alice.join("r", "alice")
            transport = blockingCallFromThread(reactor, _transport_of, chatd, "alice")
            assert type(transport) is fastwrite.FastServer
            # Nothing this connection was sent (the 101, the join's reply) waited for the reactor.
            assert blockingCallFromThread(reactor, lambda: transport not in registered)

    await threads.deferToThread(scenario)


@pytest_twisted.ensureDeferred
async def test_a_reply_larger_than_the_read_limit_is_sent(start) -> None:
    # The read limit bounds what a client may send, not what it is sent:
    # a history of long messages is far larger than one inbound frame.
    running = await start("--read-buffer-size", "8192", "--max-message-length", "4000")

    def scenario():
        with Client(running.ws_url) as alice:
            alice.join("r", "alice")
            for i in range(10):
                alice.send(type="message", room="r", message=f"{i}" * 4000)
                alice.recv_type("message")
            alice.send(type="history", room="r", limit=10)
            reply = alice.recv_type("history")
            assert [m["message"] for m in reply["messages"]] == [f"{i}" * 4000 for i in range(10)]

    await threads.deferToThread(scenario)


@pytest_twisted.ensureDeferred
async def test_a_signalr_websocket_record_larger_than_the_read_limit_is_sent_and_fan_out_is_direct(
    start,
) -> None:
    running = await start("--read-buffer-size", "8192", "--max-message-length", "4000")
    url = running.url("signalr", "ws", "/signalr")

    def scenario():
        with SignalRClient(url) as bob, SignalRClient(url) as carol:
            for client, user in ((bob, "bob"), (carol, "carol")):
                client.call("JoinRoom", "r", user)
            transport = blockingCallFromThread(reactor, _transport_of, running, "carol")
            assert type(transport) is fastwrite.FastServer
            seen: list[dict] = []
            for i in range(10):
                bob.call("SendToRoom", "r", "bob", f"{i}" * 4000, seen=seen)
            received = [carol.next() for _ in range(10)]
            assert [r["arguments"][1] for r in received] == [f"{i}" * 4000 for i in range(10)]
            assert blockingCallFromThread(reactor, _idle, transport)
            # One record of some 40 KB, five times the inbound limit.
            history = bob.call("GetHistory", "r", 10)
            assert [m["message"] for m in history] == [f"{i}" * 4000 for i in range(10)]

    await threads.deferToThread(scenario)


@pytest_twisted.ensureDeferred
async def test_deliveries_queue_behind_a_frame_autobahn_holds_back(chatd) -> None:
    # A frame Autobahn queues (a sync or chopped send) is written a reactor turn
    # later; a delivery made meanwhile must not overtake it on the direct path.
    def queue_then_deliver():
        (session,) = [s for s in chatd.hub.sessions.values() if s.user == "alice"]
        assert session.direct is not None
        # The first is written at once, the second waits in Autobahn's queue.
        session._proto.sendMessage(b'{"type":"queued","n":1}', sync=True)
        session._proto.sendMessage(b'{"type":"queued","n":2}', sync=True)
        assert session._proto.send_queue
        return chatd.hub.publish("r", "alice", "after it", "websocket")  # fanned out in this call (memory store)

    def scenario():
        with Client(chatd.ws_url) as alice:
            alice.join("r", "alice")
            blockingCallFromThread(reactor, queue_then_deliver)
            assert [alice.recv() for _ in range(2)] == [{"type": "queued", "n": 1}, {"type": "queued", "n": 2}]
            assert alice.recv()["message"] == "after it"

    await threads.deferToThread(scenario)
