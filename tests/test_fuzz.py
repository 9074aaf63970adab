"""Property-based fuzzing of every parser and entry point, without sockets.

Each test feeds hypothesis-made input to one entry point (the WebSocket
``dispatch``, the SignalR codecs, handshake reader, negotiate resource and hub
methods, the gRPC servicer) and checks the contract DESIGN.md states for bad
input: no unhandled exception reaches the log (no ``log.failure``, nothing
critical), the offender gets its own protocol's error, a refusal changes
nothing, nothing leaks (``hub.sessions`` and ``hub.rooms()`` come back to what
they were once the offender is gone), and the other sessions are untouched.

Example counts are kept moderate (the whole file runs in well under a minute
on two cores); raise them locally with ``--hypothesis-seed``/profiles when
hunting.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import msgpack
import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.web.test.requesthelper import DummyRequest

from chatd.events import Event
from chatd.grpc.bridge import ChatServicer, GrpcSession
from chatd.grpc.generated import chat_pb2 as pb
from chatd.http import OriginPolicy
from chatd.hub import Hub, Session
from chatd.signalr import protocol as p
from chatd.signalr.chat import ChatHub
from chatd.signalr.connection import CLOSED, OPEN, HubConnection, Options
from chatd.signalr.transports import ConnectionManager, NegotiateResource
from chatd.validate import Limits
from tests.test_grpc_bridge import Aborted, FakeContext, ThreadedFakeReactor, in_worker
from tests.test_signalr_connection import FakeTransport
from tests.test_websocket import _Dispatch, _json

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- shared helpers ------------------------------------------------------------------


@contextmanager
def no_unhandled_errors() -> Iterator[list[dict]]:
    """Fail if any log event in the block carries a failure or is critical (any namespace)."""
    bad: list[dict] = []

    def observe(event: dict) -> None:
        if "log_failure" in event or event.get("log_level") is LogLevel.critical:
            bad.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield bad
    finally:
        globalLogPublisher.removeObserver(observe)
    assert not bad, [(e.get("log_format"), e.get("log_failure")) for e in bad]


def hub_state(hub: Hub) -> tuple:
    """What a refused request must not change, and what must come back once a client is gone."""
    return (sorted(hub.sessions), hub.rooms(), {r: hub.members(r) for r in hub.rooms()}, hub.messages_total)


class Watcher(Session):
    """Another member of the rooms: its view must only change by real messages and presence."""

    protocol = "websocket"

    def __init__(self) -> None:
        super().__init__("watcher")
        self.events: list[Event] = []

    def deliver(self, event: Event) -> None:
        self.events.append(event)

    def close(self, reason: str) -> None:
        raise AssertionError(f"the watcher was closed: {reason}")


def watching(hub: Hub, *rooms: str) -> Watcher:
    watcher = Watcher()
    hub.connect(watcher)
    hub.identify(watcher, "watcher")
    for room in rooms:
        hub.join(watcher, room)
    return watcher


_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40)
_names = st.sampled_from(["r", "lobby", "general", "ada", "bob", "", " ", "bad room", "x" * 65, "é"]) | _text


# -- WebSocket: since, client_id and the Deferred replies of chat messages -------------------

_client_ids = st.sampled_from(["c1", "c2", "", None, "x" * 64, "x" * 65, "tab\there"]) | _json
_ws_requests = st.fixed_dictionaries(
    {"type": st.sampled_from(["join", "message", None])},
    optional={
        "room": st.sampled_from(["r", "s"]) | _json,
        "user": st.sampled_from(["alice"]) | _json,
        "message": st.sampled_from(["hi", "again"]) | _json,
        "since": st.sampled_from([0, 1, 2, 5, 2**63 - 1, 2**63, -1, 1.0, True, "1"]) | _json,
        "client_id": _client_ids,
        "ref": st.sampled_from(["a", 1]) | _json,
    },
).map(lambda d: {k: v for k, v in d.items() if not (k == "type" and v is None)})


@FUZZ
@given(requests=st.lists(_ws_requests, min_size=1, max_size=6), identified=st.booleans())
def test_websocket_since_and_client_id_fuzz_keeps_one_reply_per_frame_and_stores_each_client_id_once(
    requests, identified
) -> None:
    d = _Dispatch(identified)
    acked: dict[tuple[str, str], tuple[str, int]] = {}
    with no_unhandled_errors():
        for request in requests:
            before = d.state()
            d.out.replies.clear()
            d.out.frames.clear()
            d.seen.frames.clear()
            d.send(orjson.dumps(request))
            assert d.session.id in d.hub.sessions, "the connection must live"
            replies = d.out.replies
            assert len(replies) <= 1, replies
            reply = replies[0] if replies else None
            if reply is not None and reply["type"] == "error":
                assert isinstance(reply["error"], str) and reply["error"]
                assert d.state() == before, ("a refused request changed state", request, reply)
                assert d.seen.frames == [], "a refused request reached the room"
                continue
            if reply is not None and reply["type"] == "sent":
                assert "ref" in request or request.get("client_id"), reply
                if request.get("client_id"):
                    key = (reply["room"], request["client_id"])
                    first = acked.setdefault(key, (reply["id"], reply["seq"]))
                    assert (reply["id"], reply["seq"]) == first, "a retry must answer the original"
            if reply is not None and reply["type"] == "joined" and request.get("since") is not None:
                # A resume replays exactly the kept messages after ``since``, in order, before the
                # reply; a ``since`` beyond the room's last seq (a reset history) gets all kept, flagged.
                replayed = [f["seq"] for f in d.out.frames if f["type"] == "message"]
                history = d.hub.store.recent(reply["room"], d.hub.limits.history_limit)
                beyond = request["since"] > d.hub.store.last_seq(reply["room"])
                kept = [m.seq for m in history if m.seq > request["since"] or beyond]
                assert replayed == kept, (replayed, kept)
                if beyond and request["since"] > 0:
                    assert reply.get("truncated") is True, reply
    stored = [m for room in ("r", "s") for m in d.hub.store.recent(room, d.hub.limits.history_limit)]
    seen_ids = [(m.room, m.client_id) for m in stored if m.client_id]
    assert len(seen_ids) == len(set(seen_ids)), "a client_id was stored twice"
    for room in ("r", "s"):
        seqs = [m.seq for m in d.hub.store.recent(room, d.hub.limits.history_limit)]
        assert seqs == list(range(1, len(seqs) + 1)), "seq must be gap-free"
    # Once gone, the connection leaves nothing behind but the watcher.
    d.hub.disconnect(d.session)
    assert sorted(d.hub.sessions) == [d.watcher.id]
    assert d.hub.rooms() == {"r": 1}


# -- SignalR: codecs, split at every byte boundary, concatenated, truncated, corrupted -------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8,
)
_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | _text | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(_text | st.integers(-5, 5), inner, max_size=3),
    max_leaves=8,
)
_ids = st.text(alphabet="0123456789abc", min_size=1, max_size=4)


def _hub_messages(values: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(
        st.builds(p.invocation, _text.filter(bool), st.lists(values, max_size=4), st.none() | _ids),
        st.builds(
            lambda t, a, i: {"type": p.STREAM_INVOCATION, "target": t, "arguments": a, "invocationId": i},
            _text.filter(bool), st.lists(values, max_size=3), _ids,
        ),
        st.builds(p.stream_item, _ids, values),
        st.builds(p.completion, _ids, values),
        st.builds(lambda i, e: p.completion(i, error=e), _ids, _text.filter(bool)),
        st.builds(lambda i: p.completion(i, void=True), _ids),
        st.builds(lambda i: {"type": p.CANCEL_INVOCATION, "invocationId": i}, _ids),
        st.just(p.PING_MESSAGE),
        st.builds(p.close, st.none() | _text.filter(bool), st.booleans()),
        st.builds(lambda k, s: {"type": k, "sequenceId": s}, st.sampled_from([p.ACK, p.SEQUENCE]), st.integers(0, 2**40)),
    )


_codecs = st.sampled_from([(p.JsonCodec, _hub_messages(_json_values)), (p.MessagePackCodec, _hub_messages(_msgpack_values))])


def _feed(codec_type: type[p.Codec], *chunks: bytes) -> list[dict]:
    codec = codec_type()
    out: list[dict] = []
    for chunk in chunks:
        out.extend(codec.feed(chunk))
    return out


def _same(a: list[dict], b: list[dict]) -> bool:
    # msgpack floats may be NaN, which is never equal to itself: compare encodings.
    return msgpack.packb(a) == msgpack.packb(b)


@FUZZ
@given(data=st.data())
def test_codec_records_decode_the_same_however_they_are_split_and_truncation_yields_a_prefix(data) -> None:
    codec_type, messages = data.draw(_codecs)
    originals = data.draw(st.lists(messages, min_size=1, max_size=4))
    encoder = codec_type()
    records = [encoder.encode(m) for m in originals]
    assume(all(len(r) <= p.DEFAULT_MAX_MESSAGE_SIZE for r in records))
    stream = b"".join(records)
    reference = _feed(codec_type, stream)
    assert len(reference) == len(originals), "concatenated records are each decoded once"
    assert [m["type"] for m in reference] == [m["type"] for m in originals]
    for cut in range(len(stream) + 1):
        assert _same(_feed(codec_type, stream[:cut], stream[cut:]), reference), cut
        # Truncated: only whole records come out, a prefix of the reference.
        head = _feed(codec_type, stream[:cut])
        assert _same(head, reference[: len(head)])
        whole = sum(1 for end in _record_ends(records) if end <= cut)
        assert len(head) == whole, (cut, len(head), whole)
    assert _same(_feed(codec_type, *(stream[i : i + 1] for i in range(len(stream)))), reference)


def _record_ends(records: list[bytes]) -> Iterator[int]:
    end = 0
    for record in records:
        end += len(record)
        yield end


@FUZZ
@given(data=st.data())
def test_corrupted_records_give_messages_or_a_protocol_error_never_anything_else(data) -> None:
    codec_type, messages = data.draw(_codecs)
    stream = bytearray(b"".join(codec_type().encode(m) for m in data.draw(st.lists(messages, min_size=1, max_size=3))))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(stream) - 1))
        action = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if action == "flip":
            stream[at] ^= data.draw(st.integers(1, 255))
        elif action == "insert":
            stream[at:at] = data.draw(st.binary(min_size=1, max_size=4))
        elif len(stream) > 1:
            del stream[at]
    _decodes_or_refuses(codec_type, bytes(stream))


@FUZZ
@given(codec_type=st.sampled_from([p.JsonCodec, p.MessagePackCodec]), junk=st.binary(max_size=200))
def test_any_bytes_give_messages_or_a_protocol_error(codec_type, junk) -> None:
    _decodes_or_refuses(codec_type, junk)


@FUZZ
@given(
    array=st.lists(st.integers(0, 12) | _msgpack_values, min_size=0, max_size=7),
    first=st.integers(-2, 12),
)
def test_any_messagepack_array_gives_a_valid_message_or_a_protocol_error(array, first) -> None:
    body = msgpack.packb([first, *array], use_bin_type=True)
    _decodes_or_refuses(p.MessagePackCodec, p.varint(len(body)) + body)


def _decodes_or_refuses(codec_type: type[p.Codec], data: bytes) -> None:
    codec = codec_type()
    try:
        messages = codec.feed(data)
    except p.ProtocolError as e:
        assert isinstance(e.reason, str) and e.reason
        return
    for message in messages:
        assert p.check_message(message) is message  # what comes out is valid as it stands


_handshakes = st.one_of(
    st.builds(
        lambda proto, version, extra: orjson.dumps({"protocol": proto, "version": version, **extra}),
        st.sampled_from(["json", "messagepack", "xml", ""]) | _json,
        st.integers(-3, 5) | st.integers(-(2**63), 2**64 - 1) | _json,
        st.dictionaries(st.text(max_size=5), _json, max_size=2),
    ),
    _json.map(orjson.dumps),
    st.binary(max_size=60),
)


@FUZZ
@given(body=_handshakes, tail=st.binary(max_size=20), cut=st.integers(0, 200))
def test_handshake_reader_returns_the_request_or_a_protocol_error_however_split(body, tail, cut) -> None:
    data = body + p.RECORD_SEPARATOR + tail
    cut = min(cut, len(data))

    def read(*chunks: bytes) -> Any:
        reader = p.HandshakeReader()
        try:
            for i, chunk in enumerate(chunks):
                got = reader.feed(chunk)
                if got is not None:
                    # What follows the handshake goes on to the hub protocol's codec.
                    return got[0], got[1] + b"".join(chunks[i + 1 :])
        except p.ProtocolError as e:
            return ("error", e.reason)
        return None

    whole = read(data)
    assert read(data[:cut], data[cut:]) == whole
    if whole is not None and whole[0] != "error":
        request, rest = whole
        assert rest == tail or p.RECORD_SEPARATOR in body
        error = p.check_handshake(request)  # never raises, whatever the values
        assert error is None or isinstance(error, str)


# -- SignalR: negotiate --------------------------------------------------------------------

_query_names = st.sampled_from(
    ["negotiateVersion", "NEGOTIATEVERSION", "user", "User", "useStatefulReconnect", "id", "other"]
)
_query_values = st.sampled_from([b"0", b"1", b"2", b"-1", b"true", b"TRUE", b"ada", b"", b"9" * 5000]) | st.binary(
    max_size=20
)


@FUZZ
@given(
    args=st.dictionaries(_query_names, st.lists(_query_values, min_size=1, max_size=2), max_size=4),
    body=st.binary(max_size=40) | st.just(b"x" * 2000),
    origin=st.none() | st.sampled_from([b"http://127.0.0.1", b"http://evil.example", b"\xff"]),
)
def test_negotiate_answers_json_and_every_connection_it_makes_expires(args, body, origin) -> None:
    clock = Clock()
    hub = Hub(clock)
    hub.startService()
    manager = ConnectionManager(hub, clock, Options())
    resource = NegotiateResource(manager, OriginPolicy())
    request = DummyRequest([b""])
    request.method = b"POST"
    request.args = {name.encode(): values for name, values in args.items()}
    request.content = io.BytesIO(body)
    request.requestHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
    request.requestHeaders.setRawHeaders(b"host", [b"127.0.0.1:8081"])
    if origin is not None:
        request.requestHeaders.setRawHeaders(b"origin", [origin])
    with no_unhandled_errors():
        out = resource.render(request)
    assert isinstance(out, bytes)
    code = request.responseCode or 200
    assert code in (200, 400, 403, 413), code
    if code in (200, 400):
        answer = orjson.loads(out)
        if "connectionId" in answer:
            assert code == 200 and len(manager.connections) == 1
            assert answer["negotiateVersion"] in (0, 1)
        else:
            assert isinstance(answer["error"], str) and manager.connections == {}
    else:
        assert manager.connections == {}
    assert hub.sessions == {}, "negotiate alone must not hold a hub session"
    clock.advance(Options().disconnect_timeout + 1)
    assert manager.connections == {}, "a negotiated connection no transport took must expire"


# -- SignalR: hub invocations with any arguments, JSON and MessagePack ------------------------

_targets = st.sampled_from(
    ["SendMessage", "sendtoroom", "SENDTOROOM", "JoinRoom", "LeaveRoom", "GetHistory", "GetUsers",
     "StreamRoom", "UploadMessages", "Nope"]
)
_arg = st.sampled_from(["r", "lobby", "general", "ada", "bob", "hi", 0, 1, 3, None]) | _json_values
_invocations = st.builds(
    lambda target, args, kind, iid, streams: {
        "type": kind, "target": target, "arguments": args,
        **({"invocationId": iid} if iid is not None or kind == p.STREAM_INVOCATION else {}),
        **({"streamIds": streams} if streams else {}),
    },
    _targets,
    st.lists(_arg, max_size=5),
    st.sampled_from([p.INVOCATION, p.STREAM_INVOCATION]),
    st.none() | _ids,
    st.sampled_from([[], ["s1"], ["s1", "s2"]]),
).map(lambda m: m if m["type"] == p.INVOCATION or m.get("invocationId") else {**m, "invocationId": "9"})
_extras = st.one_of(
    st.builds(p.stream_item, st.sampled_from(["s1", "s2"]), _arg),
    st.builds(lambda i: p.completion(i, void=True), st.sampled_from(["s1", "s2"])),
    st.builds(lambda i: {"type": p.CANCEL_INVOCATION, "invocationId": i}, _ids),
)


@FUZZ
@given(
    protocol=st.sampled_from(["json", "messagepack"]),
    messages=st.lists(_invocations | _extras, min_size=1, max_size=5),
    user=st.sampled_from(["ada", None]),
)
def test_signalr_hub_methods_with_any_arguments_answer_in_protocol_and_leave_nothing_behind(
    protocol, messages, user
) -> None:
    clock = Clock()
    hub = Hub(clock)
    hub.startService()
    watcher = watching(hub, "r", "general")
    baseline = hub_state(hub)
    codec = p.codec(protocol)
    conn = HubConnection(clock, lambda c: ChatHub(hub, c), Options(), connection_id="c", user=user)
    transport = FakeTransport()
    conn.attach(transport)
    with no_unhandled_errors():
        conn.data_received(orjson.dumps({"protocol": protocol, "version": 1}) + p.RECORD_SEPARATOR)
        assert conn.state == OPEN
        for message in messages:
            before = hub_state(hub)
            transport.written.clear()
            watcher.events.clear()
            conn.data_received(codec.encode(message))
            assert conn.state == OPEN, ("a hub method error must not end the connection", message)
            replies = p.codec(protocol).feed(b"".join(transport.written))
            completions = [r for r in replies if r["type"] == p.COMPLETION and r.get("invocationId") == message.get("invocationId")]
            errors = [c for c in completions if "error" in c]
            if errors and message["type"] in (p.INVOCATION, p.STREAM_INVOCATION):
                (error,) = completions
                assert isinstance(error["error"], str) and error["error"]
                assert hub_state(hub) == before, ("a refused invocation changed state", message, error)
                assert watcher.events == [], "a refused invocation reached the room"
            elif message["type"] == p.INVOCATION and "invocationId" in message:
                target = message["target"].lower()
                if target not in ("uploadmessages",):
                    assert len(completions) == 1, ("a call gets exactly one completion", message, replies)
        assert watcher.id in hub.sessions and watcher.rooms == {"r", "general"}
        conn.close()
    assert conn.state == CLOSED and transport.closed
    assert hub_state(hub)[:3] == baseline[:3], "the connection left a session or a room behind"
    assert clock.getDelayedCalls() == [], "the connection left a timer behind"


# -- gRPC: MessageRequest, StreamRequest and Chat events with any field values -------------

_grpc_text = st.sampled_from(["lobby", "r", "ada", "hi", "", " ", "bad room", "x" * 65]) | _text
_uint64 = st.sampled_from([0, 1, 2, 5, 2**63 - 1, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1)


@contextmanager
def _grpc_hub() -> Iterator[tuple[Hub, ThreadedFakeReactor, Watcher]]:
    reactor = ThreadedFakeReactor()
    hub = Hub(reactor, limits=Limits(history_limit=10))
    hub.startService()
    for i in range(3):
        hub.publish("lobby", "bob", f"m{i}", "websocket")
    watcher = watching(hub, "lobby")
    watcher.events.clear()
    try:
        yield hub, reactor, watcher
    finally:
        reactor.stop_pool()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(user=_grpc_text, message=_grpc_text, room=_grpc_text, client_id=_grpc_text)
def test_grpc_send_message_with_any_fields_answers_or_aborts_with_a_status(user, message, room, client_id) -> None:
    with _grpc_hub() as (hub, reactor, watcher):
        servicer = ChatServicer(hub, reactor)
        before = hub_state(hub)
        request = pb.MessageRequest(user=user, message=message, room=room, client_id=client_id)
        with no_unhandled_errors():
            try:
                reply = pb.MessageResponse.FromString(in_worker(reactor, servicer.SendMessage, request, FakeContext()))
            except Aborted as e:
                assert e.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), e.code
                assert e.details
                assert hub_state(hub) == before
                assert watcher.events == []
                return
        assert (reply.user, reply.message, reply.room) == (user, message, room)
        assert reply.seq == hub.store.last_seq(room) == (4 if room == "lobby" else 1)
        assert [e.seq for e in watcher.events] == ([4] if room == "lobby" else [])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(room=_grpc_text, user=_grpc_text, since=st.none() | _uint64)
def test_grpc_stream_request_with_any_fields_streams_or_aborts_and_leaks_no_session(room, user, since) -> None:
    with _grpc_hub() as (hub, reactor, watcher):
        servicer = ChatServicer(hub, reactor, queue_size=10)
        baseline = hub_state(hub)
        request = pb.StreamRequest(room=room, user=user, **({} if since is None else {"since_seq": since}))
        context = FakeContext()
        result: dict[str, Any] = {}

        def worker() -> None:
            try:
                result["items"] = [pb.MessageResponse.FromString(d).seq for d in servicer.StreamMessages(request, context)]
            except Aborted as e:
                result["error"] = e

        with no_unhandled_errors():
            thread = threading.Thread(target=worker, daemon=True)
            thread.start()
            reactor.run_next()  # the join, on the reactor
            joined = [s for s in hub.sessions.values() if isinstance(s, GrpcSession)]
            if joined:
                # The worker registers its end-of-call callback once the join returned.
                _wait_for(lambda: context.callbacks)
            context.end()  # the client cancels
            reactor.run_pending()
            thread.join(10)
            assert not thread.is_alive()
        if "error" in result:
            assert result["error"].code is grpc.StatusCode.INVALID_ARGUMENT and result["error"].details
            assert joined == []
        else:
            assert len(joined) == 1
            # A since beyond the room's last seq (3) means the client's numbering is not this
            # room's (its history was reset): everything kept, flagged truncated.
            beyond = since is not None and since > 3
            expected = [] if since is None or room != "lobby" else [s for s in (1, 2, 3) if s > since or beyond]
            assert result["items"] == expected
            truncated = since is not None and since > (3 if room == "lobby" else 0)
            assert (("chatd-truncated", "true") in context.initial_metadata) == truncated
        assert hub_state(hub) == baseline, "the stream left a session or a room behind"
        assert watcher.id in hub.sessions


_join = st.builds(
    lambda room, user, since: pb.Join(room=room, user=user, **({} if since is None else {"since_seq": since})),
    _grpc_text, _grpc_text, st.none() | _uint64,
)
_chat_events = st.one_of(
    st.builds(lambda j, ref: pb.ChatEvent(join=j, ref=ref), _join, _grpc_text),
    st.builds(lambda room, ref: pb.ChatEvent(leave=pb.Leave(room=room), ref=ref), _grpc_text, _grpc_text),
    st.builds(
        lambda room, text, cid, ref: pb.ChatEvent(send=pb.Send(room=room, message=text, client_id=cid), ref=ref),
        _grpc_text, _grpc_text, st.sampled_from(["", "c1", "c2"]) | _grpc_text, _grpc_text,
    ),
    st.builds(lambda ref: pb.ChatEvent(ref=ref), _grpc_text),
    st.builds(lambda m: pb.ChatEvent(message=pb.MessageResponse(room=m, user=m, message=m)), _grpc_text),
    st.builds(lambda m: pb.ChatEvent(presence=pb.Presence(room=m, user=m, count=3)), _grpc_text),
    st.builds(lambda m: pb.ChatEvent(joined=pb.Joined(room=m, members=[m])), _grpc_text),
    st.builds(lambda m: pb.ChatEvent(left=pb.Left(room=m)), _grpc_text),
    st.builds(lambda m: pb.ChatEvent(error=pb.Error(code=m, reason=m)), _grpc_text),
    st.builds(lambda m, s: pb.ChatEvent(sent=pb.Sent(room=m, seq=s)), _grpc_text, _uint64),
)


def _grpc_state(hub: Hub, session: GrpcSession) -> tuple:
    return (*hub_state(hub), session.user, sorted(session.rooms))


@FUZZ
@given(events=st.lists(_chat_events, min_size=1, max_size=6))
def test_grpc_chat_events_of_any_kind_get_a_reply_or_an_error_event_and_refusals_change_nothing(events) -> None:
    with _grpc_hub() as (hub, reactor, watcher):
        servicer = ChatServicer(hub, reactor, queue_size=100)
        baseline = hub_state(hub)
        session = GrpcSession(hub, reactor, "fuzz", 100, chat=True)
        hub.connect(session)
        with no_unhandled_errors():
            for event in events:
                before = _grpc_state(hub, session)
                watcher.events.clear()
                servicer._chat_event(session, event)  # the reactor side of a Chat call
                # Replays of a resumed join come as message events; replies are the rest.
                replies = [r for r in _take(session) if r.WhichOneof("event") not in ("message", "presence")]
                assert session.id in hub.sessions, "an odd event must not end the call"
                kind = event.WhichOneof("event")
                if kind in ("join", "leave") or kind != "send":
                    assert len(replies) == 1, (event, replies)
                errors = [r for r in replies if r.WhichOneof("event") == "error"]
                for reply in replies:
                    assert reply.ref == event.ref
                if errors:
                    (error,) = replies
                    assert error.error.code == "INVALID_ARGUMENT" and error.error.reason
                    assert _grpc_state(hub, session) == before, ("a refused event changed state", event, error)
                    assert watcher.events == []
            hub.disconnect(session)
        assert hub_state(hub)[:3] == baseline[:3]


def _wait_for(condition: Any, timeout: float = 10) -> None:
    """Poll a condition another thread makes true, bounded."""
    done = threading.Event()
    deadline = 0.0
    while not condition():
        assert deadline < timeout, "condition never became true"
        done.wait(0.005)
        deadline += 0.005


def _take(session: GrpcSession) -> list[pb.ChatEvent]:
    out = []
    while not session._queue.empty():
        item = session._queue.get_nowait()
        assert isinstance(item, bytes), item
        out.append(pb.ChatEvent.FromString(item))
    return out


@pytest.mark.parametrize("since", [2**63, 2**64 - 1])
def test_grpc_chat_join_with_an_out_of_range_since_seq_does_not_name_the_call(since) -> None:
    """A refused Join (since_seq too large) must leave the call unnamed, like every refusal."""
    with _grpc_hub() as (hub, reactor, _):
        servicer = ChatServicer(hub, reactor)
        session = GrpcSession(hub, reactor, "fuzz", 10, chat=True)
        hub.connect(session)
        servicer._chat_event(session, pb.ChatEvent(join=pb.Join(room="lobby", user="ada", since_seq=since)))
        (reply,) = _take(session)
        assert reply.error.reason == "since_seq must be a non-negative integer"
        assert session.user is None
        servicer._chat_event(session, pb.ChatEvent(join=pb.Join(room="lobby", user="bob")))
        (reply,) = [r for r in _take(session) if r.WhichOneof("event") == "joined"]
        assert reply.joined.user == "bob"
