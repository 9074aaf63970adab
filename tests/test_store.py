"""The message stores on their own: the windows, SQLite on a real file, retention, client ids."""

from __future__ import annotations

import os
import sqlite3
import threading
import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads
from twisted.internet.task import Clock

from chatd.events import Message
from chatd.hub import Hub
from chatd.store import MemoryStore, SQLiteStore, Stored, StoreUnavailable
from chatd.validate import ChatError, Limits


def _now() -> float:
    return reactor.seconds()


async def add(store, room: str, text: str, client_id: str | None = None, user: str = "u") -> Stored:
    return await store.add(room, user, text, _now(), "test", client_id)


@pytest.fixture
def db_path(tmp_path) -> str:
    return str(tmp_path / "data" / "chatd.sqlite3")


def opened(path: str, **kwargs) -> SQLiteStore:
    store = SQLiteStore(reactor, path, **kwargs)
    store.open()
    return store


@pytest_twisted.ensureDeferred
async def test_sqlite_keeps_messages_and_seq_across_a_restart(db_path: str) -> None:
    store = opened(db_path)
    first = [await add(store, "r", f"m{i}") for i in range(3)]
    assert [s.message.seq for s in first] == [1, 2, 3]
    assert not any(s.duplicate for s in first)
    await store.close()

    again = opened(db_path)
    assert [m.text for m in (await again.read_recent("r", 10))] == ["m0", "m1", "m2"]
    assert [m.id for m in (await again.read_recent("r", 10))] == [s.message.id for s in first]
    assert (await again.read_since("r", 0)).last_seq == 3
    assert (await add(again, "r", "after")).message.seq == 4
    await again.close()


@pytest_twisted.ensureDeferred
async def test_the_data_directory_is_created(tmp_path) -> None:
    path = str(tmp_path / "a" / "b" / "chatd.sqlite3")
    store = opened(path)
    await add(store, "r", "x")
    await store.close()
    assert os.path.isfile(path)


@pytest_twisted.ensureDeferred
async def test_an_add_fires_only_once_the_row_is_committed(db_path: str) -> None:
    """Acknowledged means stored: the Deferred waits for the writer thread's commit."""
    store = opened(db_path, inline=False)
    gate = threading.Event()
    real_write = store._write

    def held_write(*args):
        gate.wait(10)
        return real_write(*args)

    store._write = held_write
    d = defer.ensureDeferred(add(store, "r", "held"))
    await deferLater(0.05)
    assert not d.called, "acknowledged before it was written"
    assert store.recent("r", 5) == []
    gate.set()
    stored = await d
    rows = sqlite3.connect(db_path).execute("SELECT text, seq FROM messages").fetchall()
    assert rows == [("held", 1)]
    assert stored.message.seq == 1
    await store.close()


@pytest_twisted.ensureDeferred
async def test_an_add_written_on_the_reactor_is_committed_when_it_fires(db_path: str) -> None:
    """The same on the reactor: another connection sees the row from the add's first callback on."""
    store = opened(db_path)
    seen: list[list[tuple]] = []

    def look(stored: Stored) -> Stored:
        seen.append(sqlite3.connect(db_path).execute("SELECT text, seq FROM messages").fetchall())
        return stored

    stored = await store.add("r", "u", "now", _now(), "test").addCallback(look)
    assert seen == [[("now", 1)]]
    assert stored.message.seq == 1
    assert (store.inline_batches, store.batches) == (1, 1), "the write went to the thread"
    await store.close()


@pytest_twisted.ensureDeferred
async def test_a_file_locked_by_another_connection_sends_the_writes_to_the_thread_which_waits(db_path: str) -> None:
    """The reactor never waits for a lock: its transaction gives up at once and the thread waits instead."""
    store = opened(db_path)
    await add(store, "r", "one")
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # holds the write lock, as a backup or a second writer would
    try:
        held = [defer.ensureDeferred(add(store, "r", text)) for text in ("two", "three")]
        started = time.monotonic()
        await deferLater(0.2)
        assert time.monotonic() - started < 1, "the reactor waited for the lock"
        assert not any(d.called for d in held), "acknowledged while the file was locked"
        assert store.writes()["queued"] == 2, "/stats does not show the writes waiting for the lock"
        behind = defer.ensureDeferred(add(store, "r", "four"))  # behind the thread's writes, not beside them
    finally:
        other.execute("COMMIT")
        other.close()
    stored = await defer.gatherResults([*held, behind])
    assert [s.message.seq for s in stored] == [2, 3, 4]
    assert store.problem is None
    inline = store.inline_batches
    await add(store, "r", "five")  # the thread has caught up: the reactor writes again
    assert store.inline_batches == inline + 1
    await store.close()
    assert _rows(db_path, "r") == [1, 2, 3, 4, 5]


@pytest_twisted.ensureDeferred
async def test_slow_writes_on_the_reactor_send_the_writes_to_the_thread_for_a_while(db_path: str, monkeypatch) -> None:
    from twisted.logger import globalLogPublisher

    from chatd import store as store_module

    monkeypatch.setattr(store_module, "SLOW_WRITE", -1.0)  # every transaction counts as slow
    monkeypatch.setattr(store_module, "SLOW_WRITE_ALONE", 60.0)  # but none as slow as a stalled disk
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    store = opened(db_path)
    try:
        for i in range(5):
            await add(store, "r", f"m{i}")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert store_module.SLOW_WRITES == 3
    assert (store.inline_batches, store.batches) == (3, 5), "writes stayed on the reactor after slow ones"
    assert [e for e in seen if "writing from the writer thread" in e.get("log_format", "")]
    assert store.writes() == {"writer": "thread: writes were slow", "transactions": 5, "on_reactor": 3, "queued": 0}
    monkeypatch.setattr(store_module, "SLOW_WRITE", 60.0)
    store._slow_until = reactor.seconds()  # the hold-off is over
    await add(store, "r", "back")
    assert store.writes() == {"writer": "reactor", "transactions": 6, "on_reactor": 4, "queued": 0}
    await store.close()
    assert _rows(db_path, "r") == [1, 2, 3, 4, 5, 6]


@pytest_twisted.ensureDeferred
async def test_one_slow_write_alone_keeps_the_writes_on_the_reactor(db_path: str, monkeypatch) -> None:
    """A transaction preempted once on a busy machine is no slow disk (it moved every write to the thread for 30 s)."""
    from chatd import store as store_module

    store = opened(db_path)
    real_write = store._write
    slow = [True]

    def once_slow(*args, **kwargs):
        if slow[0]:
            slow[0] = False
            time.sleep(2 * store_module.SLOW_WRITE)  # as long as a preemption
        return real_write(*args, **kwargs)

    store._write = once_slow
    for i in range(4):
        await add(store, "r", f"m{i}")
    assert (store.inline_batches, store.batches) == (4, 4)
    await store.close()


@pytest_twisted.ensureDeferred
async def test_a_room_read_back_in_the_turn_a_message_was_added_holds_that_message(db_path: str) -> None:
    """A write waiting for the end of the turn goes to the thread ahead of a read queued after it.

    Else the thread could read the room before the reactor commits the
    write, and answer after its acknowledgement: a window without an
    acknowledged message, and a resume with a gap.
    """
    store = opened(db_path)
    for i in range(3):
        await add(store, "r", f"m{i}")
    await store.close()
    again = opened(db_path)  # "r" is not in memory
    added = defer.ensureDeferred(add(again, "r", "new"))
    resume = again.read_since("r", 0)
    stored = await added
    assert stored.message.seq == 4
    assert [m.text for m in (await resume).messages] == ["m0", "m1", "m2", "new"]
    await again.close()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("inline", [True, False], ids=["reactor", "thread"])
async def test_a_write_that_fails_outside_sqlite_lets_the_lock_go_and_fails_only_its_batch(db_path: str, inline: bool) -> None:
    """Text SQLite cannot take (a lone surrogate: UnicodeEncodeError, not sqlite3.Error) is refused, and nothing else."""
    store = opened(db_path, inline=inline)
    await add(store, "r", "one")
    with pytest.raises(StoreUnavailable, match="not stored"):
        await add(store, "r", "bad \ud800")
    other = sqlite3.connect(db_path, isolation_level=None, timeout=0)
    other.execute("BEGIN IMMEDIATE")  # the write lock was let go
    other.execute("ROLLBACK")
    other.close()
    assert (await add(store, "r", "two")).message.seq == 2
    await store.close()
    assert _rows(db_path, "r") == [1, 2]


@pytest_twisted.ensureDeferred
async def test_a_burst_in_one_turn_is_not_one_transaction_on_the_reactor(db_path: str) -> None:
    """Many clients sending in one turn: the reactor commits at most ``BATCH`` messages or ``INLINE_MAX_BYTES`` itself.

    Unbounded, 2,000 messages of 4 KB added in one turn were one transaction
    on the reactor, which stalled it for all of its length, and which, slow
    only for its size, sent every write to the thread as if the disk were slow.
    """
    from chatd import store as store_module

    store = opened(db_path)
    await add(store, "warm", "x")
    on_reactor: list[tuple[int, int]] = []
    real_write = store._write

    def counted(db, seqs, writes, prunes, wait=True):
        if threading.current_thread() is threading.main_thread():
            on_reactor.append((len(writes), sum(len(m.text) for m, _, _ in writes)))
        return real_write(db, seqs, writes, prunes, wait)

    store._write = counted
    burst = [store.add(f"room{i % 200}", "u", "x" * 4096, _now(), "test") for i in range(2000)]
    stored = await defer.gatherResults(burst)
    assert [s.message.seq for s in stored if s.message.room == "room0"] == list(range(1, 11))
    assert on_reactor == [], "a burst was committed on the reactor"
    big = store_module.INLINE_MAX_BYTES // 4096 + 1  # fewer than BATCH, but more text than a turn may commit
    await defer.gatherResults([store.add("big", "u", "x" * 4096, _now(), "test") for i in range(big)])
    assert on_reactor == []
    await defer.gatherResults([store.add("small", "u", "x" * 100, _now(), "test") for i in range(100)])
    assert on_reactor == [(100, 100 * 100)], "an ordinary turn's writes left the reactor"
    await store.close()
    assert len(_rows(db_path, "room0")) == 10


def deferLater(seconds: float) -> defer.Deferred:
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_many_adds_share_a_transaction_and_keep_their_order(db_path: str) -> None:
    store = opened(db_path)
    results = await defer.gatherResults(
        [defer.ensureDeferred(add(store, f"r{i % 3}", f"m{i}")) for i in range(300)]
    )
    for room in ("r0", "r1", "r2"):
        seqs = [s.message.seq for s in results if s.message.room == room]
        assert seqs == list(range(1, 101))
    assert store.batches < 300, "every message had a transaction of its own"
    await store.close()


@pytest_twisted.ensureDeferred
async def test_retention_by_count_bounds_the_file_and_the_window(db_path: str) -> None:
    store = opened(db_path, limit=5)
    for i in range(20):
        await add(store, "r", f"m{i}")
    assert [m.seq for m in (await store.read_recent("r", 100))] == [16, 17, 18, 19, 20]
    await store.close()
    rows = sqlite3.connect(db_path).execute("SELECT seq FROM messages ORDER BY seq").fetchall()
    assert [r[0] for r in rows] == [16, 17, 18, 19, 20]


@pytest_twisted.ensureDeferred
async def test_retention_by_age_drops_old_messages_but_seq_goes_on(db_path: str) -> None:
    clock = Clock()
    clock.advance(_now())
    store = SQLiteStore(reactor, db_path, limit=100, max_age=60)
    store.clock = clock
    store.open()
    await store.add("r", "u", "old", clock.seconds(), "test", None)
    clock.advance(61)
    await store.add("r", "u", "new", clock.seconds(), "test", None)
    store.prune()
    assert [m.text for m in await store.read_recent("r", 10)] == ["new"]
    resume = await store.read_since("r", 0)
    assert ([m.text for m in resume.messages], resume.first_kept, resume.truncated) == (["new"], 2, True)
    await store.close()
    rows = sqlite3.connect(db_path).execute("SELECT text FROM messages").fetchall()
    assert rows == [("new",)]
    clock.advance(61)
    again = SQLiteStore(reactor, db_path, limit=100, max_age=60)
    again.clock = clock
    again.open()
    assert (await again.read_recent("r", 10)) == []
    assert (await again.add("r", "u", "later", clock.seconds(), "test", None)).message.seq == 3
    await again.close()


@pytest_twisted.ensureDeferred
async def test_a_client_id_is_stored_once_even_across_a_restart(db_path: str) -> None:
    store = opened(db_path)
    original = await add(store, "r", "hello", client_id="c-1")
    retry = await add(store, "r", "hello again", client_id="c-1")
    assert retry.duplicate
    assert (retry.message.id, retry.message.seq) == (original.message.id, original.message.seq)
    other_room = await add(store, "s", "hello", client_id="c-1")
    assert not other_room.duplicate
    await store.close()

    again = opened(db_path)
    after = await add(again, "r", "hello", client_id="c-1")
    assert after.duplicate and after.message.id == original.message.id
    assert (await again.read_since("r", 0)).last_seq == 1
    await again.close()
    count = sqlite3.connect(db_path).execute("SELECT count(*) FROM messages WHERE room='r'").fetchone()
    assert count == (1,)


@pytest_twisted.ensureDeferred
async def test_a_retry_while_the_original_is_still_being_written_gets_the_original(db_path: str) -> None:
    store = opened(db_path)
    first = defer.ensureDeferred(add(store, "r", "x", client_id="same"))
    second = defer.ensureDeferred(add(store, "r", "x", client_id="same"))
    a, b = await first, await second
    assert not a.duplicate and b.duplicate
    assert a.message.id == b.message.id
    assert (await store.read_since("r", 0)).last_seq == 1
    await store.close()


@pytest_twisted.ensureDeferred
async def test_a_failed_write_is_an_error_and_hands_out_no_seq(db_path: str) -> None:
    store = opened(db_path)
    await add(store, "r", "one")
    real_write = store._write

    def broken(db, seqs, writes, prunes):
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO rooms VALUES ('r', 99) ON CONFLICT (room) DO UPDATE SET last_seq = 99")
        db.execute("INSERT INTO nowhere VALUES (1)")  # fails: no such table

    def failing(db, seqs, writes, prunes, wait=True):
        try:
            broken(db, seqs, writes, prunes)
        except sqlite3.Error:
            db.execute("ROLLBACK")
        return [(d, StoreUnavailable("message not stored: disk trouble")) for _, _, d in writes], "disk trouble"

    store._write = failing
    with pytest.raises(StoreUnavailable, match="not stored"):
        await add(store, "r", "lost")
    assert store.problem == "history store: disk trouble", "a failing store must make /health 503"
    store._write = real_write
    assert (await add(store, "r", "two")).message.seq == 2
    assert store.problem is None
    await store.close()


@pytest_twisted.ensureDeferred
async def test_hub_publish_acknowledges_after_storing_and_delivers_in_order(db_path: str) -> None:
    store = opened(db_path, limit=10)
    hub = Hub(reactor, limits=Limits(history_limit=10), store=store)
    hub.startService()
    from tests.test_hub import FakeSession

    watcher = FakeSession("watcher")
    hub.connect(watcher)
    hub.join(watcher, "r")
    sent = await defer.gatherResults([hub.publish("r", "alice", f"m{i}", "fake") for i in range(50)])
    assert [m.seq for m in sent] == list(range(1, 51))
    assert [m.seq for m in watcher.messages()] == list(range(1, 51))
    again = await hub.publish("r", "alice", "retry", "fake", client_id="k")
    dup = await hub.publish("r", "alice", "retry", "fake", client_id="k")
    assert dup.id == again.id and dup.seq == again.seq == 51
    assert [m.seq for m in watcher.messages()][-1] == 51
    assert len(watcher.messages()) == 51, "the retry was delivered again"
    with pytest.raises(ChatError, match="client_id"):
        hub.publish("r", "alice", "x", "fake", client_id="x" * 65)
    await hub.stopService()


def test_memory_store_numbers_rooms_independently() -> None:
    store = MemoryStore(Clock(), limit=2)
    results: list = []
    for room in ("a", "a", "b", "a"):
        store.add(room, "u", "t", 0.0, "test").addCallback(results.append)
    assert [(s.message.room, s.message.seq) for s in results] == [("a", 1), ("a", 2), ("b", 1), ("a", 3)]
    assert [m.seq for m in store.recent("a", 10)] == [2, 3]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("inline", [True, False], ids=["reactor", "thread"])
async def test_a_client_id_sent_twice_in_one_transaction_is_stored_once(db_path: str, inline: bool) -> None:
    """The writer itself finds a retry batched with its original (the hub's in-flight check aside)."""
    store = opened(db_path, inline=inline)
    entered, gate = threading.Event(), threading.Event()
    real_write = store._write
    batches: list[list[str]] = []

    def held_write(db, seqs, writes, prunes, wait=True):
        entered.set()
        if not inline:
            gate.wait(10)
        batches.append([message.id for message, _, _ in writes])
        return real_write(db, seqs, writes, prunes, wait)

    first = Message("id-block", 0, "r", "u", "first", _now(), "test")
    if inline:  # a turn's writes are one transaction: the blocker's turn is over before the three are added
        await store._persist(first, None)
    store._write = held_write
    blocker = store._persist(first, None) if not inline else defer.succeed(None)
    if not inline:
        assert entered.wait(10)  # the writer holds the blocker's batch: what follows makes one batch
    waiting = [store._persist(Message(f"id{i}", 0, "r", "u", f"t{i}", _now(), "test"), "same") for i in range(2)]
    others = store._persist(Message("id2", 0, "r", "u", "other", _now(), "test"), None)
    gate.set()
    await blocker
    original, retry, other = await defer.gatherResults([*waiting, others])
    assert batches[-1] == ["id0", "id1", "id2"], "the three writes were not in one transaction"
    assert (original.duplicate, retry.duplicate, other.duplicate) == (False, True, False)
    assert (retry.message.id, retry.message.seq) == ("id0", 2)
    assert other.message.seq == 3
    await store.close()
    rows = sqlite3.connect(db_path).execute("SELECT seq, client_id FROM messages ORDER BY seq").fetchall()
    assert rows == [(1, None), (2, "same"), (3, None)]


def _rows(path: str, room: str) -> list[int]:
    query = "SELECT seq FROM messages WHERE room = ? ORDER BY seq"
    return [seq for (seq,) in sqlite3.connect(path).execute(query, (room,)).fetchall()]


@pytest_twisted.ensureDeferred
async def test_retention_bounds_the_file_to_limit_plus_slack_and_reads_see_only_limit(db_path: str) -> None:
    store = opened(db_path, limit=20)
    slack = store._slack()
    assert slack > 1
    most = 0
    for i in range(1, 80):
        await add(store, "r", f"m{i}")
        seqs = _rows(db_path, "r")
        assert seqs == list(range(seqs[0], i + 1)), "a kept row is missing"
        assert seqs[0] <= max(1, i - 20 + 1), "a row of the last limit messages was deleted"
        assert len(seqs) < 20 + slack
        most = max(most, len(seqs))
    assert most > 20, "never more than limit rows: nothing is saved"
    await store.close()

    again = opened(db_path, limit=20)
    assert [m.seq for m in await again.read_recent("r", 100)] == list(range(60, 80))
    resume = await again.read_since("r", 0)
    assert ([m.seq for m in resume.messages], resume.first_kept, resume.truncated) == (list(range(60, 80)), 60, True)
    assert (await add(again, "r", "after a restart")).message.seq == 80
    await again.close()


@pytest_twisted.ensureDeferred
async def test_a_client_id_past_the_limit_is_not_a_duplicate_even_while_its_row_waits_to_be_trimmed(
    db_path: str,
) -> None:
    store = opened(db_path, limit=20)
    first = await add(store, "r", "old", client_id="k")
    for i in range(20):
        await add(store, "r", f"m{i}")
    assert 1 in _rows(db_path, "r"), "the old row is already gone: this tests nothing"
    await store.close()

    again = opened(db_path, limit=20)  # the room is not in memory: the writer looks the client id up
    retry = await add(again, "r", "old", client_id="k")
    assert not retry.duplicate and retry.message.id != first.message.id and retry.message.seq == 22
    await again.close()


@pytest_twisted.ensureDeferred
async def test_seq_survives_a_restart_after_trimming_and_age_pruning(db_path: str) -> None:
    clock = Clock()
    clock.advance(_now())
    store = SQLiteStore(reactor, db_path, limit=20, max_age=60)
    store.clock = clock
    store.open()
    for i in range(35):
        await store.add("r", "u", f"m{i}", clock.seconds(), "test", None)
    clock.advance(61)
    store.prune()
    await store.close()
    assert _rows(db_path, "r") == []

    again = SQLiteStore(reactor, db_path, limit=20, max_age=60)
    again.clock = clock
    again.open()
    assert (await again.read_since("r", 0)).last_seq == 35
    assert (await again.add("r", "u", "later", clock.seconds(), "test", None)).message.seq == 36
    await again.close()


@pytest_twisted.ensureDeferred
async def test_a_rooms_row_is_written_only_when_its_last_seq_could_be_lost(db_path: str) -> None:
    """A room's last seq is its newest row's: writing ``rooms`` with every message wrote one more page a commit."""
    store = opened(db_path, limit=20)  # trimmed every 2 messages past 20
    for i in range(9):
        await add(store, "r", f"m{i}")
    writes = store.batches
    assert store._db.execute("SELECT last_seq FROM rooms WHERE room = 'r'").fetchall() == [(1,)]  # its first only
    await store.close()
    assert store.batches == writes
    file = sqlite3.connect(db_path)
    # A clean close notes every room's last seq: a chatd from before _LAST_SEQ numbers from the row alone.
    assert file.execute("SELECT last_seq FROM rooms WHERE room = 'r'").fetchall() == [(9,)]
    file.close()

    again = opened(db_path, limit=20)
    assert (await again.read_since("r", 0)).last_seq == 9
    for i in range(9, 23):
        assert (await add(again, "r", f"m{i}")).message.seq == i + 1
    # seq 22 was a trim: the row went with it; 23 was not
    assert again._db.execute("SELECT last_seq FROM rooms WHERE room = 'r'").fetchall() == [(22,)]
    await again.close()


@pytest_twisted.ensureDeferred
async def test_a_file_from_before_keeps_its_messages_and_loses_the_time_index(db_path: str) -> None:
    """Older files carry an index on ``time`` that every write paid for; opening drops it, nothing else."""
    store = opened(db_path)
    await add(store, "r", "kept")
    await store.close()
    sqlite3.connect(db_path, isolation_level=None).execute("CREATE INDEX messages_time ON messages (time)")

    again = opened(db_path)
    assert (await add(again, "r", "after")).message.seq == 2
    assert [m.text for m in await again.read_recent("r", 10)] == ["kept", "after"]
    await again.close()
    names = {n for (n,) in sqlite3.connect(db_path).execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "messages_time" not in names and "messages_client_id" in names


@pytest_twisted.ensureDeferred
async def test_a_slow_checkpoint_holds_up_no_write(db_path: str, monkeypatch) -> None:
    """Copying the WAL into the file runs on its own thread: writes are acknowledged meanwhile."""
    from chatd import store as store_module

    monkeypatch.setattr(store_module, "CHECKPOINT_INTERVAL", 0.02)
    started, release = threading.Event(), threading.Event()
    real = SQLiteStore._checkpoint

    def slow(db):
        started.set()
        release.wait(20)
        return real(db)

    monkeypatch.setattr(SQLiteStore, "_checkpoint", staticmethod(slow))
    store = opened(db_path)
    try:
        await add(store, "r", "first")
        assert await threads.deferToThread(started.wait, 10), "no checkpoint was started"
        stored = [await add(store, f"room{i % 7}", f"m{i}") for i in range(50)]  # while it is held up
        assert [s.message.seq for s in stored if s.message.room == "room0"] == list(range(1, 9))
    finally:
        release.set()
        await store.close()


@pytest_twisted.ensureDeferred
async def test_the_wal_is_copied_into_the_file_and_started_again_under_steady_writes(db_path: str, monkeypatch) -> None:
    """Without the writer's restart the WAL would only grow: every commit lands while a copy runs."""
    from chatd import store as store_module

    monkeypatch.setattr(store_module, "CHECKPOINT_INTERVAL", 0.02)
    monkeypatch.setattr(store_module, "WAL_RESTART_PAGES", 20)
    store = opened(db_path)
    wal = db_path + "-wal"
    try:
        for i in range(300):
            await add(store, f"room{i % 50}", "x" * 500)
            await deferLater(0.003)
        frames = os.path.getsize(wal) // 4096
        # 300 commits of two or three pages each: 600+ frames if the WAL never started again
        assert frames < 300, f"the WAL grew to {frames} pages"
    finally:
        await store.close()
    # Everything is in the file itself, read without the WAL.
    file_only = sqlite3.connect(f"file:{db_path}?immutable=1", uri=True)
    (count,) = file_only.execute("SELECT count(*) FROM messages").fetchone()
    assert count == 300


def test_starting_the_wal_again_does_not_wait_for_a_reader_in_another_process(db_path: str) -> None:
    """With a reader in the WAL, the writer's restart gives up at once instead of waiting out the busy timeout."""
    store = SQLiteStore(reactor, db_path)  # not opened: its writer's connection is driven here
    os.makedirs(os.path.dirname(db_path), exist_ok=True)
    writer = store._connect()
    writer.execute("PRAGMA wal_autocheckpoint = 0")
    writer.execute("INSERT INTO rooms VALUES ('r', 1)")
    reader = sqlite3.connect(db_path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM rooms").fetchone()  # a read transaction on the WAL's frames
    writer.execute("INSERT INTO rooms VALUES ('s', 1)")
    try:
        started = time.monotonic()
        store._restart_wal(writer)
        assert time.monotonic() - started < 1, "the writer waited for the reader"
        writer.execute("INSERT INTO rooms VALUES ('t', 1)")  # and it writes on
    finally:
        reader.execute("COMMIT")
        reader.close()
        writer.close()


@pytest_twisted.ensureDeferred
async def test_the_wal_is_started_again_while_the_reactor_writes_without_pause(db_path: str, monkeypatch) -> None:
    """A reactor busy writing (a commit every turn) must not keep the WAL from starting again.

    When the checkpointer restarted the WAL itself, without waiting for the
    write lock, it got the GIL back mostly while the reactor was inside
    SQLite, holding that lock: every attempt found it taken, and the WAL
    (which keeps its size once grown) grew by every commit for as long as
    the traffic lasted (1.3 GB in 14 s at one message a turn). The writer
    thread restarts it now, the writes going to it meanwhile.
    """
    from chatd import store as store_module

    monkeypatch.setattr(store_module, "CHECKPOINT_INTERVAL", 0.02)
    monkeypatch.setattr(store_module, "WAL_RESTART_PAGES", 20)
    monkeypatch.setattr(store_module, "SLOW_WRITE", 60.0)  # a fast disk: the writes stay on the reactor
    store = opened(db_path)
    wal = db_path + "-wal"
    try:
        count = 0
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            await add(store, f"room{count % 50}", "x" * 200)
            count += 1
        frames = os.path.getsize(wal) // 4096
        assert store.inline_batches >= count * 0.9, "the writes left the reactor"
        # Two or three pages a commit: never started again, the WAL holds about one page per commit (measured
        # 0.95); started again at each copy, a third of that, whatever the machine's speed.
        assert frames < count / 2, f"the WAL grew to {frames} pages over {count} commits"
    finally:
        await store.close()



@pytest_twisted.ensureDeferred
async def test_the_wal_restart_leaves_the_writes_on_the_reactor(db_path: str, monkeypatch) -> None:
    """Writes held for the WAL's restart are committed by the reactor, not handed to the thread.

    The turn that saw the WAL copied used to send its writes to the writer
    thread with the restart, and every write after them followed while the
    thread had any outstanding: under steady traffic (several messages a
    turn) a cascade of small hand-offs, a fifth of W2's transactions.
    """
    from chatd import store as store_module

    monkeypatch.setattr(store_module, "CHECKPOINT_INTERVAL", 0.02)
    monkeypatch.setattr(store_module, "WAL_RESTART_PAGES", 20)
    monkeypatch.setattr(store_module, "SLOW_WRITE", 60.0)  # a fast disk: the writes stay on the reactor
    store = opened(db_path)
    restarts = []
    real_restart = store._restart_wal

    def counted(db):
        restarts.append(1)
        real_restart(db)

    store._restart_wal = counted
    added: list[defer.Deferred] = []
    try:
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            for _ in range(5):  # five messages a turn, none waited for
                d = store.add("r" + str(len(added) % 40), "u", "x" * 300, 1.0, "test")
                added.append(d)
            await deferLater(0.002)
        stored = await defer.gatherResults(added)
        assert len(restarts) >= 3, "no WAL restart happened: nothing was tested"
        assert store.batches - store.inline_batches == 0, (
            f"{store.batches - store.inline_batches} of {store.batches} transactions ran on the thread"
        )
        for room in {s.message.room for s in stored}:
            seqs = [s.message.seq for s in stored if s.message.room == room]
            assert seqs == list(range(1, len(seqs) + 1))
        assert os.path.getsize(db_path + "-wal") // 4096 < len(added) / 5
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_a_checkpoint_that_fails_while_catching_up_does_not_stop_the_checkpointer(db_path: str, monkeypatch) -> None:
    """A disk error in the catch-up copies must be handled like one in the first copy: warned, tried again."""
    from chatd import store as store_module

    monkeypatch.setattr(store_module, "CHECKPOINT_INTERVAL", 0.02)
    monkeypatch.setattr(store_module, "WAL_RESTART_PAGES", 20)

    class Flaky:  # the checkpointer's connection: its next copy fails once, as on a disk that errs now and then
        def __init__(self, db):
            self.db, self.fail_next = db, False

        def execute(self, sql, *args):
            if self.fail_next and "wal_checkpoint" in sql:
                self.fail_next = False
                raise sqlite3.OperationalError("disk I/O error")
            return self.db.execute(sql, *args)

        def close(self):
            self.db.close()

    real_checkpoint = SQLiteStore._checkpoint
    failed = []

    def checkpoint(db):
        frames, copied = real_checkpoint(db)
        if frames >= store_module.WAL_RESTART_PAGES and copied == frames and not failed:
            failed.append(1)
            db.fail_next = True  # the first catch-up copy fails
        return frames, copied

    monkeypatch.setattr(SQLiteStore, "_checkpoint", staticmethod(checkpoint))
    real_checkpoints = SQLiteStore._checkpoints

    def checkpoints(self):
        self._checkpoint_db = Flaky(self._checkpoint_db)
        real_checkpoints(self)

    monkeypatch.setattr(SQLiteStore, "_checkpoints", checkpoints)
    store = opened(db_path)
    try:
        for i in range(400):
            await store.add(f"room{i % 50}", "u", "x" * 500, _now(), "test")
            await deferLater(0.002)
        assert failed, "no catch-up copy was made: nothing was tested"
        assert store._checkpointer.is_alive(), "one failed copy ended the checkpointer thread"
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("inline", [True, False], ids=["reactor", "thread"])
async def test_a_room_another_process_wrote_and_trimmed_gets_no_seq_twice(db_path: str, inline: bool) -> None:
    """Two chatds on one file (one draining, one started): a cached seq must not be handed out again.

    The other store numbered 6-10 and trimmed rows up to 8; this one's
    cache still said 5, and its insert of seq 6 met no row to collide
    with: seq 6 acknowledged twice, for two messages.
    """
    first = opened(db_path, limit=2, inline=inline)
    second = opened(db_path, limit=2, inline=inline)
    try:
        assert [(await add(first, "r", f"a{i}")).message.seq for i in range(5)] == [1, 2, 3, 4, 5]
        assert [(await add(second, "r", f"b{i}")).message.seq for i in range(5)] == [6, 7, 8, 9, 10]
        assert (await add(first, "r", "a5")).message.seq == 11
    finally:
        await first.close()
        await second.close()


@pytest_twisted.ensureDeferred
async def test_a_probe_clears_the_problem_once_the_file_takes_writes_again(db_path: str, monkeypatch) -> None:
    """/health 503 must end when the disk is back, even if nobody sends (a load balancer stops sending them).

    The probe's transaction succeeded, but ``_resolve`` cleared ``problem``
    only when the batch had results, which a probe alone never has: after a
    full disk was given space again, /health stayed 503 until some client
    happened to send a message (10 s and counting in a daemon on a tmpfs).
    """
    from chatd import store as store_module

    monkeypatch.setattr(store_module, "PROBE_INTERVAL", 0.05)
    store = opened(db_path)
    await add(store, "r", "one")
    real_write = store._write

    def failing(db, seqs, writes, prunes, wait=True):
        return [(d, StoreUnavailable("message not stored: disk full")) for _, _, d in writes], "disk full"

    store._write = failing
    with pytest.raises(StoreUnavailable):
        await add(store, "r", "lost")
    assert store.problem == "history store: disk full"
    store._write = real_write  # space is back; nobody sends
    try:
        for _ in range(40):
            await deferLater(0.05)
            if store.problem is None:
                break
        assert store.problem is None, "the probe's write worked, but /health stays 503 until someone sends"
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("inline", [True, False], ids=["reactor", "thread"])
async def test_a_room_another_connection_wrote_is_writable_again_after_one_failed_batch(db_path: str, inline: bool) -> None:
    """The writers' cache of last seqs must not outlive a failed transaction.

    Another connection (a second chatd started on the same --data-dir during a
    restart, an operator's tool) adds a row to a room this process has cached:
    the next transaction numbers from the stale cache and fails on the primary
    key. The cache was only updated on success, so every later write to that
    room failed the same way, for as long as the process ran (and took every
    other room's messages in its batch with it).
    """
    store = opened(db_path, inline=inline)
    await add(store, "r", "one")  # seq 1, cached
    other = opened(db_path)
    assert (await add(other, "r", "elsewhere")).message.seq == 2
    await other.close()
    outcomes = []
    for text in ("two", "three", "four"):
        try:
            outcomes.append((await add(store, "r", text)).message.seq)
        except StoreUnavailable:
            outcomes.append(None)
    # At most the first fails (numbered from the stale cache); it hands out no seq, and the room goes on.
    assert outcomes in ([3, 4, 5], [None, 3, 4]), outcomes
    await store.close()
    assert _rows(db_path, "r") == [1, 2, *(s for s in outcomes if s)]


@pytest_twisted.ensureDeferred
async def test_a_disk_that_fails_now_and_then_keeps_one_probe_going(db_path: str, monkeypatch) -> None:
    """A write failing after a success had cleared ``problem`` started another probe chain beside the running one.

    Each chain reschedules itself while ``problem`` is set, so on a disk that
    takes some writes and not others (nearly full: small ones fit) the chains
    piled up, each queueing a probe to the writer thread every interval.
    """
    from chatd import store as store_module

    monkeypatch.setattr(store_module, "PROBE_INTERVAL", 0.2)
    store = opened(db_path)
    real_write = store._write

    def nearly_full(db, seqs, writes, prunes, wait=True):
        if writes and writes[0][0].text == "big":
            return [(d, StoreUnavailable("message not stored: disk full")) for _, _, d in writes], "disk full"
        return real_write(db, seqs, writes, prunes, wait)

    store._write = nearly_full
    for _ in range(6):
        with pytest.raises(StoreUnavailable):
            await add(store, "r", "big")
        await add(store, "r", "small")
        with pytest.raises(StoreUnavailable):
            await add(store, "r", "big")
        await deferLater(0.05)
    probes = [c for c in reactor.getDelayedCalls() if getattr(c.func, "__self__", None) is store]
    try:
        assert len(probes) <= 1, f"{len(probes)} probe chains running"
    finally:
        await store.close()
        for call in probes:
            if call.active():
                call.cancel()
