"""The gRPC bridge without sockets: a hub on a Clock and a reactor fake that
holds ``callFromThread`` calls until the test runs them, so the order in
which worker threads and the reactor act is the test's, not the scheduler's.

The test's own thread plays the reactor thread. The hub every test gets is a
:class:`ReactorOnlyHub`: any hub call from another thread (a grpcio worker, a
``Chat`` reader) is refused and recorded, and the test fails at teardown."""

from __future__ import annotations

import asyncio
import functools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health
from twisted.internet.task import Clock
from twisted.python.threadpool import ThreadPool

from chatd.events import Event
from chatd.grpc import bridge
from chatd.grpc.bridge import ChatServicer, GrpcSession
from chatd.grpc.generated import chat_pb2 as pb
from chatd.grpc.service import GrpcService
from chatd.grpc.streams import StreamLimit
from chatd.hub import Hub, Session
from chatd.validate import Limits


class ThreadedFakeReactor(Clock):
    """A Clock whose ``callFromThread`` queues the call until :meth:`run_next`."""

    def __init__(self) -> None:
        super().__init__()
        self._calls: deque[tuple[Any, tuple, dict]] = deque()
        self._cond = threading.Condition()
        self._pool: ThreadPool | None = None

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        with self._cond:
            self._calls.append((f, args, kwargs))
            self._cond.notify_all()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._calls)

    def run_next(self, timeout: float = 10) -> None:
        """Run the oldest queued call, waiting for a worker to queue one."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._calls, timeout):
                raise AssertionError("no call from a thread arrived")
            f, args, kwargs = self._calls.popleft()
        f(*args, **kwargs)

    def run_pending(self) -> None:
        while self.pending:
            self.run_next()

    def run_until(self, finished: Callable[[], bool], timeout: float = 10) -> None:
        """Run queued calls as they arrive until ``finished()`` (checked after each :meth:`wake`)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: self._calls or finished(), deadline - time.monotonic()):
                    raise AssertionError("the worker neither called the reactor nor finished")
                if not self._calls:
                    return
                f, args, kwargs = self._calls.popleft()
            f(*args, **kwargs)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def getThreadPool(self) -> ThreadPool:
        """A real pool, as ``deferToThreadPool`` needs; its results still wait for :meth:`run_next`."""
        if self._pool is None:
            self._pool = ThreadPool(1, 2, "fake-reactor")
            self._pool.start()
        return self._pool

    def stop_pool(self) -> None:
        if self._pool is not None:
            self._pool.stop()


class ReactorOnlyHub:
    """A hub that may be used from the thread that made it (the reactor) only.

    Data read or a method called from any other thread raises and is recorded
    in ``violations`` (an exception may be swallowed by the code under test;
    the record is not). Looking a method up is allowed anywhere, as
    ``callFromThread(hub.disconnect, session)`` must do; calling it is not.
    ``metrics`` is thread-safe by contract, so it is allowed everywhere.
    """

    _THREAD_SAFE = frozenset({"metrics"})

    def __init__(self, hub: Hub) -> None:
        object.__setattr__(self, "_hub", hub)
        object.__setattr__(self, "_owner", threading.current_thread())
        object.__setattr__(self, "violations", [])

    def _check(self, name: str) -> None:
        thread = threading.current_thread()
        if thread is not self._owner:
            self.violations.append((name, thread.name))
            raise AssertionError(f"hub.{name} used on {thread.name}, off the reactor thread")

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._hub, name)
        if name in self._THREAD_SAFE:
            return value
        if callable(value):

            @functools.wraps(value)
            def on_reactor_only(*args: Any, **kwargs: Any) -> Any:
                self._check(name)
                return value(*args, **kwargs)

            return on_reactor_only
        self._check(name)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        self._check(name)
        setattr(self._hub, name, value)


def in_worker(reactor: ThreadedFakeReactor, f: Callable[..., Any], *args: Any) -> Any:
    """``f(*args)`` on a thread of its own, as grpcio runs a handler, while this
    thread serves the reactor calls it makes; returns what ``f`` returned."""
    result: dict[str, Any] = {}

    def worker() -> None:
        try:
            value = f(*args)
            result["value"] = list(value) if isinstance(value, Iterator) else value
        except BaseException as e:  # handed back to the test
            result["error"] = e
        finally:
            result["done"] = True
            reactor.wake()

    threading.Thread(target=worker, name="grpc-worker", daemon=True).start()
    reactor.run_until(lambda: "done" in result)
    if "error" in result:
        raise result["error"]
    return result["value"]


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details


class FakeContext:
    """The parts of ``grpc.ServicerContext`` the bridge uses."""

    def __init__(self) -> None:
        self.callbacks: list[Any] = []
        self.initial_metadata: tuple = ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1234"

    def send_initial_metadata(self, metadata: tuple) -> None:
        self.initial_metadata = metadata

    def add_callback(self, callback: Any) -> bool:
        self.callbacks.append(callback)
        return True

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)

    def end(self) -> None:
        """What grpcio does when the call ends (cancel, disconnect or done)."""
        for callback in self.callbacks:
            callback()


class Recorder(Session):
    protocol = "websocket"

    def __init__(self) -> None:
        super().__init__("test")
        self.events: list[Event] = []

    def deliver(self, event: Event) -> None:
        self.events.append(event)

    def close(self, reason: str) -> None:
        pass


@pytest.fixture
def reactor() -> Iterator[ThreadedFakeReactor]:
    reactor = ThreadedFakeReactor()
    yield reactor
    reactor.stop_pool()


def reactor_only(hub: Hub) -> Iterator[ReactorOnlyHub]:
    checked = ReactorOnlyHub(hub)
    yield checked
    assert checked.violations == [], "the hub was used off the reactor thread"


@pytest.fixture
def hub(reactor: ThreadedFakeReactor) -> Iterator[ReactorOnlyHub]:
    hub = Hub(reactor, limits=Limits(history_limit=10))
    hub.startService()
    yield from reactor_only(hub)


def member(hub: Hub, user: str, room: str = "lobby") -> Recorder:
    session = Recorder()
    hub.connect(session)
    hub.identify(session, user)
    hub.join(session, room)
    return session


def stream_session(hub: Hub, reactor: Any, user: str, limit: int = 5, chat: bool = False) -> GrpcSession:
    session = GrpcSession(hub, reactor, "peer", limit, chat)
    hub.connect(session)
    hub.identify(session, user)
    hub.join(session, "lobby")
    return session


@pytest.fixture(params=["threaded", "aio"])
def new_stream(request: Any) -> Iterator[Callable[..., GrpcSession]]:
    """``stream_session`` for each server: a queue drained by a worker thread, or by a coroutine."""
    if request.param == "threaded":
        yield stream_session
        return
    from chatd.grpc.aio import AioGrpcSession, Outbox

    loop = asyncio.new_event_loop()
    outbox = Outbox(loop)

    def aio_stream(hub: Hub, reactor: Any, user: str, limit: int = 5, chat: bool = False) -> GrpcSession:
        session = AioGrpcSession(outbox, hub, reactor, "peer", limit, chat)
        hub.connect(session)
        hub.identify(session, user)
        hub.join(session, "lobby")
        return session

    yield aio_stream
    loop.close()


class AioFakeContext(FakeContext):
    async def abort(self, code: grpc.StatusCode, details: str) -> None:  # type: ignore[override]
        raise Aborted(code, details)


def drain(session: GrpcSession, context: FakeContext | None = None) -> tuple[list[bytes], Aborted | None]:
    """Everything the worker (or the coroutine) would send, and how the call ended."""
    out: list[bytes] = []
    outbox = getattr(session, "_outbox", None)
    if outbox is not None:

        class Collecting(AioFakeContext):
            async def write(self, data: bytes) -> None:
                out.append(data)

        async def collect() -> None:
            await session.send_all(Collecting())  # type: ignore[attr-defined]

        try:
            outbox.loop.run_until_complete(collect())
        except Aborted as e:
            return out, e
        return out, None
    try:
        for data in session.drain(context or FakeContext()):
            out.append(data)
    except Aborted as e:
        return out, e
    return out, None


def test_a_full_queue_ends_only_that_stream_with_resource_exhausted(hub, reactor, new_stream) -> None:
    other = member(hub, "bob")
    slow = new_stream(hub, reactor, "slow", limit=3)
    for i in range(6):
        hub.publish("lobby", "bob", f"m{i}", "websocket")

    # The room went on: bob got all six, and saw the slow reader leave.
    assert [e.text for e in other.events if e.kind == "message"] == [f"m{i}" for i in range(6)]
    assert [(e.action, e.user) for e in other.events if e.kind == "presence"][-1] == ("leave", "slow")
    assert slow.id not in hub.sessions
    assert hub.members("lobby") == ["bob"]

    sent, ended = drain(slow)
    assert [pb.MessageResponse.FromString(d).seq for d in sent] == [1, 2, 3]
    assert ended is not None
    assert ended.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "too slow: more than 3 events waiting" in ended.details
    assert "lobby since_seq=3" in ended.details


def test_cancel_leaves_the_hub_only_when_the_reactor_runs(hub, reactor, new_stream) -> None:
    other = member(hub, "bob")
    session = new_stream(hub, reactor, "carol")
    context = FakeContext()
    session.cancelled()  # as grpcio's thread does when the client goes

    # The grpcio thread did not touch the hub: the leave waits for the reactor.
    assert session.id in hub.sessions
    assert reactor.pending == 1
    reactor.run_pending()
    assert session.id not in hub.sessions
    assert (other.events[-1].action, other.events[-1].user) == ("leave", "carol")
    assert drain(session, context) == ([], None)


def test_going_away_ends_the_stream_with_unavailable_after_what_was_queued(hub, reactor, new_stream) -> None:
    session = new_stream(hub, reactor, "dave")
    hub.publish("lobby", "bob", "before", "websocket")
    session.going_away("server shutting down")
    hub.publish("lobby", "bob", "after", "websocket")
    sent, ended = drain(session)
    assert [pb.MessageResponse.FromString(d).message for d in sent] == ["before"]
    assert ended is not None and ended.code is grpc.StatusCode.UNAVAILABLE
    assert ended.details == "server shutting down"
    assert session.id not in hub.sessions


def test_close_ends_the_stream_with_aborted_and_the_reason(hub, reactor, new_stream) -> None:
    session = new_stream(hub, reactor, "erin")
    session.close("closed by an operator")
    sent, ended = drain(session)
    assert sent == []
    assert ended is not None and (ended.code, ended.details) == (grpc.StatusCode.ABORTED, "closed by an operator")


def test_each_event_is_encoded_once_for_every_grpc_recipient(hub, reactor, new_stream) -> None:
    a = new_stream(hub, reactor, "a")
    b = new_stream(hub, reactor, "b")
    hub.publish("lobby", "bob", "hello", "websocket")
    a.going_away("x")
    b.going_away("x")
    (from_a,), _ = drain(a)
    (from_b,), _ = drain(b)
    assert from_a is from_b  # the very same bytes object
    assert pb.MessageResponse.FromString(from_a).message == "hello"


def test_stream_messages_call_joins_on_the_reactor_and_replays_since_seq(hub, reactor) -> None:
    for i in range(4):
        hub.publish("lobby", "bob", f"m{i}", "websocket")
    servicer = ChatServicer(hub, reactor, queue_size=10)
    context = FakeContext()
    request = pb.StreamRequest(room="lobby", user="frank", since_seq=2)
    calls = servicer.StreamMessages(request, context)
    received: list[int] = []
    first = threading.Event()

    def worker() -> None:
        for data in calls:
            received.append(pb.MessageResponse.FromString(data).seq)
            if len(received) == 2:
                first.set()

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    reactor.run_next()  # the join, via blockingCallFromThread
    assert hub.members("lobby") == ["frank"]
    assert first.wait(10)
    assert received == [3, 4]
    hub.publish("lobby", "bob", "live", "websocket")
    context.end()  # the client cancels
    thread.join(10)
    assert not thread.is_alive()
    assert received[-1] == 5
    reactor.run_pending()
    assert hub.members("lobby") == []


def test_bad_stream_request_aborts_with_invalid_argument_and_leaves_nothing(hub, reactor) -> None:
    servicer = ChatServicer(hub, reactor)
    calls = servicer.StreamMessages(pb.StreamRequest(room="no spaces", user="x"), FakeContext())
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(_first_error(calls)), daemon=True)
    thread.start()
    reactor.run_next()
    thread.join(10)
    (error,) = result
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details.startswith("invalid room name")
    assert hub.sessions == {}


def _first_error(calls: Any) -> Aborted | None:
    try:
        next(calls)
    except Aborted as e:
        return e
    return None


def intercepted(limit: StreamLimit, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    return limit.intercept_service(lambda details: handler, None)


def test_the_stream_limit_counts_streams_until_they_end_and_refuses_one_past_it() -> None:
    refused: list[str] = []
    limit = StreamLimit(2, on_refused=lambda: refused.append("x"))

    def numbers(request: Any, context: Any) -> Iterator[int]:
        yield from range(3)

    handler = intercepted(limit, grpc.unary_stream_rpc_method_handler(numbers))
    first, second = (handler.unary_stream(None, FakeContext()) for _ in range(2))
    assert (next(first), next(second)) == (0, 0)  # both started: two slots taken
    assert limit.open == 2
    error = _first_error(handler.unary_stream(None, FakeContext()))
    assert error is not None and error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details == "server full: 2 gRPC streams open, try again later"
    assert refused == ["x"]
    assert list(first) == [1, 2]  # done: its slot is free again
    second.close()  # cancelled: grpcio drops the generator
    assert limit.open == 0


def test_the_stream_limit_counts_callback_style_streams_until_the_call_ends() -> None:
    limit = StreamLimit(1)
    sent: list[Any] = []

    def watch(request: Any, context: Any, send_response_callback: Any = None) -> None:
        send_response_callback("status")

    watch.experimental_non_blocking = True  # as grpcio's health Watch is
    handler = intercepted(limit, grpc.unary_stream_rpc_method_handler(watch))
    assert handler.unary_stream.experimental_non_blocking
    context = FakeContext()
    handler.unary_stream(None, context, sent.append)
    assert (sent, limit.open) == (["status"], 1)  # the handler returned; the call goes on
    with pytest.raises(Aborted):
        handler.unary_stream(None, FakeContext(), sent.append)
    context.end()
    assert limit.open == 0


def test_the_stream_limit_leaves_unary_calls_alone() -> None:
    limit = StreamLimit(0)
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: "ok")
    assert intercepted(limit, handler) is handler
    assert limit.open == 0


def test_chat_streams_are_counted_by_the_one_stream_limit(hub, reactor) -> None:
    limit = StreamLimit(0)
    handlers = {name: intercepted(limit, h) for name, h in bridge.method_handlers(ChatServicer(hub, reactor)).items()}
    for call in (
        handlers["StreamMessages"].unary_stream(pb.StreamRequest(room="r", user="u"), FakeContext()),
        handlers["Chat"].stream_stream(iter(()), FakeContext()),
    ):
        error = _first_error(call)
        assert error is not None and error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reactor.pending == 0  # refused before reaching the hub
    assert hub.sessions == {}


def chat(servicer: ChatServicer, session: GrpcSession, ref: str = "", **event: Any) -> None:
    servicer._chat_event(session, pb.ChatEvent(ref=ref, **event))


def test_chat_events_join_send_leave_and_errors_keep_the_call(hub, reactor) -> None:
    servicer = ChatServicer(hub, reactor)
    other = member(hub, "bob")
    session = GrpcSession(hub, reactor, "peer", 20, chat=True)
    hub.connect(session)

    chat(servicer, session, "1", send=pb.Send(room="lobby", message="too early"))
    chat(servicer, session, "2", join=pb.Join(room="lobby", user="gina"))
    chat(servicer, session, "3", send=pb.Send(room="lobby", message="hi all"))
    chat(servicer, session, "4", join=pb.Join(room="lobby", user="someone else"))
    chat(servicer, session, "5", message=pb.MessageResponse(message="not a request"))
    chat(servicer, session, "6", leave=pb.Leave(room="lobby"))
    session.going_away("bye")
    sent, _ = drain(session)
    events = [pb.ChatEvent.FromString(d) for d in sent]
    kinds = [(e.WhichOneof("event"), e.ref) for e in events]
    assert kinds == [
        ("error", "1"),
        ("presence", ""),  # gina's own join, fanned out to the room
        ("joined", "2"),
        ("message", ""),
        ("sent", "3"),  # a send with a ref is acknowledged once stored
        ("error", "4"),
        ("error", "5"),
        ("left", "6"),
    ]
    assert events[0].error.reason == "not in room lobby: join it first"
    assert events[0].error.code == "INVALID_ARGUMENT"
    assert events[2].joined.members == ["bob", "gina"]
    assert (events[3].message.user, events[3].message.protocol) == ("gina", "grpc")
    assert (events[4].sent.id, events[4].sent.seq) == (events[3].message.id, events[3].message.seq)
    assert events[5].error.reason.startswith("user name is fixed")
    assert events[6].error.reason == "expected join, leave or send, not message"
    assert [e.text for e in other.events if e.kind == "message"] == ["hi all"]


def test_health_follows_the_hub_and_goes_not_serving_when_it_stops_accepting(hub, reactor) -> None:
    from grpc_health.v1 import health_pb2

    service = GrpcService(hub, reactor, "127.0.0.1:0")
    check = health_pb2.HealthCheckRequest(service="chat.ChatService")
    service._follow_hub()
    reactor.run_next()  # the update, made on the health thread, is done
    assert service.health.Check(check, FakeContext()).status == health_pb2.HealthCheckResponse.SERVING
    hub.accepting = False  # what the drain does first
    service._follow_hub()
    reactor.run_next()
    assert service.health.Check(check, FakeContext()).status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_stats_response_carries_the_stats_figures(hub) -> None:
    member(hub, "bob")
    hub.publish("lobby", "bob", "x", "websocket")
    stats = hub.stats()
    response = bridge.stats_response(stats)
    assert response.connections == stats["connections"]["total"] == 1
    assert dict(response.connections_by_protocol) == {"websocket": 1, "signalr": 0, "grpc": 0}
    assert response.messages_total == 1
    assert response.rooms == 1


def test_chat_join_with_since_seq_replays_before_the_joined_reply(hub, reactor) -> None:
    servicer = ChatServicer(hub, reactor)
    for i in range(3):
        hub.publish("lobby", "bob", f"m{i}", "websocket")
    session = GrpcSession(hub, reactor, "peer", 20, chat=True)
    hub.connect(session)
    chat(servicer, session, "j", join=pb.Join(room="lobby", user="hana", since_seq=1))
    hub.publish("lobby", "bob", "live", "websocket")
    session.going_away("bye")
    sent, _ = drain(session)
    events = [pb.ChatEvent.FromString(d) for d in sent]
    assert [(e.WhichOneof("event"), e.message.seq) for e in events] == [
        ("message", 2),
        ("message", 3),
        ("presence", 0),
        ("joined", 0),
        ("message", 4),
    ]


def _open_stream(servicer: ChatServicer, reactor: ThreadedFakeReactor) -> Aborted | None:
    calls = servicer.StreamMessages(pb.StreamRequest(room="lobby", user="ivan"), FakeContext())
    result: list[Aborted | None] = []
    thread = threading.Thread(target=lambda: result.append(_first_error(calls)), daemon=True)
    thread.start()
    reactor.run_next()
    thread.join(10)
    return result[0]


@pytest.fixture
def full_hub(reactor: ThreadedFakeReactor) -> Iterator[ReactorOnlyHub]:
    hub = Hub(reactor, max_connections=1)
    hub.startService()
    yield from reactor_only(hub)


def test_a_full_server_refuses_streams_with_resource_exhausted(full_hub, reactor) -> None:
    hub = full_hub
    hub.connect(Recorder())
    error = _open_stream(ChatServicer(hub, reactor), reactor)
    assert error is not None and error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details.startswith("server full")


def test_a_draining_server_refuses_streams_with_unavailable(hub, reactor) -> None:
    hub.closing = True  # what the drain sets
    error = _open_stream(ChatServicer(hub, reactor), reactor)
    assert error is not None and error.code is grpc.StatusCode.UNAVAILABLE
    assert hub.sessions == {}


# -- every servicer method reaches the hub on the reactor thread only ----------
# (the ReactorOnlyHub fixture fails these tests if any call is made elsewhere)


def test_send_message_publishes_on_the_reactor_and_returns_the_stored_message(hub, reactor) -> None:
    other = member(hub, "bob")
    servicer = ChatServicer(hub, reactor)
    request = pb.MessageRequest(user="alice", message="hello", room="lobby")
    reply = pb.MessageResponse.FromString(in_worker(reactor, servicer.SendMessage, request, FakeContext()))
    assert (reply.seq, reply.user, reply.message, reply.protocol) == (1, "alice", "hello", "grpc")
    assert [(e.id, e.text) for e in other.events if e.kind == "message"] == [(reply.id, "hello")]


def test_send_message_refusal_is_invalid_argument_and_publishes_nothing(hub, reactor) -> None:
    servicer = ChatServicer(hub, reactor)
    request = pb.MessageRequest(user="alice", message="x", room="no spaces")
    with pytest.raises(Aborted) as info:
        in_worker(reactor, servicer.SendMessage, request, FakeContext())
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert hub.messages_total == 0


def test_get_stats_reads_the_hub_on_the_reactor(hub, reactor) -> None:
    member(hub, "bob")
    reply = in_worker(reactor, ChatServicer(hub, reactor).GetStats, pb.StatsRequest(), FakeContext())
    assert (reply.connections, reply.rooms) == (1, 1)


def test_a_chat_call_joins_sends_and_leaves_through_the_reactor(hub, reactor) -> None:
    other = member(hub, "bob")
    servicer = ChatServicer(hub, reactor)
    requests: queue.Queue[pb.ChatEvent | None] = queue.Queue()
    for event in (
        pb.ChatEvent(ref="j", join=pb.Join(room="lobby", user="gina")),
        pb.ChatEvent(send=pb.Send(room="lobby", message="hi")),
        pb.ChatEvent(ref="l", leave=pb.Leave(room="lobby")),
        None,  # the client closes its side
    ):
        requests.put(event)
    # The reader thread feeds each event to the reactor; the call ends when it is done.
    sent = in_worker(reactor, servicer.Chat, iter(requests.get, None), FakeContext())
    kinds = [pb.ChatEvent.FromString(d).WhichOneof("event") for d in sent]
    assert kinds == ["presence", "joined", "message", "left"]
    assert [e.text for e in other.events if e.kind == "message"] == ["hi"]
    assert [s for s in hub.sessions.values() if s.protocol == "grpc"] == []


# -- kept messages hold no protobuf copies --------------------------------------


def kept_encodings(hub: Any, room: str = "lobby") -> list[Any]:
    return [m._encoded for m in hub.store.since(room, 0).messages]


def test_a_message_sent_over_grpc_keeps_no_encodings_once_acknowledged(hub, reactor) -> None:
    stream_session(hub, reactor, "watcher")  # a gRPC recipient, so the fan-out encodes
    servicer = ChatServicer(hub, reactor)
    request = pb.MessageRequest(user="alice", message="hello", room="lobby")
    reply = pb.MessageResponse.FromString(in_worker(reactor, servicer.SendMessage, request, FakeContext()))
    assert (reply.seq, reply.message) == (1, "hello")
    assert kept_encodings(hub) == [None]


def test_a_stream_messages_replay_leaves_no_encodings_on_kept_messages(hub, reactor) -> None:
    for i in range(3):
        hub.publish("lobby", "bob", f"m{i}", "websocket")
    servicer = ChatServicer(hub, reactor)
    calls = servicer.StreamMessages(pb.StreamRequest(room="lobby", user="ivy", since_seq=0), FakeContext())
    first = in_worker(reactor, next, calls)  # the join, with its replay, runs on the reactor
    assert pb.MessageResponse.FromString(first).seq == 1
    assert kept_encodings(hub) == [None, None, None]
    calls.close()


def test_a_chat_join_replay_leaves_no_encodings_on_kept_messages(hub, reactor) -> None:
    for i in range(3):
        hub.publish("lobby", "bob", f"m{i}", "websocket")
    session = GrpcSession(hub, reactor, "peer", 20, chat=True)
    hub.connect(session)
    chat(ChatServicer(hub, reactor), session, "j", join=pb.Join(room="lobby", user="hana", since_seq=0))
    session.going_away("bye")
    sent, _ = drain(session)
    assert [pb.ChatEvent.FromString(d).message.seq for d in sent[:3]] == [1, 2, 3]
    assert kept_encodings(hub) == [None, None, None]


# -- nothing grpcio may block in runs on the reactor -----------------------------


class StuckHealth(health.HealthServicer):
    """grpcio's HealthServicer as a Watch client that stopped reading makes it.

    grpcio sends each status change to every watcher from the thread that
    makes the change and waits until it is sent, so each change here blocks
    until ``release`` (bounded, so a regression fails instead of hanging).
    On the reactor thread it would freeze the daemon: there it only records
    the call and returns, so the test can say where it ran.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reactor_thread = threading.current_thread()
        self.calls: list[tuple[str, bool]] = []  # (method, ran on the reactor thread)
        self.entered = threading.Event()
        self.release = threading.Event()

    def set(self, service: str, status: int) -> None:
        self._stall("set")

    def enter_graceful_shutdown(self) -> None:
        self._stall("enter_graceful_shutdown")

    def _stall(self, method: str) -> None:
        on_reactor = threading.current_thread() is self.reactor_thread
        self.calls.append((method, on_reactor))
        self.entered.set()
        if not on_reactor:
            self.release.wait(10)


def test_health_updates_run_off_the_reactor_which_keeps_turning_while_one_is_stuck(hub, reactor) -> None:
    service = GrpcService(hub, reactor, "127.0.0.1:0")
    health = service.health = StuckHealth()
    service._follow_hub()  # returns although the update is stuck
    assert health.entered.wait(10)
    assert health.calls == [("set", False)]

    # The reactor goes on meanwhile: the hub takes messages, timers fire.
    other = member(hub, "bob")
    hub.publish("lobby", "bob", "still here", "websocket")
    assert [e.text for e in other.events if e.kind == "message"] == ["still here"]
    hub.accepting = False
    reactor.advance(service.health_interval)  # no loop running: _follow_hub by hand
    service._follow_hub()  # NOT_SERVING queues behind the stuck update, in order

    health.release.set()
    reactor.run_next()  # SERVING's update reports back to the reactor
    reactor.run_next()  # then NOT_SERVING's
    assert health.calls == [("set", False)] * 4


def test_stop_service_completes_while_a_health_update_is_stuck(hub, reactor) -> None:
    service = GrpcService(hub, reactor, "127.0.0.1:0", grace=0.5)
    health = service.health = StuckHealth()
    service.startService()  # a real grpcio server on a free port; its SERVING update sticks
    assert health.entered.wait(10)
    stream = stream_session(hub, reactor, "sam")

    stopped = service.stopService()  # NOT_SERVING queues behind the stuck update
    assert health.calls == [("set", False)]
    assert stream.ended and stream.close_reason is not None  # streams are told at once
    results: list[Any] = []
    stopped.addBoth(results.append)
    reactor.run_until(lambda: bool(results))  # the server's stop, waited for off the reactor
    assert results == [None]

    health.release.set()  # the client is gone: the queued updates go out, in order
    reactor.run_until(lambda: len(health.calls) == 3)
    assert health.calls == [("set", False), ("set", False), ("enter_graceful_shutdown", False)]


def test_messages_gone_before_delivery_end_a_stream_with_data_loss_and_tell_a_chat(hub, reactor, new_stream) -> None:
    from chatd.events import Truncated

    stream = new_stream(hub, reactor, "sam")
    chat = new_stream(hub, reactor, "cat", chat=True)
    hub.join(chat, "lobby")
    hub.deliver(Truncated("lobby", 40))
    chat.going_away("bye")
    _, ended = drain(stream)
    assert ended is not None and ended.code is grpc.StatusCode.DATA_LOSS
    assert "resume with since_seq=39" in ended.details
    events = [pb.ChatEvent.FromString(d) for d in drain(chat)[0]]
    errors = [e.error for e in events if e.WhichOneof("event") == "error"]
    assert [(e.code, e.reason.startswith("messages of lobby before seq 40 are gone")) for e in errors] == [
        ("DATA_LOSS", True)
    ]
