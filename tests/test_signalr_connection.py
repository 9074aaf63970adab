"""The SignalR connection core and chat hub over a fake transport and ``task.Clock``."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from chatd.hub import Hub
from chatd.signalr import protocol as p
from chatd.signalr.chat import ChatHub
from chatd.signalr.connection import CLOSED, DETACHED, OPEN, HubConnection, Options

JSON = p.JsonCodec()


class FakeTransport:
    name = "WebSockets"
    supports_binary = True
    inherent_keep_alive = False
    supports_reconnect = True

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes, binary: bool) -> None:
        assert not self.closed
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def messages(self) -> list[dict]:
        """What was written after the handshake response, decoded."""
        codec = p.JsonCodec()
        out = []
        for record in self.written:
            if record in (b"{}\x1e",) or record.startswith(b'{"error"'):
                continue
            out.extend(codec.feed(record))
        return out

    def take(self) -> list[dict]:
        messages = self.messages()
        self.written.clear()
        return messages


class SSE(FakeTransport):
    name = "ServerSentEvents"
    supports_binary = False
    supports_reconnect = False


class LongPoll(FakeTransport):
    name = "LongPolling"
    inherent_keep_alive = True
    supports_reconnect = False


def record(message: dict) -> bytes:
    return JSON.encode(message)


HANDSHAKE = b'{"protocol":"json","version":1}\x1e'
HANDSHAKE_V2 = b'{"protocol":"json","version":2}\x1e'


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def hub(clock):
    return Hub(clock)


def open_connection(clock, hub, transport=None, handshake=HANDSHAKE, user="ada", **kw):
    closed = []
    conn = HubConnection(
        clock, lambda c: ChatHub(hub, c), Options(**kw.pop("options", {})), connection_id="c1",
        on_closed=closed.append, user=user, **kw,
    )
    transport = transport or FakeTransport()
    conn.attach(transport)
    conn.data_received(handshake)
    return conn, transport, closed


def invoke(conn, target, *args, invocation_id="1"):
    conn.data_received(record(p.invocation(target, list(args), invocation_id)))


# -- handshake ---------------------------------------------------------------------


def test_handshake_success_then_messages_in_the_same_chunk(clock, hub):
    conn, t, _ = open_connection(
        clock, hub, handshake=HANDSHAKE + record(p.invocation("GetUsers", ["general"], "1"))
    )
    assert t.written[0] == b"{}\x1e"
    assert conn.state == OPEN
    assert t.messages() == [{"type": 3, "invocationId": "1", "result": ["ada"]}]


def test_handshake_error_for_unknown_protocol(clock, hub):
    conn, t, closed = open_connection(clock, hub, handshake=b'{"protocol":"xml","version":1}\x1e')
    assert t.written == [b'{"error":"The protocol \'xml\' is not supported."}\x1e']
    assert t.closed and conn.state == CLOSED and closed == [conn]
    assert not hub.sessions


def test_messagepack_over_server_sent_events_is_refused(clock, hub):
    conn, t, _ = open_connection(clock, hub, SSE(), handshake=b'{"protocol":"messagepack","version":1}\x1e')
    assert b"does not support 'Binary'" in t.written[0]
    assert t.closed and not hub.sessions


def test_handshake_timeout(clock, hub):
    conn = HubConnection(clock, lambda c: ChatHub(hub, c), Options(handshake_timeout=15))
    t = FakeTransport()
    conn.attach(t)
    conn.data_received(b'{"protocol":')
    clock.advance(14.9)
    assert conn.state != CLOSED
    clock.advance(0.2)
    assert t.written == [b'{"error":"Handshake was canceled."}\x1e']
    assert t.closed and conn.state == CLOSED


def test_no_user_query_joins_as_a_guest(clock, hub):
    conn, t, _ = open_connection(clock, hub, user=None)
    assert hub.members("general") == [f"guest-{next(iter(hub.sessions.values())).id}"]


def test_bad_user_query_fails_the_handshake(clock, hub):
    """The chat hub refuses the user (ChatError from the dispatcher factory): a handshake error, nothing kept."""
    conn, t, closed = open_connection(clock, hub, user="no spaces\nor newlines")
    (response,) = t.written
    assert response.startswith(b'{"error":"invalid user name') and response.endswith(b"\x1e")
    assert t.closed and conn.state == CLOSED and closed == [conn]
    assert conn.dispatcher is None and not hub.sessions and hub.members("general") == []
    assert clock.getDelayedCalls() == []


def test_full_hub_fails_the_handshake(clock):
    hub = Hub(clock, max_connections=1)
    open_connection(clock, hub, user="ada")
    conn, t, closed = open_connection(clock, hub, user="bob")
    assert t.written == [b'{"error":"server full: 1 connections open, try again later"}\x1e']
    assert t.closed and closed == [conn] and hub.members("general") == ["ada"]


def test_handshake_during_shutdown_is_refused(clock, hub):
    hub.closing = True
    conn, t, closed = open_connection(clock, hub)
    assert t.written == [b'{"error":"server shutting down, try again shortly"}\x1e']
    assert t.closed and closed == [conn] and not hub.sessions


# -- keep-alive and timeouts -----------------------------------------------------------


def test_server_pings_when_idle_and_not_while_busy(clock, hub):
    conn, t, _ = open_connection(clock, hub, options={"keep_alive": 15, "client_timeout": 30})
    t.take()
    clock.advance(10)
    invoke(conn, "GetUsers", "general")  # a reply is sent: the idle clock restarts
    assert [m["type"] for m in t.take()] == [p.COMPLETION]
    clock.advance(14)
    assert t.take() == []
    clock.advance(1.5)
    assert t.take() == [{"type": p.PING}]
    conn.data_received(record({"type": p.PING}))
    clock.advance(15)
    assert t.take() == [{"type": p.PING}]


def test_silent_client_is_closed_after_the_client_timeout(clock, hub):
    conn, t, closed = open_connection(clock, hub, options={"keep_alive": 15, "client_timeout": 30})
    clock.advance(20)
    conn.data_received(record({"type": p.PING}))  # alive at 20
    clock.advance(29)
    assert conn.state == OPEN
    clock.advance(1.5)
    assert conn.state == CLOSED and t.closed and closed == [conn]
    close = t.messages()[-1]
    assert close["type"] == p.CLOSE and "Client timeout" in close["error"]
    assert not hub.sessions


def test_long_polling_has_no_pings_and_no_client_timeout(clock, hub):
    conn, t, _ = open_connection(clock, hub, LongPoll())
    t.take()
    clock.advance(300)
    assert t.take() == [] and conn.state == OPEN


def test_configurable_intervals(clock, hub):
    conn, t, _ = open_connection(clock, hub, options={"keep_alive": 2, "client_timeout": 5})
    t.take()
    clock.advance(2)
    assert t.take() == [{"type": p.PING}]
    clock.advance(3)
    assert conn.state == CLOSED


# -- close -------------------------------------------------------------------------------


def test_client_close_frees_everything(clock, hub):
    conn, t, closed = open_connection(clock, hub)
    assert hub.members("general") == ["ada"]
    conn.data_received(record({"type": p.CLOSE}))
    assert conn.state == CLOSED and t.closed and closed == [conn]
    assert hub.members("general") == [] and not hub.sessions
    assert clock.getDelayedCalls() == []


def test_going_away_allows_reconnect(clock, hub):
    conn, t, _ = open_connection(clock, hub)
    (session,) = hub.sessions.values()
    session.going_away("server shutting down")
    assert t.messages()[-1] == {"type": p.CLOSE, "error": "server shutting down", "allowReconnect": True}
    assert t.closed and not hub.sessions


def test_bad_record_closes_with_an_error(clock, hub):
    conn, t, _ = open_connection(clock, hub)
    conn.data_received(b"{not json\x1e")
    close = t.messages()[-1]
    assert close["type"] == p.CLOSE and "not valid JSON" in close["error"]
    assert "allowReconnect" not in close and conn.state == CLOSED


def test_transport_loss_without_stateful_reconnect_disconnects(clock, hub):
    conn, t, closed = open_connection(clock, hub, stateful_allowed=True)  # v1 handshake: not stateful
    conn.transport_lost(t)
    assert conn.state == CLOSED and not hub.sessions and closed == [conn]


# -- stateful reconnect ---------------------------------------------------------------


def test_stateful_reconnect_replays_unacked_and_dedupes_incoming(clock, hub):
    conn, t, closed = open_connection(clock, hub, handshake=HANDSHAKE_V2, stateful_allowed=True)
    assert conn.stateful
    hub.publish("general", "bob", "one", "websocket")
    hub.publish("general", "bob", "two", "websocket")
    conn.data_received(record({"type": p.ACK, "sequenceId": 1}))  # "one" acknowledged
    # The client's first invocation (sequence id 1) is answered.
    invoke(conn, "GetUsers", "general", invocation_id="1")
    t.take()
    conn.data_received(b'{"type":1,"target":')  # cut off by the drop: forgotten
    conn.transport_lost(t)
    assert conn.state == DETACHED and hub.sessions  # still in the room
    hub.publish("general", "bob", "three", "websocket")  # while away

    t2 = FakeTransport()
    conn.attach(t2)
    replay = t2.take()
    assert replay[0] == {"type": p.SEQUENCE, "sequenceId": 2}
    assert [(m["type"], m.get("arguments", [None, None])[1]) for m in replay[1:]] == [
        (p.INVOCATION, "two"),
        (p.COMPLETION, None),
        (p.INVOCATION, "three"),
    ]
    # Until the client's Sequence arrives, its messages are ignored.
    invoke(conn, "GetUsers", "general", invocation_id="9")
    assert t2.take() == []
    # The client resends from 1: invocation 1 is a duplicate, 2 is new.
    conn.data_received(record({"type": p.SEQUENCE, "sequenceId": 1}))
    invoke(conn, "GetUsers", "general", invocation_id="1")
    invoke(conn, "GetUsers", "general", invocation_id="2")
    assert [m.get("invocationId") for m in t2.take()] == ["2"]
    clock.advance(1)
    assert t2.take() == [{"type": p.ACK, "sequenceId": 2}]


def test_stateful_connection_is_dropped_if_no_reconnect_comes(clock, hub):
    conn, t, closed = open_connection(
        clock, hub, handshake=HANDSHAKE_V2, stateful_allowed=True, options={"disconnect_timeout": 15}
    )
    conn.transport_lost(t)
    clock.advance(14)
    assert conn.state == DETACHED
    clock.advance(1)
    assert conn.state == CLOSED and not hub.sessions and closed == [conn]


def test_unacknowledged_bytes_are_bounded(clock, hub):
    conn, t, _ = open_connection(
        clock, hub, handshake=HANDSHAKE_V2, stateful_allowed=True, options={"write_limit": 2000}
    )
    for i in range(40):
        hub.publish("general", "bob", f"message {i:03d} " + "x" * 40, "websocket")
    assert conn.state == CLOSED
    assert "too slow" in t.messages()[-1]["error"]


# -- the chat hub ----------------------------------------------------------------------


def test_guest_is_renamed_by_its_first_message(clock, hub):
    _, watcher, _ = open_connection(clock, hub, user="bob")
    conn, t, _ = open_connection(clock, hub, user=None)
    guest = hub.members("general")[1]
    assert guest.startswith("guest-")
    invoke(conn, "SendMessage", "ada", "hello")
    assert hub.members("general") == ["bob", "ada"]
    targets = [(m.get("target"), m.get("arguments")) for m in watcher.take() if m["type"] == p.INVOCATION]
    assert targets[-4:] == [
        ("UserJoined", [guest, "general"]),
        ("UserLeft", [guest, "general"]),
        ("UserJoined", ["ada", "general"]),
        ("ReceiveMessage", ["ada", "hello", "general"]),
    ]
    # Now the name is fixed.
    invoke(conn, "SendMessage", "eve", "hello", invocation_id="2")
    assert "fixed" in t.take()[-1]["error"]


def test_errors_are_completions_and_the_connection_lives(clock, hub):
    conn, t, _ = open_connection(clock, hub)
    t.take()
    invoke(conn, "nope", invocation_id="1")
    invoke(conn, "SendToRoom", "r", "ada", invocation_id="2")
    invoke(conn, "SendToRoom", "r", "ada", 5, invocation_id="3")
    invoke(conn, "GetHistory", "general", "ten", invocation_id="4")
    invoke(conn, "StreamRoom", "r", invocation_id="5")
    conn.data_received(record({"type": p.STREAM_INVOCATION, "invocationId": "6", "target": "GetUsers",
                               "arguments": ["r"]}))
    invoke(conn, "sendmessage", "ada", "case-insensitive", invocation_id="7")
    replies = {m["invocationId"]: m.get("error") for m in t.take() if m["type"] == p.COMPLETION}
    assert replies["1"] == "Unknown hub method 'nope'"
    assert replies["2"] == "Invocation provides 2 argument(s) but target expects 3 to 4."
    assert replies["3"] == "message must be a string"
    assert replies["4"] == "limit must be an integer"
    assert "non-streaming invocation" in replies["5"]
    assert "streaming invocation" in replies["6"]
    assert replies["7"] is None
    assert conn.state == OPEN


def test_non_blocking_invocation_gets_no_reply(clock, hub):
    conn, t, _ = open_connection(clock, hub)
    t.take()
    conn.data_received(record(p.invocation("SendMessage", ["ada", "fire and forget"])))
    conn.data_received(record(p.invocation("Nope", [])))
    assert [m.get("target") for m in t.take()] == ["ReceiveMessage"]


def test_stream_room_items_cancel_and_leave(clock, hub):
    conn, t, _ = open_connection(clock, hub)
    conn.data_received(record({"type": p.STREAM_INVOCATION, "invocationId": "s", "target": "StreamRoom",
                               "arguments": ["news"]}))
    assert hub.members("news") == ["ada"]
    hub.publish("news", "bob", "flash", "grpc")
    t.take()
    hub.publish("news", "bob", "more", "grpc")
    items = [m for m in t.take() if m["type"] == p.STREAM_ITEM]
    assert [(i["invocationId"], i["item"]["message"]) for i in items] == [("s", "more")]
    conn.data_received(record({"type": p.CANCEL_INVOCATION, "invocationId": "s"}))
    assert t.take()[0] == {"type": p.COMPLETION, "invocationId": "s"}
    assert hub.members("news") == []  # the stream joined it, the stream left it


def test_event_encoded_once_per_protocol(clock, hub):
    calls = []
    import chatd.signalr.chat as chat

    for _ in range(3):
        open_connection(clock, hub)
    original = chat._EVENT_ENCODERS["json"]
    chat._EVENT_ENCODERS["json"] = lambda e: calls.append(e) or original(e)
    try:
        hub.publish("general", "bob", "to all three", "websocket")
    finally:
        chat._EVENT_ENCODERS["json"] = original
    assert len(calls) == 1


def test_stateful_reconnect_is_for_websockets_only(clock, hub):
    conn, t, closed = open_connection(clock, hub, SSE(), handshake=HANDSHAKE_V2, stateful_allowed=True)
    assert conn.state == OPEN and not conn.stateful
    conn.transport_lost(t)
    assert conn.state == CLOSED and not hub.sessions


def test_a_failing_hub_method_answers_an_error_and_the_connection_lives(clock, hub, monkeypatch):
    conn, t, _ = open_connection(clock, hub)
    t.take()

    def broken(room):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(hub, "members", broken)
    invoke(conn, "GetUsers", "general")
    assert t.take() == [{
        "type": p.COMPLETION,
        "invocationId": "1",
        "error": "An unexpected error occurred invoking 'GetUsers' on the server.",
    }]
    assert conn.state == OPEN


# -- connections without a transport ------------------------------------------------


def bare_connection(clock, hub, user="ada", **options):
    """A negotiated connection that no transport has reached yet (records come by POST)."""
    closed = []
    conn = HubConnection(
        clock, lambda c: ChatHub(hub, c), Options(**options), connection_id="c1",
        on_closed=closed.append, user=user,
    )
    return conn, closed


def test_handshake_without_a_transport_is_dropped_after_the_disconnect_timeout(clock, hub):
    conn, closed = bare_connection(clock, hub, disconnect_timeout=15)
    conn.data_received(HANDSHAKE + record(p.invocation("LeaveRoom", ["general"])))
    assert conn.state == OPEN and hub.sessions
    clock.advance(14.9)
    assert conn.state == OPEN
    clock.advance(0.2)
    assert conn.state == CLOSED and closed == [conn] and not hub.sessions
    assert clock.getDelayedCalls() == []


def test_silent_connection_without_a_transport_goes_before_a_long_handshake_timeout(clock, hub):
    conn, closed = bare_connection(clock, hub, handshake_timeout=60, disconnect_timeout=15)
    clock.advance(15)
    assert conn.state == CLOSED and closed == [conn]
    assert clock.getDelayedCalls() == []


def test_a_transport_attached_in_time_keeps_the_connection(clock, hub):
    conn, closed = bare_connection(clock, hub, disconnect_timeout=15)
    conn.data_received(HANDSHAKE)
    clock.advance(10)
    t = FakeTransport()
    conn.attach(t)
    clock.advance(10)
    conn.data_received(record({"type": p.PING}))
    clock.advance(10)
    assert conn.state == OPEN and closed == []
    # The transport ends: a non-stateful connection ends with it.
    conn.transport_lost(t)
    assert conn.state == CLOSED and not hub.sessions


# -- open streams are bounded --------------------------------------------------------


def stream_room(conn, invocation_id, room="news"):
    conn.data_received(record({"type": p.STREAM_INVOCATION, "invocationId": invocation_id, "target": "StreamRoom",
                               "arguments": [room]}))


def upload(conn, invocation_id, stream_id, room="news"):
    conn.data_received(record({"type": p.INVOCATION, "invocationId": invocation_id, "target": "UploadMessages",
                               "arguments": [room, "ada"], "streamIds": [stream_id]}))


def test_a_second_stream_room_with_an_id_in_use_is_refused(clock, hub):
    conn, t, _ = open_connection(clock, hub)
    stream_room(conn, "s", "news")
    t.take()
    stream_room(conn, "s", "sport")
    assert t.take() == [{"type": p.COMPLETION, "invocationId": "s", "error": "Invocation ID 's' is already in use."}]
    assert conn.dispatcher.streams == {"s": "news"} and "sport" not in conn.dispatcher.session.rooms
    hub.publish("news", "bob", "still streaming", "grpc")
    assert [m["invocationId"] for m in t.take() if m["type"] == p.STREAM_ITEM] == ["s"]


def test_a_second_upload_with_a_stream_id_in_use_is_refused(clock, hub):
    conn, t, _ = open_connection(clock, hub)
    upload(conn, "u1", "1")
    t.take()
    upload(conn, "u2", "1")
    assert t.take() == [{"type": p.COMPLETION, "invocationId": "u2", "error": "Stream ID '1' is already in use."}]
    conn.data_received(record({"type": p.STREAM_ITEM, "invocationId": "1", "item": "hello"}))
    conn.data_received(record({"type": p.COMPLETION, "invocationId": "1"}))
    assert t.take()[-1] == {"type": p.COMPLETION, "invocationId": "u1", "result": 1}


def test_open_streams_and_uploads_are_capped_per_connection(clock, hub):
    conn, t, _ = open_connection(clock, hub)
    for i in range(100):
        stream_room(conn, f"s{i}")
        upload(conn, f"u{i}", f"{i}")
    t.take()
    stream_room(conn, "s100")
    upload(conn, "u100", "100")
    assert t.take() == [
        {"type": p.COMPLETION, "invocationId": "s100", "error": "Too many open streams: at most 100 per connection."},
        {"type": p.COMPLETION, "invocationId": "u100", "error": "Too many open uploads: at most 100 per connection."},
    ]
    assert len(conn.dispatcher.streams) == 100 and len(conn.dispatcher._uploads) == 100
    # Ending one makes room for another.
    conn.data_received(record({"type": p.CANCEL_INVOCATION, "invocationId": "s0"}))
    conn.data_received(record({"type": p.COMPLETION, "invocationId": "0"}))
    t.take()
    stream_room(conn, "s100")
    upload(conn, "u100", "100")
    assert t.take() == [] and conn.state == OPEN


# -- client text in logs ---------------------------------------------------------------


@pytest.fixture
def log_lines():
    """Every formatted log line of chatd.signalr while the test runs."""
    from twisted.logger import formatEvent, globalLogPublisher

    lines: list[str] = []

    def observe(event):
        if event.get("log_namespace", "").startswith("chatd.signalr"):
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


FORGED = "bye\nchatd.hub info: admin logged in\x1b[2J"


def assert_one_line_each(lines: list[str], escaped: str) -> None:
    assert any(escaped in line for line in lines), lines
    assert not any(c in line for line in lines for c in "\n\r\x1b"), lines


def test_client_close_error_is_logged_escaped(clock, hub, log_lines):
    conn, t, _ = open_connection(clock, hub)
    conn.data_received(record({"type": p.CLOSE, "error": FORGED}))
    assert conn.state == CLOSED
    assert_one_line_each(log_lines, "bye\\nchatd.hub info: admin logged in\\x1b[2J")


def test_client_method_names_are_logged_escaped(clock, hub, log_lines):
    conn, t, _ = open_connection(clock, hub)
    invoke(conn, FORGED)
    assert t.take()[-1]["error"] == f"Unknown hub method '{FORGED}'"  # the client gets its own text back
    assert_one_line_each(log_lines, "bye\\nchatd.hub")


def test_unexpected_failures_log_the_method_name_escaped(clock, hub, log_lines, monkeypatch):
    import chatd.signalr.chat as chat

    conn, t, _ = open_connection(clock, hub)

    def broken(self, room):
        raise RuntimeError("disk on fire")

    monkeypatch.setitem(chat._METHODS, FORGED.lower(), chat._Method(broken, 1, 1))
    invoke(conn, FORGED, "general")
    assert "An unexpected error occurred" in t.take()[-1]["error"]
    assert_one_line_each(log_lines, "bye\\nchatd.hub")


def test_handshake_errors_are_logged_escaped(clock, hub, log_lines):
    handshake = b'{"protocol":"' + FORGED.replace("\n", "\\n").replace("\x1b", "\\u001b").encode() + b'","version":1}\x1e'
    conn, t, _ = open_connection(clock, hub, handshake=handshake)
    assert conn.state == CLOSED
    assert_one_line_each(log_lines, "bye\\nchatd.hub")


# -- slow clients ---------------------------------------------------------------------


def slow_closes(hub) -> float:
    return hub.metrics.registry.get_sample_value("chatd_sessions_closed_slow_total", {"protocol": "signalr"}) or 0


def test_detached_connection_is_closed_past_the_write_limit_and_others_carry_on(clock, hub):
    watcher, wt, _ = open_connection(clock, hub, user="bob")
    conn, t, closed = open_connection(
        clock, hub, handshake=HANDSHAKE_V2, stateful_allowed=True, options={"write_limit": 2000}
    )
    conn.transport_lost(t)
    assert conn.state == DETACHED
    for i in range(40):
        hub.publish("general", "eve", f"message {i:03d} " + "x" * 40, "websocket")
        if conn.state == CLOSED:
            break
    assert conn.state == CLOSED and closed == [conn] and i < 39
    assert conn.close_error == "too slow: more than 2000 bytes not acknowledged"
    assert slow_closes(hub) == 1
    assert hub.members("general") == ["bob"]
    wt.take()
    hub.publish("general", "eve", "after", "websocket")
    assert [m["arguments"][1] for m in wt.take() if m.get("target") == "ReceiveMessage"] == ["after"]
    assert watcher.state == OPEN


def test_pending_messages_without_a_transport_are_bounded(clock, hub):
    conn, closed = bare_connection(clock, hub, write_limit=2000)
    conn.data_received(HANDSHAKE)
    for i in range(40):
        hub.publish("general", "eve", f"message {i:03d} " + "x" * 40, "websocket")
    assert conn.state == CLOSED and closed == [conn] and not hub.sessions
    assert slow_closes(hub) == 1
