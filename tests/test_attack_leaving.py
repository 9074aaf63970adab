"""A session the drain marked ``leaving`` is refused in its protocol's form, and the refusal changes nothing."""

from __future__ import annotations

from twisted.internet.task import Clock

from chatd.events import Event
from chatd.hub import Hub, Session, ShuttingDown


class Member(Session):
    protocol = "websocket"

    def __init__(self) -> None:
        super().__init__("peer")
        self.events: list[Event] = []

    def deliver(self, event: Event) -> None:
        self.events.append(event)

    def close(self, reason: str) -> None:
        pass


def _watched_hub() -> tuple[Hub, Member]:
    """A hub with a watcher in room "other", which a refused message must not touch."""
    hub = Hub(Clock())
    hub.startService()
    watcher = Member()
    hub.connect(watcher)
    hub.identify(watcher, "watcher")
    hub.join(watcher, "other")
    return hub, watcher


def test_a_leaving_websocket_session_sending_the_seed_form_joins_nothing() -> None:
    from chatd.websocket import _seed

    hub, watcher = _watched_hub()
    session = Member()
    hub.connect(session)
    session.leaving = True  # the drain's batch came while a message was in flight
    watcher.events.clear()
    try:
        _seed(hub, session, {"user": "alice", "room": "other", "message": "hi"})
    except ShuttingDown:
        pass
    else:
        raise AssertionError("not refused")
    assert hub.members("other") == ["watcher"], "a refused message joined the room"
    assert not [e for e in watcher.events if e.kind == "presence"], "a refused message was announced as a join"


def test_a_leaving_signalr_session_sending_to_another_room_joins_nothing() -> None:
    from chatd.signalr.chat import ChatHub
    from chatd.signalr.connection import HubConnection

    hub, watcher = _watched_hub()
    connection = HubConnection(hub.clock, lambda c: ChatHub(hub, c), connection_id="c", user="alice")
    chat = ChatHub(hub, connection)
    chat.session.leaving = True
    before = (hub.rooms(), {r: hub.members(r) for r in hub.rooms()})
    try:
        chat.send_to_room("other", "alice", "hi")
    except ShuttingDown:
        pass
    else:
        raise AssertionError("not refused")
    assert (hub.rooms(), {r: hub.members(r) for r in hub.rooms()}) == before, "a refused message joined the room"


def test_a_leaving_grpc_chat_send_is_an_unavailable_error_event() -> None:
    from chatd.grpc.bridge import ChatServicer, GrpcSession
    from chatd.grpc.generated import chat_pb2 as pb
    from tests.test_grpc_bridge import ThreadedFakeReactor, drain

    reactor = ThreadedFakeReactor()
    try:
        hub = Hub(reactor)
        hub.startService()
        servicer = ChatServicer(hub, reactor)
        session = GrpcSession(hub, reactor, "peer", 20, chat=True)
        hub.connect(session)
        servicer._chat_event(session, pb.ChatEvent(ref="1", join=pb.Join(room="lobby", user="gina")))
        session.leaving = True
        servicer._chat_event(session, pb.ChatEvent(ref="2", send=pb.Send(room="lobby", message="late")))
        session.going_away("bye")
        sent, _ = drain(session)
        errors = [e.error for e in map(pb.ChatEvent.FromString, sent) if e.WhichOneof("event") == "error"]
        assert [(e.code, e.request) for e in errors] == [("UNAVAILABLE", "send")], errors
    finally:
        reactor.stop_pool()
