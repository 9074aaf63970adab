"""SignalR resume (``since``) and idempotent sends (``client_id``) over a fake transport."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from chatd.hub import Hub
from chatd.signalr import protocol as p
from chatd.store import MemoryStore, Stored, StoreUnavailable
from chatd.validate import Limits
from tests.test_signalr_connection import invoke, open_connection


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def hub(clock):
    h = Hub(clock, limits=Limits(history_limit=5), store=MemoryStore(clock, limit=5))
    h.startService()
    return h


def completions(messages: list[dict]) -> dict[str, dict]:
    return {m["invocationId"]: m for m in messages if m["type"] == p.COMPLETION}


def publish(hub: Hub, room: str, n: int) -> None:
    for i in range(n):
        hub.publish(room, "bob", f"m{i}", "websocket")


def test_stream_room_since_replays_the_missed_then_goes_live(clock, hub):
    publish(hub, "r", 4)
    conn, t, _ = open_connection(clock, hub)
    t.take()
    conn.data_received(
        p.JsonCodec().encode(
            {"type": p.STREAM_INVOCATION, "invocationId": "s", "target": "StreamRoom", "arguments": ["r", 2]}
        )
    )
    hub.publish("r", "bob", "live", "websocket")
    items = [m["item"] for m in t.take() if m["type"] == p.STREAM_ITEM]
    assert [i["seq"] for i in items] == [3, 4, 5]
    assert items[-1]["message"] == "live"


def test_stream_room_since_older_than_retention_says_truncated_first(clock, hub):
    publish(hub, "r", 9)  # only 5..9 kept
    conn, t, _ = open_connection(clock, hub)
    t.take()
    conn.data_received(
        p.JsonCodec().encode(
            {"type": p.STREAM_INVOCATION, "invocationId": "s", "target": "StreamRoom", "arguments": ["r", 1]}
        )
    )
    items = [m["item"] for m in t.take() if m["type"] == p.STREAM_ITEM]
    assert items[0] == {"type": "truncated", "room": "r", "first_seq": 5}
    assert [i["seq"] for i in items[1:]] == [5, 6, 7, 8, 9]


def test_join_room_since_replays_as_receive_message_and_reports(clock, hub):
    publish(hub, "news", 3)
    conn, t, _ = open_connection(clock, hub)
    t.take()
    invoke(conn, "JoinRoom", "news", "ada", 1, invocation_id="j")
    out = t.take()
    replayed = [m["arguments"][1] for m in out if m["type"] == p.INVOCATION and m["target"] == "ReceiveMessage"]
    assert replayed == ["m1", "m2"]
    assert completions(out)["j"]["result"] == {
        "users": ["ada"],
        "truncated": False,
        "first_seq": 1,
        "last_seq": 3,
    }


def test_a_join_since_replays_to_receive_message_only_not_again_to_an_open_stream_of_the_room(clock, hub):
    """A StreamRoom that already carried the room's messages does not get them again, out of
    order, when the same connection then replays them with JoinRoom(room, user, since)."""
    conn, t, _ = open_connection(clock, hub)
    t.take()
    conn.data_received(
        p.JsonCodec().encode(
            {"type": p.STREAM_INVOCATION, "invocationId": "s", "target": "StreamRoom", "arguments": ["news"]}
        )
    )
    publish(hub, "news", 3)
    invoke(conn, "JoinRoom", "news", "ada", 1, invocation_id="j")
    hub.publish("news", "bob", "live", "websocket")
    out = t.take()
    items = [m["item"] for m in out if m["type"] == p.STREAM_ITEM]
    assert [i["seq"] for i in items] == [1, 2, 3, 4]  # each once, in order
    replayed = [m["arguments"][1] for m in out if m["type"] == p.INVOCATION and m["target"] == "ReceiveMessage"]
    assert replayed == ["m0", "m1", "m2", "m1", "m2", "live"]  # live, the replay asked for, live


def test_bad_since_is_a_completion_error_and_joins_nothing(clock, hub):
    conn, t, _ = open_connection(clock, hub)
    t.take()
    invoke(conn, "JoinRoom", "r", "ada", "yesterday", invocation_id="j")
    assert completions(t.take())["j"]["error"] == "since must be a non-negative integer"
    assert hub.members("r") == []


def test_send_to_room_with_a_client_id_is_stored_once_and_answers_the_original(clock, hub):
    watcher_conn, watcher, _ = open_connection(clock, hub, user="wes")
    invoke(watcher_conn, "JoinRoom", "r")
    watcher.take()
    conn, t, _ = open_connection(clock, hub)
    t.take()
    invoke(conn, "SendToRoom", "r", "ada", "hello", "k-1", invocation_id="1")
    invoke(conn, "SendToRoom", "r", "ada", "hello", "k-1", invocation_id="2")
    done = completions(t.take())
    first, retry = done["1"]["result"], done["2"]["result"]
    assert (retry["id"], retry["seq"]) == (first["id"], first["seq"]) == (first["id"], 1)
    received = [m for m in watcher.take() if m["type"] == p.INVOCATION and m["target"] == "ReceiveMessage"]
    assert len(received) == 1


def test_a_send_the_store_refuses_completes_with_an_error_not_a_result(clock, hub):
    def refuse(message, client_id):
        return defer.fail(StoreUnavailable("message not stored: history store failed (disk I/O error)"))

    hub.store._persist = refuse
    conn, t, _ = open_connection(clock, hub)
    t.take()
    invoke(conn, "SendToRoom", "r", "ada", "hello", invocation_id="1")
    assert completions(t.take())["1"] == {
        "type": p.COMPLETION,
        "invocationId": "1",
        "error": "message not stored: history store failed (disk I/O error)",
    }
    assert hub.store.recent("r", 100) == []


def test_a_completion_waits_for_the_store(clock, hub):
    waiting: list[defer.Deferred] = []
    real = hub.store._persist

    def held(message, client_id):
        d = defer.Deferred()
        waiting.append((d, message, client_id))
        return d

    hub.store._persist = held
    conn, t, _ = open_connection(clock, hub)
    t.take()
    invoke(conn, "SendToRoom", "r", "ada", "hello", invocation_id="1")
    assert completions(t.take()) == {}, "acknowledged before it was stored"
    d, message, client_id = waiting.pop()
    real(message, client_id).addCallback(lambda stored: d.callback(Stored(stored.message, False)))
    assert completions(t.take())["1"]["result"]["seq"] == 1


def test_messages_gone_before_delivery_are_announced_not_skipped(clock, hub):
    from chatd.events import Truncated

    conn, t, _ = open_connection(clock, hub)
    t.take()
    conn.data_received(
        p.JsonCodec().encode(
            {"type": p.STREAM_INVOCATION, "invocationId": "s", "target": "StreamRoom", "arguments": ["general"]}
        )
    )
    hub.deliver(Truncated("general", 40))
    out = t.take()
    calls = [m for m in out if m["type"] == p.INVOCATION]
    items = [m["item"] for m in out if m["type"] == p.STREAM_ITEM]
    assert [(c["target"], c["arguments"]) for c in calls] == [("HistoryTruncated", ["general", 40])]
    assert items == [{"type": "truncated", "room": "general", "first_seq": 40}]
