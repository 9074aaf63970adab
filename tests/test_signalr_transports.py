"""SignalR's HTTP transports in memory: long polling and Server-Sent Events on ``task.Clock``."""

from __future__ import annotations

import io

import orjson
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from chatd.hub import Hub
from chatd.signalr import protocol as p
from chatd.signalr.connection import Options
from chatd.signalr.transports import site

HANDSHAKE = b'{"protocol":"json","version":1}\x1e'


class Request(DummyRequest):
    """DummyRequest, with a push producer registered rather than spun."""

    producer = None

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None


class Server:
    def __init__(self, max_connections: int = 100, **options) -> None:
        self.clock = Clock()
        self.hub = Hub(self.clock, max_connections=max_connections)
        self.site = site(self.hub, self.clock, options=Options(**options))
        self.manager = self.site.manager
        self.root = self.site.resource

    def request(self, method: bytes, path: bytes, query: dict | None = None, body: bytes = b"", headers=None):
        segments = path.strip(b"/").split(b"/")
        request = Request(segments[1:] or [])
        request.method = method
        request.client = IPv4Address("TCP", "127.0.0.1", 50000)
        request.content = io.BytesIO(body)
        for key, value in (query or {}).items():
            request.addArg(key.encode(), value.encode())
        for key, value in (headers or {}).items():
            request.requestHeaders.setRawHeaders(key, [value])
        resource = self.root.getChildWithDefault(segments[0], request)
        while request.postpath:
            resource = resource.getChildWithDefault(request.postpath.pop(0), request)
        result = resource.render(request)
        if result is not NOT_DONE_YET:
            request.write(result)
            request.finish()
        return request

    def negotiate(self, **query) -> dict:
        request = self.request(b"POST", b"/signalr/negotiate", {"negotiateVersion": "1", **query})
        return orjson.loads(b"".join(request.written))


def body(request) -> bytes:
    return b"".join(request.written)


def messages(request) -> list[dict]:
    return p.JsonCodec().feed(body(request))


@pytest.fixture
def server():
    return Server()


def long_poll_connection(server, **query):
    token = server.negotiate(**query)["connectionToken"]
    first = server.request(b"GET", b"/signalr", {"id": token})
    assert first.finished and first.responseCode in (None, 200) and body(first) == b""
    server.request(b"POST", b"/signalr", {"id": token}, HANDSHAKE)
    handshake = server.request(b"GET", b"/signalr", {"id": token})
    assert body(handshake) == b"{}\x1e"
    return token


def test_long_poll_first_returns_at_once_then_waits_for_data(server):
    token = long_poll_connection(server, user="ada")
    poll = server.request(b"GET", b"/signalr", {"id": token})
    assert not poll.finished
    server.hub.publish("general", "bob", "hi", "websocket")
    assert poll.finished
    assert messages(poll)[0]["target"] == "ReceiveMessage"


def test_long_poll_sends_one_record_per_response(server):
    token = long_poll_connection(server, user="ada")
    server.hub.publish("general", "bob", "one", "websocket")
    server.hub.publish("general", "bob", "two", "websocket")
    got = [messages(server.request(b"GET", b"/signalr", {"id": token})) for _ in range(2)]
    assert [[m["arguments"][1] for m in batch] for batch in got] == [["one"], ["two"]]


def test_long_poll_times_out_empty_and_a_newer_poll_ends_the_older(server):
    token = long_poll_connection(server)
    poll = server.request(b"GET", b"/signalr", {"id": token})
    server.clock.advance(90)
    assert poll.finished and body(poll) == b"" and poll.responseCode in (None, 200)
    older = server.request(b"GET", b"/signalr", {"id": token})
    newer = server.request(b"GET", b"/signalr", {"id": token})
    assert older.finished and older.responseCode == 204
    assert not newer.finished


def test_long_poll_client_that_stops_polling_is_dropped(server):
    token = long_poll_connection(server, user="ada")
    assert server.hub.members("general") == ["ada"]
    server.clock.advance(14)
    assert server.hub.members("general") == ["ada"]
    server.clock.advance(1)
    assert server.hub.members("general") == [] and not server.hub.sessions
    assert token not in server.manager.connections
    assert server.request(b"GET", b"/signalr", {"id": token}).responseCode == 404


def test_long_poll_server_close_sends_close_then_204_then_forgets(server):
    token = long_poll_connection(server, user="ada")
    (session,) = server.hub.sessions.values()
    session.going_away("server shutting down")
    last = server.request(b"GET", b"/signalr", {"id": token})
    assert messages(last) == [{"type": p.CLOSE, "error": "server shutting down", "allowReconnect": True}]
    stop = server.request(b"GET", b"/signalr", {"id": token})
    assert stop.responseCode == 204
    assert token not in server.manager.connections


def test_delete_ends_long_polling_and_the_waiting_poll_gets_204(server):
    token = long_poll_connection(server, user="ada")
    poll = server.request(b"GET", b"/signalr", {"id": token})
    delete = server.request(b"DELETE", b"/signalr", {"id": token})
    assert delete.responseCode == 202
    assert poll.responseCode == 204
    assert not server.hub.sessions and token not in server.manager.connections


def test_handshake_posted_before_the_first_poll_as_signalrcore_does(server):
    token = server.negotiate()["connectionToken"]
    server.request(b"POST", b"/signalr", {"id": token}, HANDSHAKE)
    assert body(server.request(b"GET", b"/signalr", {"id": token})) == b""  # activation
    assert body(server.request(b"GET", b"/signalr", {"id": token})) == b"{}\x1e"


def test_never_connected_connection_expires(server):
    token = server.negotiate()["connectionToken"]
    server.clock.advance(15)
    assert token not in server.manager.connections
    assert server.request(b"POST", b"/signalr", {"id": token}, HANDSHAKE).responseCode == 404


def test_server_sent_events_framing_and_headers(server):
    token = server.negotiate(user="ada")["connectionToken"]
    stream = server.request(b"GET", b"/signalr", {"id": token}, headers={"Accept": "text/event-stream"})
    assert not stream.finished
    assert stream.responseHeaders.getRawHeaders(b"content-type") == [b"text/event-stream"]
    assert stream.responseHeaders.getRawHeaders(b"x-accel-buffering") == [b"no"]
    assert stream.written[0] == b":\r\n"
    server.request(b"POST", b"/signalr", {"id": token}, HANDSHAKE)
    assert stream.written[1] == b"data: {}\x1e\r\n\r\n"
    # A second event stream on the same connection is a conflict.
    again = server.request(b"GET", b"/signalr", {"id": token}, headers={"Accept": "text/event-stream"})
    assert again.responseCode == 409
    # POSTs keep working: a ping, then an invocation.
    server.request(b"POST", b"/signalr", {"id": token}, b'{"type":6}\x1e{"type":1,"invocationId":"1",'
                   b'"target":"GetUsers","arguments":["general"]}\x1e')
    assert stream.written[-1] == b'data: {"type":3,"invocationId":"1","result":["ada"]}\x1e\r\n\r\n'
    # The client goes away: everything is freed.
    stream.processingFailed(Exception("connection lost"))
    assert not server.hub.sessions and token not in server.manager.connections


def test_server_pings_over_server_sent_events(server):
    token = server.negotiate()["connectionToken"]
    stream = server.request(b"GET", b"/signalr", {"id": token}, headers={"Accept": "text/event-stream"})
    server.request(b"POST", b"/signalr", {"id": token}, HANDSHAKE)
    server.clock.advance(15)
    assert stream.written[-1] == b'data: {"type":6}\x1e\r\n\r\n'


def test_websocket_post_and_routing_errors(server):
    assert server.request(b"GET", b"/signalr").responseCode == 400
    assert server.request(b"PATCH", b"/signalr").responseCode == 405
    assert server.request(b"GET", b"/signalr/negotiate").responseCode == 405
    token = server.negotiate()["connectionToken"]
    server.manager.connections[token].transport_name = "WebSockets"
    assert server.request(b"POST", b"/signalr", {"id": token}, b"x").responseCode == 405
    assert server.request(b"DELETE", b"/signalr", {"id": token}).responseCode == 400
    sse = server.request(b"GET", b"/signalr", {"id": token}, headers={"Accept": "text/event-stream"})
    assert sse.responseCode == 400


def test_stopping_the_site_tells_clients_to_come_back(server):
    token = long_poll_connection(server, user="ada")
    server.site.stopFactory()
    last = server.request(b"GET", b"/signalr", {"id": token})
    assert messages(last)[0]["allowReconnect"] is True


def test_negotiate_is_bounded_by_max_connections():
    server = Server(max_connections=2)
    assert "connectionToken" in server.negotiate()
    assert "connectionToken" in server.negotiate()
    assert server.negotiate()["error"].startswith("server full")
    server.clock.advance(15)  # the two never connected: they expire
    assert "connectionToken" in server.negotiate()


def test_negotiate_refused_once_shutdown_begins(server):
    server.hub.closing = True
    assert server.negotiate()["error"] == "server shutting down, try again shortly"
    assert not server.manager.connections


def test_connection_posting_without_any_transport_expires():
    """negotiate, then POST the handshake and a hub call without ever opening a transport."""
    server = Server(max_connections=2)
    tokens = [server.negotiate(user=f"u{i}")["connectionToken"] for i in range(2)]
    for token in tokens:
        server.request(b"POST", b"/signalr", {"id": token}, HANDSHAKE)
        leave = p.JsonCodec().encode(p.invocation("LeaveRoom", ["general"], "1"))
        assert server.request(b"POST", b"/signalr", {"id": token}, leave).responseCode in (None, 200)
    assert len(server.hub.sessions) == 2  # the hub is full
    assert server.negotiate()["error"].startswith("server full")
    server.clock.advance(14)
    assert len(server.hub.sessions) == 2
    server.clock.advance(1)
    assert not server.hub.sessions and not server.manager.connections
    for token in tokens:
        assert server.request(b"POST", b"/signalr", {"id": token}, b'{"type":6}\x1e').responseCode == 404
    assert "connectionToken" in server.negotiate()


# -- POST bodies ----------------------------------------------------------------------


def sse_connection(server, **query):
    token = server.negotiate(**query)["connectionToken"]
    stream = server.request(b"GET", b"/signalr", {"id": token}, headers={"Accept": "text/event-stream"})
    server.request(b"POST", b"/signalr", {"id": token}, HANDSHAKE)
    assert stream.written[-1] == b"data: {}\x1e\r\n\r\n"
    del stream.written[:]
    return token, stream


def sse_messages(stream) -> list[dict]:
    codec = p.JsonCodec()
    out = []
    for chunk in stream.written:
        for line in chunk.split(b"\r\n"):
            if line.startswith(b"data: "):
                out.extend(codec.feed(line[6:]))
    return out


def test_oversized_post_is_refused_with_413_and_the_connection_lives(server):
    token, stream = sse_connection(server, user="ada")
    limit = server.site.body_limit
    big = b'{"type":6}\x1e' * (limit // 11 + 1)
    refused = server.request(b"POST", b"/signalr", {"id": token}, big)
    assert refused.responseCode == 413
    assert body(refused) == f"Request body too large: the limit is {limit} bytes".encode()
    # A Content-Length over the limit is refused before the body is looked at.
    declared = server.request(b"POST", b"/signalr", {"id": token}, b"", headers={"Content-Length": str(limit + 1)})
    assert declared.responseCode == 413
    assert stream.written == []  # nothing of either was handled
    call = p.JsonCodec().encode(p.invocation("GetUsers", ["general"], "1"))
    assert server.request(b"POST", b"/signalr", {"id": token}, call).responseCode in (None, 200)
    assert sse_messages(stream) == [{"type": p.COMPLETION, "invocationId": "1", "result": ["ada"]}]


def test_negotiate_with_a_body_is_refused(server):
    refused = server.request(b"POST", b"/signalr/negotiate", {"negotiateVersion": "1"}, b"x" * 65536)
    assert refused.responseCode == 413
    assert b"too large" in body(refused)
    assert not server.manager.connections


def test_a_large_post_is_handled_across_reactor_turns_in_order(server):
    token, stream = sse_connection(server, user="ada")
    codec = p.JsonCodec()
    calls = b"".join(codec.encode(p.invocation("GetUsers", ["general"], str(i))) for i in range(5000))
    first = server.request(b"POST", b"/signalr", {"id": token}, calls)
    done_at_once = len(sse_messages(stream))
    assert 0 < done_at_once < 5000 and not first.finished  # the reactor was not held for all of it
    # A second POST waits for the first: records stay in order.
    second = server.request(b"POST", b"/signalr", {"id": token}, codec.encode(p.invocation("GetUsers", ["x"], "last")))
    assert not second.finished
    turns = 0
    while not second.finished:
        server.clock.advance(0)
        turns += 1
        assert turns < 1000
    assert first.finished and first.responseCode in (None, 200) and body(first) == b""
    ids = [m["invocationId"] for m in sse_messages(stream)]
    assert ids == [str(i) for i in range(5000)] + ["last"]


def test_posts_waiting_on_one_connection_are_bounded(server):
    token, stream = sse_connection(server, user="ada")
    pings = b'{"type":6}\x1e' * 10000
    waiting = [server.request(b"POST", b"/signalr", {"id": token}, pings) for _ in range(5)]
    assert not any(r.finished for r in waiting)
    refused = server.request(b"POST", b"/signalr", {"id": token}, b'{"type":6}\x1e')
    assert refused.responseCode == 429 and b"Too many POST requests" in body(refused)
    while not waiting[-1].finished:
        server.clock.advance(0)
    assert all(r.finished and r.responseCode in (None, 200) for r in waiting)
    assert not server.manager.inboxes
    assert server.request(b"POST", b"/signalr", {"id": token}, b'{"type":6}\x1e').responseCode in (None, 200)


# -- slow clients -----------------------------------------------------------------------


def slow_closes(server) -> float:
    registry = server.hub.metrics.registry
    return registry.get_sample_value("chatd_sessions_closed_slow_total", {"protocol": "signalr"}) or 0


def test_event_stream_that_cannot_keep_up_is_closed_and_others_carry_on():
    server = Server(write_limit=4096)
    _, good = sse_connection(server, user="good")
    _, slow = sse_connection(server, user="slow")
    slow.producer.pauseProducing()  # what twisted.web does when the socket's buffer is full
    for i in range(100):
        server.hub.publish("general", "eve", f"message {i:03d} " + "x" * 100, "websocket")
        if slow.finished:
            break
    assert slow.finished and i < 99
    assert [s.user for s in server.hub.sessions.values()] == ["good"]
    assert slow_closes(server) == 1
    server.hub.publish("general", "eve", "after", "websocket")
    received = [m["arguments"][1] for m in sse_messages(good) if m.get("target") == "ReceiveMessage"]
    assert received[-1] == "after" and len(received) == i + 2
    assert not good.finished


def test_long_polling_client_that_does_not_poll_is_closed_and_others_carry_on():
    server = Server(write_limit=4096)
    _, good = sse_connection(server, user="good")
    token = long_poll_connection(server, user="slow")
    for i in range(100):
        server.hub.publish("general", "eve", f"message {i:03d} " + "x" * 100, "websocket")
        if len(server.hub.sessions) == 1:
            break
    assert i < 99 and [s.user for s in server.hub.sessions.values()] == ["good"]
    assert slow_closes(server) == 1
    # The client's next poll is told why, the one after that to stop.
    (close,) = messages(server.request(b"GET", b"/signalr", {"id": token}))
    assert close == {"type": p.CLOSE, "error": "too slow: more than 4096 bytes not polled"}
    assert server.request(b"GET", b"/signalr", {"id": token}).responseCode == 204
    assert token not in server.manager.connections
    server.hub.publish("general", "eve", "after", "websocket")
    assert sse_messages(good)[-1]["arguments"][1] == "after" and not good.finished
