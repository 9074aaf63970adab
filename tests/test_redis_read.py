"""A room read back from Redis while its messages are in flight: nothing stored after a join is missed live."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest_twisted
from twisted.internet import defer, reactor, task

from chatd.hub import Hub
from chatd.redis import RedisBackplane, _key
from chatd.validate import Limits
from tests.test_hub import FakeSession


async def _process(redis, **kwargs) -> tuple[Hub, RedisBackplane]:
    """One chatd process's hub and backplane, in this test's reactor (``kwargs``: the backplane's)."""
    store = RedisBackplane(reactor, redis.url, limit=kwargs.pop("limit", 100), **kwargs)
    hub = Hub(reactor, limits=Limits(message_rate=0, connection_rate=0), store=store)
    store.attach(hub)
    hub.startService()
    await store.synced
    return hub, store


@asynccontextmanager
async def _two_processes(redis, **kwargs) -> AsyncIterator[tuple[Hub, RedisBackplane, Hub]]:
    """Processes A (``kwargs``: its backplane's) and B on one Redis: A's hub and backplane, B's hub; both stopped after."""
    hub_a, store_a = await _process(redis, **kwargs)
    hub_b, _ = await _process(redis)
    try:
        yield hub_a, store_a, hub_b
    finally:
        await hub_a.stopService()
        await hub_b.stopService()


@pytest_twisted.ensureDeferred
async def test_a_message_stored_just_before_a_joins_read_and_seen_late_is_delivered_live(redis) -> None:
    """Stored after the join began, counted by the read, its event still on the way: delivered, not taken for history."""
    async with _two_processes(redis) as (hub_a, store_a, hub_b):
        # Process A's subscription is slow: its events wait, in order, until released.
        events = store_a._events.proto
        late_events: list = []
        events.messageReceived = lambda pattern, channel, message: late_events.append(message)

        def release() -> None:
            events.messageReceived = lambda pattern, channel, message: store_a._on_event(message)
            for message in late_events:
                store_a._on_event(message)

        # Process B stores a message in the room after A's join began, just before A's read counts the room.
        commands = store_a._commands.proto
        execute = commands.execute_command
        stored: list = []

        def execute_after_b(*args, **kwargs):
            if args[:2] == ("GET", _key("seq", "r")) and not stored:
                d = hub_b.publish("r", "bob", "between", "fake")
                d.addCallback(stored.append)
                return d.addCallback(lambda _: execute(*args, **kwargs))
            return execute(*args, **kwargs)

        commands.execute_command = execute_after_b
        reactor.callLater(0.5, release)
        alice = FakeSession("alice")
        hub_a.connect(alice)
        joined = hub_a.join(alice, "r")
        if isinstance(joined, defer.Deferred):
            await joined
        await task.deferLater(reactor, 1.0, lambda: None)
        assert [m.seq for m in stored] == [1]
        assert [(m.seq, m.text) for m in alice.messages()] == [(1, "between")]
        # and once, not again when its event finally comes
        await task.deferLater(reactor, 0.3, lambda: None)
        assert len(alice.messages()) == 1


async def _until(check, timeout: float = 10.0) -> bool:
    """Let the reactor run until ``check()`` holds (bounded); whether it did."""
    for _ in range(int(timeout / 0.05)):
        if check():
            return True
        await task.deferLater(reactor, 0.05, lambda: None)
    return check()


@pytest_twisted.ensureDeferred
async def test_messages_stored_while_the_subscription_is_down_during_a_read_are_delivered(redis) -> None:
    """The subscription drops while a join's read is in flight: the catch-up skips the busy room, the read must not."""
    async with _two_processes(redis) as (hub_a, store_a, hub_b):
        commands = store_a._commands.proto
        execute = commands.execute_command
        stored: list = []
        subscription = store_a._events.proto

        @defer.inlineCallbacks
        def cut_then_publish():
            # The read has counted the room and published its marker: the subscription
            # drops now (the marker is lost with it), and B stores three messages.
            store_a._events.proto.transport.loseConnection()
            for text in ("one", "two", "three"):
                stored.append((yield hub_b.publish("r", "bob", text, "fake")))

        def execute_cutting(*args, **kwargs):
            if args[0] == "PUBLISH" and not stored:
                cut_then_publish()
                return defer.succeed(0)
            return execute(*args, **kwargs)

        commands.execute_command = execute_cutting
        alice = FakeSession("alice")
        hub_a.connect(alice)
        joined = hub_a.join(alice, "r")
        # A subscribes again and catches up while the read still waits for its marker.
        await _until(lambda: store_a._events.proto not in (None, subscription) and store_a._held is None)
        assert "r" in store_a._syncing_rooms, "the read should still be in flight"
        if isinstance(joined, defer.Deferred):
            await joined
        await _until(lambda: len(alice.messages()) >= 3)
        assert [m.seq for m in stored] == [1, 2, 3]
        assert [(m.seq, m.text) for m in alice.messages()] == [(1, "one"), (2, "two"), (3, "three")]
        # A live message after them follows them, once each.
        await hub_b.publish("r", "bob", "four", "fake")
        await _until(lambda: len(alice.messages()) >= 4)
        await task.deferLater(reactor, 0.3, lambda: None)
        assert [m.seq for m in alice.messages()] == [1, 2, 3, 4]


@pytest_twisted.ensureDeferred
async def test_a_message_stored_after_a_join_while_the_subscription_is_cut_is_delivered_live(redis) -> None:
    """Stored after the join, counted by the read's GET, its event lost with a cut subscription: still delivered.

    The read's marker cannot come back over a subscription that dropped, so
    it cannot tell by events what came after the join; a message counted by
    the read was then taken for history and never reached the member who
    joined before it (test_attack_durable saw seq 1 of the last rooms joined
    go missing that way).
    """
    async with _two_processes(redis) as (hub_a, store_a, hub_b):
        commands = store_a._commands.proto
        execute = commands.execute_command
        stored: list = []

        @defer.inlineCallbacks
        def cut_publish_then(args, kwargs):
            store_a._events.proto.transport.loseConnection()
            stored.append((yield hub_b.publish("r", "bob", "after the join", "fake")))
            return (yield execute(*args, **kwargs))

        def intercept(*args, **kwargs):
            if args[:2] == ("GET", _key("seq", "r")) and not stored:
                return cut_publish_then(args, kwargs)
            if args[0] == "PUBLISH" and b'"k":"r"' in args[2]:
                return defer.succeed(0)  # the marker is lost with the subscription
            return execute(*args, **kwargs)

        commands.execute_command = intercept
        alice = FakeSession("alice")
        hub_a.connect(alice)
        joined = hub_a.join(alice, "r")
        if isinstance(joined, defer.Deferred):
            await joined
        await _until(lambda: alice.messages(), timeout=6.0)
        assert [m.seq for m in stored] == [1]
        assert [(m.seq, m.text) for m in alice.messages()] == [(1, "after the join")]
