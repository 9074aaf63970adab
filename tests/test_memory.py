"""Memory bounded by what is live: abandoned rooms leave memory, their history stays exact.

The hub is driven directly for the tens of thousands of rooms (SQLite on a
real file, the memory store, a real ``redis-server``), and a real
``twistd -n chatd`` over WebSocket for a smaller run. The debug counters are
``/stats``' ``memory`` figures (``Hub.stats()``): ``room_table`` (the hub's
rooms), ``rooms`` (windows in memory), ``held`` and ``bytes``.
"""

from __future__ import annotations

import json
import random
import urllib.request

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from chatd.hub import Hub, _UserRate
from chatd.limits import AddressCount
from chatd.store import MESSAGE_OVERHEAD, MemoryStore, SQLiteStore
from chatd.validate import Limits
from tests.daemon import Daemon
from tests.test_hub import FakeSession
from tests.wsclient import Client

ROOMS = 20_000
BATCH = 1_000


def memory(hub: Hub) -> dict:
    return hub.stats()["memory"]


async def abandon(hub: Hub, rooms: int, prefix: str = "gone", per_room: int = 1) -> None:
    """One visitor joins each room, sends ``per_room`` messages and leaves (without waiting for the store)."""
    visitor = FakeSession("visitor")
    hub.connect(visitor)
    for start in range(0, rooms, BATCH):
        sent = []
        for i in range(start, min(rooms, start + BATCH)):
            room = f"{prefix}{i}"
            hub.join(visitor, room)
            sent += [hub.publish(room, "visitor", f"{room} #{n}", "fake") for n in range(per_room)]
            hub.leave(visitor, room)
        await defer.gatherResults(sent)
    hub.disconnect(visitor)


def sqlite_hub(path: str, limit: int = 100, budget: int = 64 * 1024 * 1024) -> Hub:
    store = SQLiteStore(reactor, path, limit=limit, budget=budget)
    hub = Hub(reactor, limits=Limits(history_limit=limit, message_rate=0, connection_rate=0), store=store)
    hub.startService()
    return hub


@pytest.fixture
def db_path(tmp_path) -> str:
    return str(tmp_path / "chatd.sqlite3")


@pytest_twisted.ensureDeferred
async def test_abandoned_rooms_leave_memory_and_their_history_stays_exact(db_path: str) -> None:
    hub = sqlite_hub(db_path)
    busy = FakeSession("busy")
    hub.connect(busy)
    hub.join(busy, "busy")
    await defer.gatherResults([hub.publish("busy", "busy", f"b{i}", "fake") for i in range(150)])

    await abandon(hub, ROOMS)

    figures = memory(hub)
    assert figures["room_table"] == 1 and figures["rooms"] == 1 and figures["held"] == 1, figures
    assert figures["messages"] == 100  # the busy room's window, at --history-limit
    for i in random.Random(14).sample(range(ROOMS), 20):
        room = f"gone{i}"
        kept = await hub.history(room, 10)
        assert [(m.seq, m.text) for m in kept] == [(1, f"{room} #0")]
    assert memory(hub)["rooms"] == 1, "a history read left its room in memory"
    await hub.stopService()


@pytest_twisted.ensureDeferred
async def test_a_resume_in_an_evicted_room_replays_then_goes_live_without_gap_or_duplicate(db_path: str) -> None:
    hub = sqlite_hub(db_path)
    await abandon(hub, 1, prefix="r", per_room=5)
    assert memory(hub)["rooms"] == 0
    sender = FakeSession("sender")
    hub.connect(sender)
    late = FakeSession("late")
    hub.connect(late)
    # Messages in flight on both sides of the read that brings the room back.
    before = [hub.publish("r0", "sender", f"before {i}", "fake") for i in range(20)]
    joined = hub.join(late, "r0", since_seq=2)
    assert isinstance(joined, defer.Deferred) and not joined.called, "the room was read on the reactor"
    after = [hub.publish("r0", "sender", f"after {i}", "fake") for i in range(20)]
    result = await joined
    more = [hub.publish("r0", "sender", f"live {i}", "fake") for i in range(5)]
    await defer.gatherResults(before + after + more)
    assert not result.truncated and result.last_seq >= 5
    assert [m.seq for m in late.messages()] == list(range(3, 51))
    # A publish to an evicted room continues its seq.
    hub.leave(late, "r0")
    assert memory(hub)["rooms"] == 0
    assert (await hub.publish("r0", "sender", "next", "fake")).seq == 51
    await hub.stopService()


@pytest_twisted.ensureDeferred
async def test_past_the_budget_least_recently_used_windows_go_and_reads_stay_exact(db_path: str) -> None:
    # Room for about three windows of 100 small messages.
    hub = sqlite_hub(db_path, budget=3 * 100 * (MESSAGE_OVERHEAD + 20))
    members = []
    for n in range(6):
        member = FakeSession(f"m{n}")
        hub.connect(member)
        hub.join(member, f"busy{n}")
        members.append(member)
        await defer.gatherResults([hub.publish(f"busy{n}", f"m{n}", f"{n}:{i}", "fake") for i in range(120)])
    figures = memory(hub)
    assert figures["bytes"] <= figures["budget"]
    assert figures["held"] == 6 and figures["evictions"] > 0
    assert figures["messages"] < 600, figures
    for n in range(6):  # evicted or not: the last 100, exactly
        kept = await hub.history(f"busy{n}", 100)
        assert [m.text for m in kept] == [f"{n}:{i}" for i in range(20, 120)]
        resume = await hub.join(members[n], f"busy{n}", since_seq=110)
        assert not resume.truncated
    assert [m.seq for m in members[0].messages()][-10:] == list(range(111, 121))
    await hub.stopService()


def test_the_memory_store_counts_rooms_in_its_budget_and_forgets_the_oldest_idle_ones() -> None:
    store = MemoryStore(task.Clock(), limit=100, budget=200_000)
    hub = Hub(task.Clock(), limits=Limits(message_rate=0, connection_rate=0), store=store)
    busy = FakeSession("busy")
    hub.connect(busy)
    hub.join(busy, "busy")
    for i in range(100):
        hub.publish("busy", "busy", f"b{i}", "fake")
    visitor = FakeSession("visitor")
    hub.connect(visitor)
    for i in range(ROOMS):
        hub.join(visitor, f"gone{i}")
        hub.publish(f"gone{i}", "visitor", "x", "fake")
        hub.leave(visitor, f"gone{i}")
    figures = memory(hub)
    assert figures["room_table"] == 1
    assert figures["bytes"] <= 200_000 and figures["rooms"] < 200, figures
    assert [m.seq for m in store.recent("busy", 100)] == list(range(1, 101)), "a live room lost history"
    newest = store.recent(f"gone{ROOMS - 1}", 10)
    assert [m.text for m in newest] == ["x"]
    # The oldest was forgotten, seq and all: a resume is answered as for a reset history.
    assert store.recent("gone0", 10) == [] and store.since("gone0", 1).truncated


@pytest_twisted.ensureDeferred
async def test_with_redis_abandoned_rooms_leave_memory_and_history_is_read_back(redis) -> None:
    from chatd.redis import RedisBackplane

    store = RedisBackplane(reactor, redis.url, limit=100)
    hub = Hub(reactor, limits=Limits(message_rate=0, connection_rate=0), store=store)
    store.attach(hub)
    hub.startService()
    await store.synced
    try:
        rooms = ROOMS // 4
        await abandon(hub, rooms)
        figures = memory(hub)
        assert figures["room_table"] == 0 and figures["rooms"] == 0 and figures["held"] == 0, figures
        for i in random.Random(14).sample(range(rooms), 10):
            kept = await hub.history(f"gone{i}", 10)
            assert [(m.seq, m.text) for m in kept] == [(1, f"gone{i} #0")]
        late = FakeSession("late")
        hub.connect(late)
        joined = await hub.join(late, "gone7", since_seq=0)
        assert joined.last_seq == 1 and [m.text for m in late.messages()] == ["gone7 #0"]
        assert (await hub.publish("gone7", "late", "again", "fake")).seq == 2
        assert [m.seq for m in late.messages()] == [1, 2]
        assert (await hub.publish("gone8", "late", "elsewhere", "fake")).seq == 2  # not in memory: Redis numbers it
        hub.disconnect(late)
        assert memory(hub)["rooms"] == 0
    finally:
        await hub.stopService()


def test_other_per_name_state_is_bounded() -> None:
    """Rate buckets, client-id retries, presence and address counts: none outlives what is live."""
    clock = task.Clock()
    rate = _UserRate(clock, rate=20, burst=50)  # a bucket refills in 2.5 s
    most = 0
    for i in range(10_000):  # a new name every millisecond for 10 s
        rate.take(f"user{i}")
        clock.advance(0.001)
        most = max(most, len(rate._buckets))
    assert most <= 2_600, "buckets outlived their refill"
    clock.advance(10)  # every bucket has refilled: the same as none, forgotten as sends come
    for i in range(700):
        rate.take(f"later{i}")
    assert len(rate._buckets) <= 700, len(rate._buckets)

    hub = Hub(clock, limits=Limits(message_rate=20, connection_rate=40))
    for i in range(1_000):
        s = FakeSession(f"u{i}")
        s.peer = f"10.0.{i // 250}.{i % 250}:1234"
        hub.connect(s)
        hub.join(s, f"room{i}")
        hub.publish(f"room{i}", f"u{i}", "hi", "fake", client_id=f"c{i}", source=s)
        hub.disconnect(s)
    assert hub.sessions == {} and hub.rooms() == {} and hub._rooms == {}
    assert hub.store._in_flight == {}
    assert hub.local_presence() == {}

    counts = AddressCount(10)
    keys = [counts.claim(f"10.1.{i // 250}.{i % 250}:1") for i in range(1_000)]
    for key in keys:
        counts.release(key)
    assert counts.counts == {}


def _get(daemon: Daemon, path: str) -> dict:
    with urllib.request.urlopen(daemon.url(path=path), timeout=10) as r:
        return json.loads(r.read())


def test_a_real_daemon_gives_back_the_memory_of_abandoned_rooms_over_websocket() -> None:
    rooms = 2_000
    with Daemon("--max-message-rate", "0", "--max-connection-rate", "0", "--max-rooms-per-connection", "0") as d:
        d.wait_healthy()
        with Client(d.ws_url) as ws:
            ws.join("lobby", "stay")
            for i in range(rooms):  # pipelined: join, send, leave
                ws.send(type="join", room=f"gone{i}", user="stay")
                ws.send(type="message", room=f"gone{i}", message=f"hello {i}", client_id=f"c{i}")
                ws.send(type="leave", room=f"gone{i}")
            sent = 0
            while sent < rooms:
                frame = ws.recv(30)
                assert frame["type"] != "error", frame
                sent += frame["type"] == "sent"
            ws.send(type="ping")
            ws.recv_type("pong")
            stats = _get(d, "/stats")
            assert stats["rooms"] == 1
            figures = stats["memory"]
            assert figures["room_table"] == 1 and figures["rooms"] == 1 and figures["held"] == 1, figures
            # History and resume of evicted rooms, exact, in order with what the client sends next.
            ws.send(type="history", room="gone42", limit=5)
            ws.send(type="ping", ref="after")
            assert ws.recv_type("history")["messages"][0]["message"] == "hello 42"
            assert ws.recv()["type"] == "pong"
            ws.send(type="join", room="gone1999", user="stay", since=0)
            ws.send(type="message", room="gone1999", message="back", ref="b")
            replay = ws.recv()
            assert (replay["type"], replay["seq"], replay["message"]) == ("message", 1, "hello 1999")
            assert ws.recv_type("joined")["room"] == "gone1999"
            live = ws.recv_type("message")
            assert (live["seq"], live["message"]) == (2, "back")
            # A retry of a client_id in an evicted room is still the original.
            ws.send(type="message", room="gone1999", message="hello 1999", client_id="c1999")
            assert ws.recv_until(lambda f: f.get("client_id") == "c1999")["seq"] == 1
        assert _get(d, "/stats")["memory"]["rooms"] == 0


def test_metrics_have_no_label_per_room_or_user() -> None:
    with Daemon("--max-message-rate", "0", "--max-connection-rate", "0") as d:
        d.wait_healthy()

        for i in range(10):
            with Client(d.ws_url) as ws:
                for n in range(5):
                    ws.send(user=f"user{i}", room=f"room{i}x{n}", message="x", ref=n)
                    ws.recv_type("sent")
        with urllib.request.urlopen(d.url(path="/metrics"), timeout=10) as r:
            text = r.read().decode()
        assert "chatd_" in text
        assert "room7x" not in text and "user7" not in text


def test_signalr_and_grpc_read_evicted_rooms_back_exactly() -> None:
    import grpc

    from chatd.grpc.generated import chat_pb2 as pb
    from chatd.grpc.generated.chat_pb2_grpc import ChatServiceStub
    from tests.test_cross_protocol import SignalRClient

    with Daemon("--max-message-rate", "0", "--max-connection-rate", "0") as d:
        d.wait_healthy()
        with Client(d.ws_url) as ws:
            for room in ("a", "b", "c"):
                ws.join(room, "writer")
                for n in range(3):
                    ws.send(type="message", room=room, message=f"{room}{n}", ref=n)
                    ws.recv_type("sent")
                ws.send(type="leave", room=room)
                ws.recv_type("left")
        assert _get(d, "/stats")["memory"]["rooms"] == 0
        with SignalRClient(d.url("signalr", "ws", "/signalr?user=ada")) as sr:
            assert [m["message"] for m in sr.call("GetHistory", "a", 10)] == ["a0", "a1", "a2"]
            seen: list[dict] = []
            joined = sr.call("JoinRoom", "b", "ada", 1, seen=seen)
            assert (joined["last_seq"], joined["truncated"]) == (3, False)
            stream = sr.invoke("StreamRoom", "c", 1, kind=4)
            items = []
            while len(items) < 2:
                record = sr.next()
                if record.get("type") == 2 and record.get("invocationId") == stream:
                    items.append(record["item"]["seq"])
            assert items == [2, 3]
        with grpc.insecure_channel(f"127.0.0.1:{d.ports['grpc']}") as channel:
            stub = ChatServiceStub(channel)
            replay = stub.StreamMessages(pb.StreamRequest(room="a", user="grace", since_seq=1), timeout=20)
            assert [next(replay).message for _ in range(2)] == ["a1", "a2"]
            stub.SendMessage(pb.MessageRequest(room="a", user="grace", message="a3"), timeout=20)
            assert next(replay).seq == 4
            replay.cancel()


@pytest_twisted.ensureDeferred
async def test_with_redis_live_rooms_past_the_budget_are_read_back_exactly(redis) -> None:
    from chatd.redis import RedisBackplane

    store = RedisBackplane(reactor, redis.url, limit=100, budget=2 * 100 * (MESSAGE_OVERHEAD + 20))
    hub = Hub(reactor, limits=Limits(message_rate=0, connection_rate=0), store=store)
    store.attach(hub)
    hub.startService()
    await store.synced
    try:
        members = []
        for n in range(4):
            member = FakeSession(f"m{n}")
            hub.connect(member)
            hub.join(member, f"live{n}")
            # No wait for the room's read-back from Redis: the burst races it, and
            # Redis trims the first messages (limit 100) before the read sees them.
            members.append(member)
            await defer.gatherResults([hub.publish(f"live{n}", f"m{n}", f"{n}:{i}", "fake") for i in range(110)])
        figures = memory(hub)
        assert figures["bytes"] <= figures["budget"] and figures["evictions"] > 0, figures
        for n in range(4):
            kept = await hub.history(f"live{n}", 100)
            assert [m.text for m in kept] == [f"{n}:{i}" for i in range(10, 110)]
            # Live delivery goes on in order whatever the window went through.
            await hub.publish(f"live{n}", f"m{n}", "more", "fake")
            assert [m.seq for m in members[n].messages()] == list(range(1, 112))
    finally:
        await hub.stopService()


@pytest_twisted.ensureDeferred
async def test_a_budget_smaller_than_one_room_still_answers_exactly(db_path: str) -> None:
    hub = sqlite_hub(db_path, budget=1_000)
    member = FakeSession("m")
    hub.connect(member)
    hub.join(member, "r")
    await defer.gatherResults([hub.publish("r", "m", f"t{i}", "fake") for i in range(50)])
    assert [m.text for m in await hub.history("r", 100)] == [f"t{i}" for i in range(50)]
    late = FakeSession("late")
    hub.connect(late)
    await hub.join(late, "r", since_seq=45)
    assert [m.seq for m in late.messages()] == [46, 47, 48, 49, 50]
    assert memory(hub)["bytes"] <= 1_000 + 50 * (MESSAGE_OVERHEAD + 10) + 1_000
    await hub.stopService()


def test_signalr_calls_pipelined_behind_a_resume_wait_for_its_replay() -> None:
    # JoinRoom with since into an evicted room, then SendToRoom at once, not
    # waiting for the join's completion: the replay comes first, then the new
    # message, each once, in seq order; and the completions come in order too.
    from tests.test_cross_protocol import SignalRClient

    with Daemon("--max-message-rate", "0", "--max-connection-rate", "0") as d:
        d.wait_healthy()
        with Client(d.ws_url) as ws:
            ws.join("b", "writer")
            for n in range(3):
                ws.send(type="message", room="b", message=f"b{n}", ref=n)
                ws.recv_type("sent")
            ws.send(type="leave", room="b")
            ws.recv_type("left")
        assert _get(d, "/stats")["memory"]["rooms"] == 0
        with SignalRClient(d.url("signalr", "ws", "/signalr?user=ada")) as sr:
            join = sr.invoke("JoinRoom", "b", "ada", 1)
            send = sr.invoke("SendToRoom", "b", "ada", "mine")
            texts: list[str] = []
            completions: list[str] = []
            while len(completions) < 2 or "mine" not in texts:
                record = sr.next()
                if record.get("type") == 1 and record.get("target") == "ReceiveMessage":
                    texts.append(record["arguments"][1])
                elif record.get("type") == 3:
                    assert "error" not in record, record
                    completions.append(record["invocationId"])
            assert texts == ["b1", "b2", "mine"]
            assert completions == [join, send]
