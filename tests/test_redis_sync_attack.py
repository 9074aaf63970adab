"""Reads and gap fills of the Redis backplane racing the subscription, the command connection and each other.

Two in-reactor processes on one real redis-server (as in tests/test_redis_read.py);
orderings are forced by intercepting the command connection's ``execute_command``
and the subscription's ``messageReceived``. Each test failed before the fix it is
named after; "Observed" in a docstring is what that code did.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest_twisted
import txredisapi
from twisted.internet import defer, reactor, task

from chatd.hub import Hub
from chatd.redis import RedisBackplane, _key
from tests.test_hub import FakeSession
from tests.test_redis_read import _process, _two_processes, _until


async def _sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


def _lossy_subscription(store: RedisBackplane, lose: set[str], seen: list[str]) -> None:
    """The store's subscription loses the events of the messages whose text is in ``lose`` (a publish lost).

    Every message event that does come through has its text appended to ``seen``.
    """
    proto = store._events.proto
    original = proto.messageReceived

    def received(pattern: Any, channel: Any, message: Any) -> Any:
        event = orjson.loads(message)
        if event.get("k") == "m":
            if event["text"] in lose:
                lose.discard(event["text"])
                return None
            seen.append(event["text"])
        return original(pattern, channel, message)

    proto.messageReceived = received


def _gate_fill_and_markers(store: RedisBackplane, room: str) -> tuple[defer.Deferred, list, list, Any]:
    """Hold back the store's first ``GET`` of ``room``'s seq (a fill's) until the gate fires, and every read marker.

    Returns the gate, the GETs seen, the markers held (``(args, kwargs, Deferred)``:
    send one with ``execute(*args, **kwargs).chainDeferred(held)``) and the real ``execute_command``.
    """
    commands = store._commands.proto
    execute = commands.execute_command
    fill_gate: defer.Deferred = defer.Deferred()
    gets: list[tuple] = []
    markers: list[tuple[tuple, dict, defer.Deferred]] = []

    def intercept(*args: Any, **kwargs: Any) -> Any:
        if args[:2] == ("GET", _key("seq", room)):
            gets.append(args)
            if len(gets) == 1:
                return fill_gate.addCallback(lambda _: execute(*args, **kwargs))
        if args[0] == "PUBLISH" and b'"k":"r"' in args[2]:
            held: defer.Deferred = defer.Deferred()
            markers.append((args, kwargs, held))
            return held
        return execute(*args, **kwargs)

    commands.execute_command = intercept
    return fill_gate, gets, markers, execute


async def _joined(hub: Hub, store: RedisBackplane, user: str, room: str) -> FakeSession:
    """A session of ``user`` in ``room``, once the room's read back is over."""
    session = FakeSession(user)
    hub.connect(session)
    hub.join(session, room)
    assert await _until(
        lambda: room in store._windows and store._windows[room].complete
        and room not in store._syncing_rooms and room not in store._loading
    )
    return session


@pytest_twisted.ensureDeferred
async def test_a_read_begun_while_a_fill_holds_the_room_gets_what_comes_after_the_fill(redis) -> None:
    """A fill is in flight when the room's last member leaves and joins again: what comes after the fill is delivered.

    Sequence: alice is in r on A. A loses the publish of "one"; "two" comes live,
    so A starts a gap fill (its GET is held back). alice leaves r (the window is
    forgotten, the fill is still in ``_syncing_rooms``) and joins again: the join's
    read finds the room syncing, so it is not the owner of the room's events. The
    read counts the room (seq 2) and waits for its marker; meanwhile the fill ends
    (with no window it delivers nothing and hands nothing on), and B stores "three",
    whose event reaches A before the read's marker.

    Expected: alice, who joined before "three" was stored, gets it (seq 3), live and
    once, in order. Observed: A applied "three" to a room with no window (ignored, "nobody here
    follows the room"), and the read, not the owner of any held events, installs a
    window at seq 2 and delivers nothing: "three" reaches alice only if another
    message comes to the room later (its gap fill), and a sender on A waiting for
    "three" to come back is not acknowledged until then.
    """
    async with _two_processes(redis) as (hub_a, store_a, hub_b):
        alice = await _joined(hub_a, store_a, "alice", "r")
        seen: list[str] = []
        _lossy_subscription(store_a, {"one"}, seen)

        fill_gate, gets, markers, execute = _gate_fill_and_markers(store_a, "r")
        await hub_b.publish("r", "bob", "one", "fake")
        await hub_b.publish("r", "bob", "two", "fake")
        assert await _until(lambda: len(gets) == 1), "A should start filling the gap at seq 1"
        assert "r" in store_a._syncing_rooms

        hub_a.leave(alice, "r")
        assert "r" not in store_a._windows and "r" in store_a._syncing_rooms
        hub_a.join(alice, "r")
        assert await _until(lambda: len(markers) == 1), "the join's read should wait for its marker"

        fill_gate.callback(None)
        assert await _until(lambda: "r" not in store_a._syncing_rooms), "the fill should end"
        three = await hub_b.publish("r", "bob", "three", "fake")
        assert three.seq == 3
        assert await _until(lambda: "three" in seen)
        args, kwargs, held = markers[0]
        execute(*args, **kwargs).chainDeferred(held)
        assert await _until(lambda: "r" not in store_a._loading and "r" in store_a._windows)

        await _until(lambda: any(m.seq == 3 for m in alice.messages()), timeout=1.5)
        # ("two", stored while she was first in r and not delivered before she left, may come too.)
        assert [(m.seq, m.text) for m in alice.messages()] in ([(3, "three")], [(2, "two"), (3, "three")])


@pytest_twisted.ensureDeferred
async def test_a_fill_refused_by_redis_with_the_connection_up_is_tried_again(redis) -> None:
    """A gap fill fails with an error reply (BUSY, LOADING, NOPERM...) while the command connection stays up.

    Sequence: alice is in r on A. A loses the publish of "one" (B's); bob's "two",
    sent through A, comes live, so A fills the gap; Redis answers the fill's GET
    with an error (the connection is not lost). The fill marks r stale and delivers
    nothing past the gap.

    Expected: the fill is tried again (Redis answers normally now), alice gets
    "one" then "two", and bob's send is acknowledged. Observed: r is only filled
    "when the command connection is back", which it never went away from: alice
    gets neither message and bob's send is never acknowledged, until some other
    message reaches r (or the connection drops for another reason).
    """
    async with _two_processes(redis) as (hub_a, store_a, hub_b):
        alice = await _joined(hub_a, store_a, "alice", "r")
        seen: list[str] = []
        _lossy_subscription(store_a, {"one"}, seen)
        commands = store_a._commands.proto
        execute = commands.execute_command
        refused: list[tuple] = []

        def intercept(*args: Any, **kwargs: Any) -> Any:
            if args[:2] == ("GET", _key("seq", "r")) and not refused:
                refused.append(args)
                return defer.fail(txredisapi.ResponseError("BUSY Redis is busy running a script."))
            return execute(*args, **kwargs)

        commands.execute_command = intercept
        await hub_b.publish("r", "bob", "one", "fake")
        acked: list = []
        hub_a.publish("r", "bob", "two", "fake").addBoth(acked.append)
        assert await _until(lambda: refused), "A should start filling the gap at seq 1"
        assert store_a._commands.proto is commands, "the command connection stays up"

        await _until(lambda: len(alice.messages()) >= 2 and acked, timeout=4.0)
        assert [(m.seq, m.text) for m in alice.messages()] == [(1, "one"), (2, "two")]
        assert [m.seq for m in acked] == [2]
        assert "r" not in store_a._stale


@pytest_twisted.ensureDeferred
async def test_a_gap_redis_no_longer_holds_is_not_fetched_again_and_again(redis) -> None:
    """Redis loses a room's keys (FLUSHALL, a restart without persistence, maxmemory eviction) during a gap fill.

    Sequence: alice is in r on A. A loses the publish of "one"; "two" comes live
    and A fills the gap from seq 1, holding "two". Just before the fill's GET,
    Redis loses its data (here FLUSHALL; the connections stay up). The fill finds
    no counter and no messages: seq 1 can never be fetched.

    Expected: a bounded number of fetches (then "two" delivered, after a
    Truncated for what is gone, or the gap given up on). Observed: ``_settle``
    sees the held "two" past the gap, the subscription continuous, and starts
    the same fill again, for ever: GET + ZRANGEBYSCORE back to back as fast as
    Redis answers, while the room stays in ``_syncing_rooms`` (its live events
    held, none delivered) until a message with a lower seq comes.
    """
    async with _two_processes(redis) as (hub_a, store_a, hub_b):
        alice = await _joined(hub_a, store_a, "alice", "r")
        seen: list[str] = []
        _lossy_subscription(store_a, {"one"}, seen)
        commands = store_a._commands.proto
        execute = commands.execute_command
        gets: list[tuple] = []

        def intercept(*args: Any, **kwargs: Any) -> Any:
            if args[:2] == ("GET", _key("seq", "r")):
                gets.append(args)
                if len(gets) == 1:
                    redis.command("FLUSHALL")
            return execute(*args, **kwargs)

        commands.execute_command = intercept
        await hub_b.publish("r", "bob", "one", "fake")
        await hub_b.publish("r", "bob", "two", "fake")
        assert await _until(lambda: gets), "A should start filling the gap at seq 1"
        await _sleep(1.0)
        fetches = len(gets)
        syncing = "r" in store_a._syncing_rooms
        commands.execute_command = execute  # (stop the loop before the teardown)
        store_a._syncing_rooms.pop("r", None)
        assert fetches <= 5, f"{fetches} fills of r in one second"
        assert not syncing
        assert [m.text for m in alice.messages()] in ([], ["two"])


@pytest_twisted.ensureDeferred
async def test_a_member_who_joined_while_cut_off_from_redis_gets_what_was_stored_after(redis) -> None:
    """A join while both of A's connections are down; B stores a message; A comes back (pre-existing, not 5f50af7).

    Sequence: A loses both connections to Redis (a network cut; here its links
    are stopped, so that they come back only when the test says). alice joins r
    on A: the read fails (no command connection), so r is "followed from its next
    event". B, still connected, stores "one" in r. A's connections come back; its
    catch-up finds r with no seq and sets it to Redis' counter.

    Expected: alice, a member since before "one" was stored, gets it (or at the
    very least a Truncated saying seq 1 is not delivered). Observed: nothing; the
    catch-up's ``GET`` makes seq 1 count as seen, and a later message arrives
    after a silent gap.
    """
    async with _two_processes(redis) as (hub_a, store_a, hub_b):
        await store_a._commands.stop()
        await store_a._events.stop()
        assert await _until(lambda: store_a._commands.proto is None and store_a._events.proto is None)
        alice = FakeSession("alice")
        hub_a.connect(alice)
        hub_a.join(alice, "r")  # its read fails at once: no command connection
        await _sleep(0.1)
        one = await hub_b.publish("r", "bob", "one", "fake")
        assert one.seq == 1
        store_a._commands.start()
        store_a._events.start()
        assert await _until(lambda: store_a._events.proto is not None and store_a._held is None)
        two = await hub_b.publish("r", "bob", "two", "fake")
        await _until(lambda: len(alice.messages()) >= 2, timeout=2.0)
        delivered = [(m.seq, m.text) for m in alice.messages()]
        truncated = [e.first_seq for e in alice.events if e.kind == "truncated"]
        assert delivered == [(1, "one"), (2, "two")] or (truncated and delivered == [(2, "two")]), (
            f"alice got {delivered} (truncated: {truncated}); {two.seq} was the second message after her join"
        )


@pytest_twisted.ensureDeferred
async def test_a_resume_read_begun_while_a_fill_holds_the_room_replays_without_a_hole(redis) -> None:
    """A resume reads back a room whose window was emptied for the memory budget while a gap fill is in flight.

    Sequence: A runs with a tiny ``--history-memory``: alice is in r, and after
    each message r's window keeps only its seq (incomplete). A loses the publish
    of "one"; "two" comes live and A fills the gap (GET held back). carol resumes
    r from seq 0: her read finds r syncing, so it is not the owner of its events;
    it reads r (seq 1..3) and waits for its marker. The fill ends, then "three"
    (seq 4) comes live and is delivered into the old window (seq only). The read
    ends: its window takes ``base`` from the old window (4) but holds only what
    its ZRANGEBYSCORE found (1..3).

    Expected: carol's replay and live stream hold 1, 2, 3, 4, once each, in order.
    Observed: the window has a hole at 4 (it claims to be complete up to 4), so
    carol replays 1..3 and goes live after 4: she never gets "three", and no
    Truncated says so (a later resume or history read misses it too).
    """
    async with _two_processes(redis, budget=1) as (hub_a, store_a, hub_b):
        alice = await _joined(hub_a, store_a, "alice", "r")
        await hub_b.publish("r", "bob", "zero", "fake")
        assert await _until(lambda: alice.messages())
        assert not store_a._windows["r"].complete, "the budget should have emptied r's window"
        seen: list[str] = []
        _lossy_subscription(store_a, {"one"}, seen)

        fill_gate, gets, markers, execute = _gate_fill_and_markers(store_a, "r")
        await hub_b.publish("r", "bob", "one", "fake")
        await hub_b.publish("r", "bob", "two", "fake")
        assert await _until(lambda: len(gets) == 1), "A should start filling the gap at seq 2"

        carol = FakeSession("carol")
        hub_a.connect(carol)
        resumed = hub_a.join(carol, "r", since_seq=0)
        assert await _until(lambda: len(markers) == 1), "the resume's read should wait for its marker"
        fill_gate.callback(None)
        assert await _until(lambda: "r" not in store_a._syncing_rooms), "the fill should end"
        await hub_b.publish("r", "bob", "three", "fake")
        assert await _until(lambda: "three" in seen)
        args, kwargs, held = markers[0]
        execute(*args, **kwargs).chainDeferred(held)
        await resumed
        await _until(lambda: len(carol.messages()) >= 4, timeout=1.5)
        assert [(m.seq, m.text) for m in carol.messages()] == [(1, "zero"), (2, "one"), (3, "two"), (4, "three")]


@pytest_twisted.ensureDeferred
async def test_a_command_connection_refused_while_redis_loads_is_tried_again(redis) -> None:
    """Redis, restarted, answers LOADING to the scripts' SCRIPT LOAD on the new command connection (pre-existing).

    Sequence: A's command connection drops (Redis restarted); the new one is
    accepted while Redis still loads its data, so the first ``SCRIPT LOAD`` of
    ``_commands_ready`` gets ``-LOADING`` (here injected; Redis answers every
    command that way until its data set is loaded). ``_Link._new`` logs that at
    debug level and leaves the connection open but never usable.

    Expected: the command connection becomes usable once Redis has loaded (the
    connection dropped and made again, or its set-up tried again), so that A stores
    messages, fills the rooms left stale and finishes its catch-up. Observed: the
    link's proto stays None for as long as that TCP connection lives: every send
    through A fails with "Redis is unavailable", /health says so, and A's next
    subscription catch-up (and so everything live on A) would wait for it for ever.
    """
    hub_a, store_a = await _process(redis)
    try:
        link = store_a._commands
        ready = link._on_ready
        refused: list[Any] = []

        def loading_once(proto: Any) -> Any:
            execute = proto.execute_command

            def intercept(*args: Any, **kwargs: Any) -> Any:
                if args[:2] == ("SCRIPT", "LOAD") and not refused:
                    refused.append(proto)
                    return defer.fail(txredisapi.ResponseError("LOADING Redis is loading the dataset in memory"))
                return execute(*args, **kwargs)

            proto.execute_command = intercept
            return ready(proto)

        link._on_ready = loading_once
        link.proto.transport.loseConnection()
        assert await _until(lambda: refused), "A should connect again"
        await _until(lambda: link.proto is not None, timeout=6.0)
        assert link.proto is not None, f"the command connection is still unusable: {link.last_error!r}"
        sent = await hub_a.publish("r", "bob", "after", "fake")
        assert sent.seq == 1
    finally:
        await hub_a.stopService()


@pytest_twisted.ensureDeferred
async def test_a_subscription_refused_with_the_connection_up_is_tried_again(redis) -> None:
    """Redis answers SUBSCRIBE with an error (an ACL without the channel, a proxy refusing it) once.

    Expected: the subscriber connection is dropped and made again, and once
    Redis takes the SUBSCRIBE the process goes live and delivers. Before: the
    refusal was logged at debug level and the link counted the connection as
    up though it subscribed to nothing: nothing was ever delivered live, and
    the process said "catching up from Redis" for as long as it lived.
    """
    async with _two_processes(redis) as (hub_a, store_a, hub_b):
        alice = await _joined(hub_a, store_a, "alice", "r")
        link = store_a._events
        ready = link._on_ready
        refused: list[Any] = []

        def refuse_once(proto: Any) -> Any:
            if not refused:
                refused.append(proto)
                proto.subscribe = lambda *channels: defer.fail(
                    txredisapi.ResponseError("NOPERM this user has no permissions to access the channel")
                )
            return ready(proto)

        link._on_ready = refuse_once
        link.proto.transport.loseConnection()
        assert await _until(lambda: refused), "A should subscribe again"
        assert await _until(lambda: link.proto not in (None, refused[0]) and store_a._held is None, timeout=8.0), (
            "the subscription should be made again once refused"
        )
        await hub_b.publish("r", "bob", "after", "fake")
        assert await _until(lambda: [m.text for m in alice.messages()] == ["after"])
