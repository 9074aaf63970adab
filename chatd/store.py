"""Where messages are kept: every room's recent window in memory, and the store behind it.

The hub numbers, stores and fans out a message through one object, the
store, whatever backs it:

* :class:`MemoryStore` keeps the windows only (unit tests, ``--data-dir ''``);
* :class:`SQLiteStore` (the default) writes a file under ``--data-dir`` from
  one writer thread with group commit, so the reactor never waits on disk;
* ``chatd.redis.RedisStore`` (``--redis``) numbers and keeps messages in
  Redis, shared by every process.

The store, not the hub, hands out ``seq``: a message gets its number in the
same step that makes it durable (the writer's transaction, a Redis script),
so a failed write leaves no gap and two processes never share a number.
:meth:`Store.add` fires once the message is stored; only then is it put in
the room's window and fanned out, and only then is the sender told ``sent``.

Reads (``history``, ``since`` for resume, duplicate ``client_id`` look-ups)
come from the in-memory windows and never wait. A window holds what the
retention keeps (``--history-limit`` messages, none older than
``--history-max-age``), so a read from it is exact: when part of what a
client asks for has gone, :meth:`Store.since` says from which ``seq`` on
messages are still kept and the adapters tell the client.
"""

from __future__ import annotations

import os
import queue
import sqlite3
import tempfile
import threading
import uuid
from collections import deque
from typing import Any, NamedTuple

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from chatd.events import Message
from chatd.validate import ChatError

log = Logger()


class StoreUnavailable(ChatError):
    """The store could not keep a message: it was not stored, not delivered, not acknowledged."""


class Stored(NamedTuple):
    """The outcome of :meth:`Store.add`."""

    message: Message
    #: the same ``client_id`` was stored before: ``message`` is that original
    duplicate: bool


class Resume(NamedTuple):
    """What :meth:`Store.since` can give back to a client resuming after ``seq``."""

    messages: list[Message]
    #: the oldest ``seq`` still kept; messages after the client's ``seq`` and before this are gone
    first_kept: int
    #: True when some of what the client missed is older than the retention kept
    truncated: bool


class _Window:
    """One room in memory: its newest kept messages, their client ids, its last ``seq``."""

    __slots__ = ("messages", "client_ids", "last_seq")

    def __init__(self, last_seq: int = 0) -> None:
        self.messages: deque[Message] = deque()
        self.client_ids: dict[str, Message] = {}
        self.last_seq = last_seq


class Store:
    """The windows and the rules every backend shares; subclasses make messages durable.

    Runs on the reactor thread. A subclass implements :meth:`_persist` (and
    usually :meth:`load`/:meth:`close`); it must fire its Deferreds in the
    order messages were added to one room, with ``seq`` filled in.
    """

    #: a stored message enters its window when its add fires (False: the backend puts it there)
    keeps_on_ack = True

    def __init__(self, clock: IReactorTime, limit: int = 100, max_age: float = 0.0) -> None:
        self.clock = clock
        self.limit = limit
        self.max_age = max_age
        self._windows: dict[str, _Window] = {}
        #: (room, client_id) of an add not yet stored -> the retries waiting for it
        self._in_flight: dict[tuple[str, str], list[defer.Deferred]] = {}
        #: what :meth:`add` failed with last, and whether the store works now
        self.problem: str | None = None

    # -- life ------------------------------------------------------------------

    def load(self) -> defer.Deferred:
        """Read what is kept into the windows; fires once reads are exact."""
        return defer.succeed(None)

    def close(self) -> defer.Deferred:
        """Finish every write already accepted, then stop."""
        return defer.succeed(None)

    def check(self) -> defer.Deferred:
        """A real round trip to the backend; fails with the reason it is unusable."""
        return defer.succeed(None)

    # -- writes ------------------------------------------------------------------

    def add(
        self,
        room: str,
        user: str,
        text: str,
        time: float,
        protocol: str,
        client_id: str | None = None,
    ) -> defer.Deferred:
        """Number and keep one message; fires with :class:`Stored` once it is durable.

        A ``client_id`` seen before in this room (kept, or still being
        written) gives back the original message, marked duplicate, and
        stores nothing.
        """
        if client_id:
            window = self._windows.get(room)
            original = window.client_ids.get(client_id) if window is not None else None
            if original is not None:
                return defer.succeed(Stored(original, True))
            waiting = self._in_flight.get((room, client_id))
            if waiting is not None:
                retry: defer.Deferred = defer.Deferred()
                waiting.append(retry)
                return retry
        message = Message(uuid.uuid4().hex, 0, room, user, text, time, protocol)
        key = (room, client_id) if client_id else None
        retries: list[defer.Deferred] = []
        if key is not None:
            self._in_flight[key] = retries

        def stored(result: Stored) -> Stored:
            if key is not None:
                self._in_flight.pop(key, None)
            if not result.duplicate and self.keeps_on_ack:
                self.keep(result.message, client_id)
            for retry in retries:
                retry.callback(Stored(result.message, True))
            return result

        def failed(failure: Any) -> Any:
            if key is not None:
                self._in_flight.pop(key, None)
            for retry in retries:
                retry.errback(failure)
            return failure

        return self._persist(message, client_id).addCallbacks(stored, failed)

    def _persist(self, message: Message, client_id: str | None) -> defer.Deferred:
        """Make ``message`` durable and give it its ``seq``; fires with :class:`Stored`."""
        window = self._window(message.room)
        message.seq = window.last_seq + 1
        return defer.succeed(Stored(message, False))

    # -- the windows --------------------------------------------------------------

    def _window(self, room: str) -> _Window:
        window = self._windows.get(room)
        if window is None:
            window = self._windows[room] = _Window()
        return window

    def keep(self, message: Message, client_id: str | None = None) -> bool:
        """Put a stored message at the end of its room's window (False if it is there already)."""
        window = self._window(message.room)
        if message.seq <= window.last_seq:
            return False
        window.last_seq = message.seq
        self._append(window, message, client_id)
        return True

    def _append(self, window: _Window, message: Message, client_id: str | None) -> None:
        window.messages.append(message)
        if client_id:
            message.client_id = client_id
            window.client_ids[client_id] = message
        while len(window.messages) > self.limit:
            self._drop_oldest(window)

    def _drop_oldest(self, window: _Window) -> None:
        old = window.messages.popleft()
        if old.client_id:
            window.client_ids.pop(old.client_id, None)

    def prune(self) -> None:
        """Drop from the windows what is older than ``max_age`` (rooms keep their ``seq``)."""
        if not self.max_age:
            return
        cutoff = self.clock.seconds() - self.max_age
        for window in self._windows.values():
            while window.messages and window.messages[0].time < cutoff:
                self._drop_oldest(window)

    def recent(self, room: str, limit: int) -> list[Message]:
        """The last ``limit`` kept messages of ``room``, oldest first."""
        window = self._windows.get(room)
        if window is None or limit <= 0:
            return []
        messages = window.messages
        if limit >= len(messages):
            return list(messages)
        return list(messages)[-limit:]

    def since(self, room: str, seq: int) -> Resume:
        """Every kept message after ``seq``, and whether some after it are gone."""
        window = self._windows.get(room)
        if window is None:
            return Resume([], 1, seq > 0)
        messages = window.messages
        first = messages[0].seq if messages else window.last_seq + 1
        if seq > window.last_seq:
            # The client saw a seq this room never reached (its history was
            # reset): its numbering means nothing here. Everything kept, flagged.
            return Resume(list(messages), first, True)
        missed = [m for m in messages if m.seq > seq] if seq < window.last_seq else []
        return Resume(missed, first, seq + 1 < first and seq < window.last_seq)

    def last_seq(self, room: str) -> int:
        window = self._windows.get(room)
        return window.last_seq if window is not None else 0

    def rooms(self) -> int:
        return len(self._windows)


class MemoryStore(Store):
    """Windows only: nothing survives a restart (unit tests, or ``--data-dir`` empty)."""


# -- SQLite ------------------------------------------------------------------------

_SCHEMA = """
PRAGMA journal_mode = WAL;
CREATE TABLE IF NOT EXISTS rooms (
    room TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    room TEXT NOT NULL,
    seq INTEGER NOT NULL,
    id TEXT NOT NULL,
    user TEXT NOT NULL,
    text TEXT NOT NULL,
    time REAL NOT NULL,
    protocol TEXT NOT NULL,
    client_id TEXT,
    PRIMARY KEY (room, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS messages_time ON messages (time);
CREATE INDEX IF NOT EXISTS messages_client_id ON messages (room, client_id) WHERE client_id IS NOT NULL;
"""

#: how many queued writes one transaction takes at most
BATCH = 512
#: seconds between probes of a store that failed a write
PROBE_INTERVAL = 2.0
_STOP = object()


class SQLiteStore(Store):
    """Messages in one SQLite file, written by one thread with group commit.

    Every message waiting when the writer comes round goes into one
    transaction (``synchronous=NORMAL`` in WAL mode: a commit survives the
    process being killed, not a power loss),
    and their Deferreds fire together, in order, on the reactor. The writer
    gives each message its ``seq`` inside the transaction from the room's row
    in ``rooms``, so a failed transaction hands out nothing. Retention runs
    in the same transactions: a room keeps ``limit`` rows, and a periodic
    prune deletes rows older than ``max_age`` (the ``rooms`` row stays, so
    ``seq`` goes on).
    """

    def __init__(
        self,
        reactor: Any,
        path: str,
        limit: int = 100,
        max_age: float = 0.0,
        synchronous: str = "NORMAL",
    ) -> None:
        super().__init__(reactor, limit, max_age)
        self.reactor = reactor
        self.path = path
        self.synchronous = synchronous
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopped: defer.Deferred | None = None
        self.batches = 0

    # -- reactor side ------------------------------------------------------------

    def open(self) -> None:
        """Open (creating) the file and read every room's window; blocking, at start only.

        A directory that cannot be created or written, or a file SQLite
        cannot write, stops the start with one line (``StartupError``
        naming ``--data-dir``): found now, not at the first message.
        """
        from chatd.startup import StartupError

        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, exist_ok=True)
            with tempfile.TemporaryFile(dir=directory):
                pass
            db = self._connect()
        except (OSError, sqlite3.Error) as e:
            why = getattr(e, "strerror", None) or str(e)
            raise StartupError(f"--data-dir: cannot write the history file {self.path!r}: {why}") from None
        try:
            try:
                db.execute("BEGIN IMMEDIATE")  # takes the write lock: a read-only file fails here
                db.execute("ROLLBACK")
            except sqlite3.Error as e:
                raise StartupError(f"--data-dir: cannot write the history file {self.path!r}: {e}") from None
            self._load(db)
        finally:
            db.close()
        self._thread = threading.Thread(target=self._run, name="chatd-sqlite", daemon=True)
        self._thread.start()

    def load(self) -> defer.Deferred:
        if self._thread is None:
            self.open()
        return defer.succeed(None)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.executescript(_SCHEMA)
        db.execute(f"PRAGMA synchronous = {self.synchronous}")
        return db

    def _load(self, db: sqlite3.Connection) -> None:
        cutoff = self.clock.seconds() - self.max_age if self.max_age else None
        for room, last_seq in db.execute("SELECT room, last_seq FROM rooms"):
            self._windows[room] = _Window(last_seq)
        rows = db.execute(
            "SELECT room, seq, id, user, text, time, protocol, client_id FROM messages ORDER BY room, seq"
        )
        for room, seq, id_, user, text, time, protocol, client_id in rows:
            if cutoff is not None and time < cutoff:
                continue
            self._append(self._window(room), Message(id_, seq, room, user, text, time, protocol), client_id)
        log.info(
            "history: {rooms} rooms, {messages} messages kept in {path}",
            rooms=len(self._windows),
            messages=sum(len(w.messages) for w in self._windows.values()),
            path=self.path,
        )

    def _persist(self, message: Message, client_id: str | None) -> defer.Deferred:
        if self._thread is None or self._stopped is not None:
            return defer.fail(StoreUnavailable("history store is not open"))
        d: defer.Deferred = defer.Deferred()
        self._queue.put((message, client_id, d))
        return d

    def _probe(self) -> None:
        """An empty write transaction: clears ``problem`` once the file takes writes again."""
        if self.problem is None or self._stopped is not None:
            return
        self._queue.put(("probe", None))
        self.reactor.callLater(PROBE_INTERVAL, self._probe)

    def prune(self) -> None:
        super().prune()
        if self.max_age and self._thread is not None and self._stopped is None:
            self._queue.put(("prune", self.clock.seconds() - self.max_age))

    def close(self) -> defer.Deferred:
        if self._thread is None:
            return defer.succeed(None)
        if self._stopped is None:
            self._stopped = defer.Deferred()
            self._queue.put(_STOP)
        return self._stopped

    def _resolve(self, results: list[tuple[defer.Deferred, Any]], failed: str | None) -> None:
        if failed:
            if self.problem is None:
                # Unhealthy (/health 503) until a write works again: probe now and then.
                self.reactor.callLater(PROBE_INTERVAL, self._probe)
            self.problem = f"history store: {failed}"
        elif results:
            self.problem = None
        for d, outcome in results:
            if isinstance(outcome, Exception):
                d.errback(outcome)
            else:
                d.callback(outcome)

    # -- writer thread -----------------------------------------------------------

    def _run(self) -> None:
        db = self._connect()
        seqs: dict[str, int] = {}
        try:
            while True:
                item = self._queue.get()
                batch = [item]
                while len(batch) < BATCH:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                stop = _STOP in batch
                writes = [b for b in batch if isinstance(b, tuple) and isinstance(b[0], Message)]
                prunes = [b[1] for b in batch if isinstance(b, tuple) and b[0] == "prune"]
                probe = any(isinstance(b, tuple) and b[0] == "probe" for b in batch)
                if writes or prunes or probe:
                    results, failed = self._write(db, seqs, writes, prunes)
                    self.reactor.callFromThread(self._resolve, results, failed)
                if stop:
                    return
        finally:
            db.close()
            if self._stopped is not None:
                self.reactor.callFromThread(self._stopped.callback, None)

    def _write(
        self,
        db: sqlite3.Connection,
        seqs: dict[str, int],
        writes: list[tuple[Message, str | None, defer.Deferred]],
        prunes: list[float],
    ) -> tuple[list[tuple[defer.Deferred, Any]], str | None]:
        """One transaction for the whole batch: every Deferred's outcome, in order, and what failed."""
        touched: dict[str, int] = {}
        results: list[tuple[defer.Deferred, Any]] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            for message, client_id, d in writes:
                room = message.room
                if client_id:
                    row = db.execute(
                        "SELECT seq, id, user, text, time, protocol FROM messages WHERE room = ? AND client_id = ?",
                        (room, client_id),
                    ).fetchone()
                    if row is not None:
                        seq, id_, user, text, time, protocol = row
                        original = Message(id_, seq, room, user, text, time, protocol)
                        results.append((d, Stored(original, True)))
                        continue
                seq = touched.get(room) or seqs.get(room)
                if seq is None:
                    row = db.execute("SELECT last_seq FROM rooms WHERE room = ?", (room,)).fetchone()
                    seq = row[0] if row else 0
                seq += 1
                touched[room] = seq
                stored = Message(message.id, seq, room, message.user, message.text, message.time, message.protocol)
                db.execute(
                    "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (room, seq, stored.id, stored.user, stored.text, stored.time, stored.protocol, client_id),
                )
                results.append((d, Stored(stored, False)))
            for room, seq in touched.items():
                db.execute(
                    "INSERT INTO rooms VALUES (?, ?) ON CONFLICT (room) DO UPDATE SET last_seq = excluded.last_seq",
                    (room, seq),
                )
                db.execute("DELETE FROM messages WHERE room = ? AND seq <= ?", (room, seq - self.limit))
            for cutoff in prunes:
                db.execute("DELETE FROM messages WHERE time < ?", (cutoff,))
            db.execute("COMMIT")
        except sqlite3.Error as e:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            log.error("history store write failed: {error}", error=str(e))
            error = StoreUnavailable(f"message not stored: history store failed ({e})")
            return [(d, error) for _, _, d in writes], str(e)
        seqs.update(touched)
        self.batches += 1
        return results, None


def from_options(reactor: Any, options: Any) -> Store:
    """The store ``twistd chatd``'s options ask for (Redis is built by ``chatd.redis``)."""
    limit = options["history-limit"]
    max_age = float(options["history-max-age"])
    data_dir = options["data-dir"]
    if not data_dir:
        return MemoryStore(reactor, limit, max_age)
    return SQLiteStore(reactor, os.path.join(data_dir, "chatd.sqlite3"), limit, max_age)
