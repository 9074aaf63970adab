"""The hub on its own: fake sessions, a fake clock, no sockets."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from chatd.events import Event, Message
from chatd.hub import Hub, SendBudget, ServerFull, Session
from chatd.store import MemoryStore
from chatd.validate import ChatError, Limits, RateLimited


class FakeSession(Session):
    protocol = "fake"

    def __init__(self, user: str | None = None) -> None:
        super().__init__("test")
        self.user = user
        self.events: list[Event] = []
        self.closed: str | None = None

    def deliver(self, event: Event) -> None:
        self.events.append(event)

    def close(self, reason: str) -> None:
        self.closed = reason

    def messages(self) -> list:
        return [e for e in self.events if e.kind == "message"]

    def presence(self) -> list[tuple[str, str]]:
        return [(e.action, e.user) for e in self.events if e.kind == "presence"]


def fired(d: defer.Deferred):
    """The result of a Deferred that has fired already (a memory store answers at once)."""
    results: list = []
    d.addBoth(results.append)
    assert results, "not answered at once"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def publish(hub: Hub, *args, **kwargs) -> Message:
    """``hub.publish`` with the memory store, whose Deferred has fired already."""
    results: list = []
    hub.publish(*args, **kwargs).addBoth(results.append)
    (result,) = results
    if isinstance(result, Failure):
        result.raiseException()
    return result


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(1_700_000_000)
    return c


@pytest.fixture
def hub(clock: Clock) -> Hub:
    h = Hub(clock, limits=Limits(max_message_length=50, history_limit=5), max_connections=3)
    h.startService()
    return h


def connected(hub: Hub, user: str) -> FakeSession:
    s = FakeSession(user)
    hub.connect(s)
    return s


def test_message_reaches_every_member_of_its_room_only(hub: Hub) -> None:
    alice, bob, carol = connected(hub, "alice"), connected(hub, "bob"), connected(hub, "carol")
    hub.join(alice, "r1")
    hub.join(bob, "r1")
    hub.join(carol, "r2")
    sent = publish(hub, "r1", "alice", "hello", "fake")
    assert [m.text for m in alice.messages()] == ["hello"]
    assert bob.messages() == [sent]
    assert carol.messages() == []


def test_one_encoding_per_format_is_shared_by_all_recipients(hub: Hub) -> None:
    calls = []

    class Encoding(FakeSession):
        def deliver(self, event: Event) -> None:
            self.events.append(event.encoded("fmt", lambda e: calls.append(e) or b"frame"))

    sessions = [Encoding(f"u{i}") for i in range(3)]
    for s in sessions:
        hub.connect(s)
        hub.join(s, "r")
    calls.clear()
    message = publish(hub, "r", "u0", "hi", "fake")
    assert len(calls) == 1
    assert all(s.events[-1] == b"frame" for s in sessions)
    # The frames are not kept with the message in history once delivered.
    message.encoded("fmt", lambda e: calls.append(e) or b"again")
    assert len(calls) == 2


def test_seq_strictly_increases_per_room_and_ids_are_unique(hub: Hub) -> None:
    a = [publish(hub, "a", "x", f"m{i}", "fake") for i in range(10)]
    b = [publish(hub, "b", "x", f"m{i}", "fake") for i in range(3)]
    assert [m.seq for m in a] == list(range(1, 11))
    assert [m.seq for m in b] == [1, 2, 3]
    assert len({m.id for m in a + b}) == 13


def test_timestamps_come_from_the_clock(hub: Hub, clock: Clock) -> None:
    clock.advance(1.5)
    m = publish(hub, "r", "x", "hi", "fake")
    assert m.time == clock.seconds()
    assert m.as_dict()["timestamp"] == "2023-11-14T22:13:21.500Z"


def test_history_keeps_the_last_n(hub: Hub) -> None:
    for i in range(8):
        publish(hub, "r", "x", f"m{i}", "fake")
    assert [m.text for m in fired(hub.history("r", 3))] == ["m5", "m6", "m7"]
    assert [m.text for m in fired(hub.history("r", 100))] == ["m3", "m4", "m5", "m6", "m7"]
    assert [m.text for m in fired(hub.history("r", None))] == ["m3", "m4", "m5", "m6", "m7"]
    assert fired(hub.history("empty", 3)) == []


def test_seq_continues_after_a_room_empties(hub: Hub) -> None:
    s = connected(hub, "alice")
    hub.join(s, "r")
    publish(hub, "r", "alice", "one", "fake")
    hub.leave(s, "r")
    hub.join(s, "r")
    assert publish(hub, "r", "alice", "two", "fake").seq == 2


def test_join_since_seq_replays_then_goes_live_without_gap_or_duplicate(hub: Hub) -> None:
    for i in range(4):
        publish(hub, "r", "x", f"m{i}", "fake")
    s = connected(hub, "late")
    hub.join(s, "r", since_seq=2)
    publish(hub, "r", "x", "live", "fake")
    assert [m.seq for m in s.messages()] == [3, 4, 5]


def test_presence_on_join_leave_and_disconnect(hub: Hub) -> None:
    alice, bob = connected(hub, "alice"), connected(hub, "bob")
    assert hub.join(alice, "r") == ["alice"]
    assert hub.join(bob, "r") == ["alice", "bob"]
    hub.leave(bob, "r")
    hub.join(bob, "r")
    hub.disconnect(bob)
    assert alice.presence() == [
        ("join", "alice"),
        ("join", "bob"),
        ("leave", "bob"),
        ("join", "bob"),
        ("leave", "bob"),
    ]
    assert hub.members("r") == ["alice"]
    assert bob.rooms == set()


def test_a_session_deaf_to_presence_is_not_handed_it_and_still_gets_messages(hub: Hub) -> None:
    """A gRPC ``StreamMessages`` stream carries messages only: a room of N of them
    must not cost N calls per join (10,000 streams opened at once took 14 s)."""
    listener, deaf = connected(hub, "listener"), connected(hub, "deaf")
    deaf.hears_presence = False
    hub.join(deaf, "r")
    hub.join(listener, "r")
    publish(hub, "r", "listener", "hi", "fake")
    hub.disconnect(listener)
    assert [e.kind for e in deaf.events] == ["message"]
    assert listener.presence() == [("join", "listener")]
    assert hub.members("r") == ["deaf"]  # still a member, with presence counted for it


def test_a_user_with_two_connections_leaves_when_the_last_one_goes(hub: Hub) -> None:
    watcher = connected(hub, "watcher")
    hub.join(watcher, "r")
    one, two = connected(hub, "alice"), connected(hub, "alice")
    hub.join(one, "r")
    hub.join(two, "r")
    hub.disconnect(one)
    assert hub.members("r") == ["watcher", "alice"]
    hub.disconnect(two)
    assert watcher.presence() == [("join", "watcher"), ("join", "alice"), ("leave", "alice")]


def test_disconnect_is_idempotent(hub: Hub) -> None:
    s = connected(hub, "a")
    hub.join(s, "r")
    hub.disconnect(s)
    hub.disconnect(s)
    assert hub.stats()["connections"]["total"] == 0


def test_user_name_is_fixed_once_set(hub: Hub) -> None:
    s = FakeSession()
    hub.connect(s)
    assert hub.identify(s, "alice") == "alice"
    assert hub.identify(s, "alice") == "alice"
    with pytest.raises(ChatError, match="fixed"):
        hub.identify(s, "mallory")
    assert s.user == "alice"


def test_join_needs_a_user(hub: Hub) -> None:
    s = FakeSession()
    hub.connect(s)
    with pytest.raises(ChatError, match="user name is needed"):
        hub.join(s, "r")


@pytest.mark.parametrize(
    "room, user, text, reason",
    [
        ("", "u", "hi", "invalid room name"),
        ("a" * 65, "u", "hi", "invalid room name"),
        ("bad room", "u", "hi", "invalid room name"),
        (5, "u", "hi", "room must be a string"),
        ("r", "", "hi", "invalid user name"),
        ("r", " lead", "hi", "invalid user name"),
        ("r", "u" * 33, "hi", "invalid user name"),
        ("r", "u", "", "must not be empty"),
        ("r", "u", "   ", "must not be empty"),
        ("r", "u", "x" * 51, "too long"),
        ("r", "u", None, "message must be a string"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(hub: Hub, room, user, text, reason) -> None:
    member = connected(hub, "m")
    hub.join(member, "r")
    before = hub.stats()
    with pytest.raises(ChatError, match=reason):
        publish(hub, room, user, text, "fake")
    assert member.messages() == []
    assert hub.stats() == before
    assert fired(hub.history("r", 5)) == []


def test_unicode_names_and_the_length_limit_in_characters(hub: Hub) -> None:
    m = publish(hub, "r", "Zoë Ångström", "é" * 50, "fake")
    assert m.user == "Zoë Ångström"


def test_max_connections(hub: Hub) -> None:
    for i in range(3):
        connected(hub, f"u{i}")
    with pytest.raises(ServerFull, match="server full"):
        hub.connect(FakeSession("one-too-many"))
    assert hub.stats()["connections"]["total"] == 3


def test_a_failing_session_does_not_stop_the_fan_out(hub: Hub) -> None:
    class Broken(FakeSession):
        def deliver(self, event: Event) -> None:
            raise RuntimeError("boom")

    broken = Broken("broken")
    hub.connect(broken)
    hub.join(broken, "r")
    ok = connected(hub, "ok")
    hub.join(ok, "r")
    publish(hub, "r", "ok", "still here", "fake")
    assert [m.text for m in ok.messages()] == ["still here"]


def test_a_session_closed_during_delivery_does_not_disturb_the_others(hub: Hub) -> None:
    class Quitter(FakeSession):
        def deliver(self, event: Event) -> None:
            if event.kind == "message":
                hub.disconnect(self)

    q = Quitter("q")
    hub.connect(q)
    hub.join(q, "r")
    ok = connected(hub, "ok")
    hub.join(ok, "r")
    publish(hub, "r", "ok", "hi", "fake")
    assert [m.text for m in ok.messages()] == ["hi"]
    assert hub.members("r") == ["ok"]


def test_stats_count_connections_rooms_and_message_rate(hub: Hub, clock: Clock) -> None:
    a, b = connected(hub, "a"), connected(hub, "b")
    hub.join(a, "r1")
    hub.join(b, "r2")
    for _ in range(9):  # one a second over the last nine whole seconds
        clock.advance(1)
        publish(hub, "r1", "a", "x", "fake")
    clock.advance(1)
    stats = hub.stats()
    assert stats["connections"]["total"] == 2
    assert stats["connections"]["fake"] == 2
    assert stats["rooms"] == 2
    assert stats["messages"]["total"] == 9
    assert stats["messages"]["deliveries"] == 9
    assert stats["messages"]["per_second"] == 1.0


def test_health_follows_the_service_state(hub: Hub) -> None:
    assert hub.healthy
    hub.stopService()
    assert not hub.healthy


def test_memory_store_since_says_what_is_gone() -> None:
    store = MemoryStore(Clock(), limit=3)
    hub = Hub(Clock(), store=store)
    for i in range(5):
        publish(hub, "r", "x", f"m{i}", "fake")
    resume = store.since("r", 0)
    assert [m.seq for m in resume.messages] == [3, 4, 5]
    assert (resume.first_kept, resume.truncated) == (3, True)
    resume = store.since("r", 2)
    assert [m.seq for m in resume.messages] == [3, 4, 5]
    assert not resume.truncated
    assert store.since("r", 4).messages[0].seq == 5
    assert store.since("r", 5)[:3] == ([], 3, False)
    assert store.since("other", 0)[:3] == ([], 1, False)


class FakeTransport:
    def __init__(self) -> None:
        self.producer = None

    def registerProducer(self, producer, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


def test_send_budget_closes_only_past_its_limit_while_paused() -> None:
    overflows = []
    budget = SendBudget(100, lambda: overflows.append(True))
    transport = FakeTransport()
    transport.producer = object()  # twisted.web's channel, replaced on attach
    budget.attach(transport)
    assert transport.producer is budget
    assert budget.charge(1000)  # not paused: the transport takes it
    budget.pauseProducing()
    assert budget.charge(60)
    budget.resumeProducing()
    budget.pauseProducing()
    assert budget.charge(60)
    assert not budget.charge(60)
    assert overflows == [True]
    assert not budget.charge(1)
    assert overflows == [True]


def test_a_user_over_the_rate_limit_is_refused_until_the_bucket_refills(clock: Clock) -> None:
    hub = Hub(clock, limits=Limits(message_rate=2, message_burst=3))
    watcher = FakeSession("watcher")
    hub.connect(watcher)
    hub.join(watcher, "r")
    for i in range(3):
        publish(hub, "r", "alice", f"m{i}", "fake")
    with pytest.raises(RateLimited, match="rate limited: alice may send 2 messages a second"):
        publish(hub, "r", "alice", "too fast", "fake")
    publish(hub, "r", "bob", "bob is not limited by alice", "fake")
    clock.advance(0.5)  # one token back
    publish(hub, "r", "alice", "again", "fake")
    with pytest.raises(RateLimited):
        publish(hub, "r", "alice", "too fast again", "fake")
    assert [m.text for m in watcher.messages()] == ["m0", "m1", "m2", "bob is not limited by alice", "again"]
    assert hub.stats()["messages"]["total"] == 5


def test_rate_limit_off_by_zero(clock: Clock) -> None:
    hub = Hub(clock, limits=Limits(message_rate=0, message_burst=3))
    watcher = FakeSession("watcher")
    hub.connect(watcher)
    hub.join(watcher, "r")
    for i in range(500):  # far past the burst, in no time at all
        publish(hub, "r", "alice", f"m{i}", "fake")
    assert len(watcher.messages()) == 500
    assert hub.stats()["messages"]["total"] == 500


def test_rate_buckets_expire_incrementally_not_by_rebuilding(clock: Clock) -> None:
    """Past 10,000 known users a send must not copy every bucket (it once did, per send)."""
    from chatd.hub import _UserRate

    rate = _UserRate(clock, rate=10, burst=10)
    for i in range(12_000):
        assert rate.take(f"u{i}")
        clock.advance(0.0001)
    size = len(rate._buckets)
    assert 10_000 <= size <= 12_000
    buckets = rate._buckets
    rate.take("one more")
    assert rate._buckets is buckets, "the bucket table was rebuilt on a send"
    clock.advance(1.0)  # every bucket has refilled: all of them may go, a few per send
    for i in range(4100):
        rate.take(f"late{i}")
    assert len(rate._buckets) == 4100, "only the buckets still refilling are kept"
    # forgetting only refilled buckets changes no decision: late0 has 9 of its 10 left
    for _ in range(9):
        assert rate.take("late0")
    assert not rate.take("late0")


def test_a_replay_that_closes_the_session_leaves_no_ghost_member(hub: Hub) -> None:
    """A resume whose replay overflows the session (a slow stream) must not join it."""
    for i in range(4):
        publish(hub, "r", "x", f"m{i}", "fake")

    class Overflowing(FakeSession):
        def deliver(self, event: Event) -> None:
            super().deliver(event)
            if len(self.events) == 2:
                hub.disconnect(self)

    s = Overflowing("slow")
    hub.connect(s)
    with pytest.raises(ChatError, match="closed"):
        fired(hub.join(s, "r", since_seq=0))
    assert hub.members("r") == []
    assert s.rooms == set()
    assert s.id not in hub.sessions
    watcher = connected(hub, "watcher")
    hub.join(watcher, "r")
    assert hub.members("r") == ["watcher"]
    assert ("join", "slow") not in watcher.presence()


def test_closing_the_last_member_during_a_delivery_leaves_no_ghost_elsewhere(hub: Hub) -> None:
    """A slow consumer closed by a presence fan-out empties its room from inside ``deliver``.

    The nested leave removes the room; the outer fan-out must not fail on
    it, or the disconnect that caused it stops half-way and leaves its
    session a ghost in its other rooms.
    """

    class Slow(FakeSession):
        def deliver(self, event: Event) -> None:
            super().deliver(event)
            if event.kind == "presence" and event.action == "leave":
                hub.disconnect(self)

    leaving = connected(hub, "leaving")
    slow = Slow("slow")
    hub.connect(slow)
    hub.join(leaving, "a")
    hub.join(slow, "a")
    hub.join(leaving, "b")
    watcher = FakeSession("watcher")
    hub.connect(watcher)
    hub.join(watcher, "b")
    hub.disconnect(leaving)  # its leave from "a" closes slow, the last one there
    assert slow.id not in hub.sessions
    assert hub.members("a") == []
    assert hub.members("b") == ["watcher"], "the disconnect stopped half-way"
    assert ("leave", "leaving") in watcher.presence()


def test_a_delivery_that_closes_the_only_member_of_a_room_without_history(hub: Hub) -> None:
    class Slow(FakeSession):
        def deliver(self, event: Event) -> None:
            super().deliver(event)
            hub.disconnect(self)

    slow = Slow("slow")
    hub.connect(slow)
    other = connected(hub, "other")
    hub.join(other, "r2")
    hub.join(slow, "r")  # its own join presence closes it: nested leave empties the room
    assert hub.members("r") == []
    assert "r" not in hub.rooms()
    # the session left every room, so no ghost anywhere
    hub.join(other, "r")
    assert hub.members("r") == ["other"]


def test_a_replay_leaves_no_cached_frames_on_kept_messages(hub: Hub) -> None:
    for i in range(3):
        publish(hub, "r", "x", f"m{i}", "fake")

    class Caching(FakeSession):
        def deliver(self, event: Event) -> None:
            self.events.append(event.encoded("fmt", lambda e: b"frame"))

    s = Caching("late")
    hub.connect(s)
    hub.join(s, "r", since_seq=0)
    assert s.events[:3] == [b"frame"] * 3
    assert all(m._encoded is None for m in hub.store.since("r", 0).messages)


def test_a_rate_limited_seed_message_changes_nothing(clock: Clock) -> None:
    """The seed form joins before it publishes: a refusal must not leave the join behind."""
    import orjson

    from chatd.websocket import dispatch

    hub = Hub(clock, limits=Limits(message_rate=1, message_burst=1))
    hub.startService()
    watcher = connected(hub, "watcher")
    hub.join(watcher, "r")
    first, second = FakeSession(), FakeSession()
    hub.connect(first)
    hub.connect(second)
    seed = orjson.dumps({"user": "alice", "room": "r", "message": "hi"})
    assert dispatch(hub, first, seed).result is None
    before = (list(watcher.events), hub.members("r"))
    reply = dispatch(hub, second, seed)
    assert reply["type"] == "error" and reply["error"].startswith("rate limited: alice")
    assert second.rooms == set() and second.user is None
    assert (watcher.events, hub.members("r")) == before


def test_where_to_resume_is_kept_only_for_the_rooms_a_session_is_in(hub: Hub) -> None:
    """A long-lived connection passing through many rooms keeps one resume point per room it is in."""

    class Noting(FakeSession):
        def deliver(self, event: Event) -> None:
            super().deliver(event)
            if isinstance(event, Message):
                self.delivered(event)

    walker = Noting("walker")
    hub.connect(walker)
    hub.join(walker, "home")
    home = publish(hub, "home", "walker", "hi", "fake")
    for i in range(50):
        hub.join(walker, f"r{i}")
        publish(hub, f"r{i}", "walker", "passing", "fake")
        hub.leave(walker, f"r{i}")
    hub.join(walker, "last")
    last = publish(hub, "last", "walker", "here", "fake")
    assert walker.last_seqs == {"home": home.seq, "last": last.seq}
    hub.disconnect(walker)
    assert walker.last_seqs == {}
