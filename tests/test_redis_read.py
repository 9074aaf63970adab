"""A room read back from Redis while its messages are in flight: nothing stored after a join is missed live."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer, reactor, task

from chatd.hub import Hub
from chatd.redis import RedisBackplane, _key
from chatd.validate import Limits
from tests.test_hub import FakeSession


async def _process(redis) -> tuple[Hub, RedisBackplane]:
    """One chatd process's hub and backplane, in this test's reactor."""
    store = RedisBackplane(reactor, redis.url, limit=100)
    hub = Hub(reactor, limits=Limits(message_rate=0, connection_rate=0), store=store)
    store.attach(hub)
    hub.startService()
    await store.synced
    return hub, store


@pytest_twisted.ensureDeferred
async def test_a_message_stored_just_before_a_joins_read_and_seen_late_is_delivered_live(redis) -> None:
    """Stored after the join began, counted by the read, its event still on the way: delivered, not taken for history."""
    hub_a, store_a = await _process(redis)
    hub_b, _ = await _process(redis)
    try:
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
    finally:
        await hub_a.stopService()
        await hub_b.stopService()
