"""Where messages are kept: every room's recent window in memory, and the store behind it.

The hub numbers, stores and fans out a message through one object, the
store, whatever backs it:

* :class:`MemoryStore` keeps the windows only (unit tests, ``--data-dir ''``);
* :class:`SQLiteStore` (the default) writes a file under ``--data-dir``, one
  transaction per reactor turn, and hands the writes to a thread of its own
  whenever they cannot be quick, so the reactor never waits on a lock or a
  slow disk;
* ``chatd.redis.RedisStore`` (``--redis``) numbers and keeps messages in
  Redis, shared by every process.

The store, not the hub, hands out ``seq``: a message gets its number in the
same step that makes it durable (the writer's transaction, a Redis script),
so a failed write leaves no gap and two processes never share a number.
:meth:`Store.add` fires once the message is stored; only then is it put in
the room's window and fanned out, and only then is the sender told ``sent``.

Reads (``history``, ``since`` for resume, duplicate ``client_id`` look-ups)
come from the in-memory windows when the room is in memory. Only rooms the
hub holds (someone is in them, or a read is being answered) are: a room
nobody is in leaves memory, its ``seq`` and history staying in the store,
and comes back (read off the reactor: the SQLite writer's thread, a Redis
command) when someone joins, resumes or asks for its history. The windows
over all rooms are bounded in bytes (``--history-memory``): past it, the
least recently used windows are dropped (a held room's window is read back
from the store when next needed). :class:`MemoryStore` has no store behind
its windows, so there the budget is its retention: past it, the least
recently used rooms nobody is in are forgotten, ``seq`` included (a resume
is then answered as for a room whose history was reset).

A window holds what the retention keeps (``--history-limit`` messages, none
older than ``--history-max-age``), so a read from it is exact: when part of
what a client asks for has gone, :meth:`Store.since` says from which ``seq``
on messages are still kept and the adapters tell the client.
"""

from __future__ import annotations

import os
import queue
import sqlite3
import struct
import tempfile
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from time import monotonic
from typing import Any, NamedTuple

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from chatd.events import Message, new_id
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
    #: the room's newest ``seq`` when this was read
    last_seq: int = 0


#: approximate bytes of a kept message beyond its text and user name (the Message, its id, the deque slot)
MESSAGE_OVERHEAD = 300
#: approximate bytes of a room in memory with no messages (its window, the table entries)
WINDOW_OVERHEAD = 900
#: the default ``--history-memory``
HISTORY_MEMORY = 64 * 1024 * 1024


def _size(message: Message) -> int:
    return MESSAGE_OVERHEAD + len(message.text) + len(message.user)


class _Window:
    """One room in memory: its newest kept messages, their client ids, its last ``seq``.

    ``complete`` says the window holds everything the store keeps of the
    room, so reads may be answered from it; an incomplete one (its messages
    dropped for the memory budget) still knows ``last_seq``.
    """

    __slots__ = ("messages", "client_ids", "last_seq", "complete", "bytes")

    def __init__(self, last_seq: int = 0) -> None:
        self.messages: deque[Message] = deque()
        self.client_ids: dict[str, Message] = {}
        self.last_seq = last_seq
        self.complete = True
        self.bytes = WINDOW_OVERHEAD


class Store:
    """The windows and the rules every backend shares; subclasses make messages durable.

    Runs on the reactor thread. A subclass implements :meth:`_persist` (and
    usually :meth:`load`/:meth:`close`); it must fire its Deferreds in the
    order messages were added to one room, with ``seq`` filled in. A durable
    one also implements :meth:`_read_room`, which reads a room back.
    """

    #: a stored message enters its window when its add fires (False: the backend puts it there)
    keeps_on_ack = True
    #: the windows are a copy of what a store keeps (False: they are all there is)
    durable = False

    def __init__(
        self, clock: IReactorTime, limit: int = 100, max_age: float = 0.0, budget: int = HISTORY_MEMORY
    ) -> None:
        self.clock = clock
        self.limit = limit
        self.max_age = max_age
        #: bytes the windows may take together (approximate), see the module docstring
        self.budget = budget
        #: the rooms in memory, least recently used first
        self._windows: OrderedDict[str, _Window] = OrderedDict()
        self._bytes = 0
        #: room -> how many reasons it has to stay in memory (its members here, reads being answered)
        self._holds: dict[str, int] = {}
        #: room -> the Deferreds waiting for it to be read back from the store: those that run
        #: on the window as read (joins), and those that run once the read has settled (reads)
        self._loading: dict[str, tuple[list[defer.Deferred], list[defer.Deferred]]] = {}
        #: (room, client_id) of an add not yet stored -> the retries waiting for it
        self._in_flight: dict[tuple[str, str], list[defer.Deferred]] = {}
        #: what :meth:`add` failed with last, and whether the store works now
        self.problem: str | None = None
        #: windows dropped for the budget (a figure for /stats)
        self.evictions = 0

    # -- life ------------------------------------------------------------------

    def load(self) -> defer.Deferred:
        """Get ready for reads and writes; fires once reads are exact."""
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
        stores nothing. (A room not in memory has its client ids looked up
        by the backend, in the same step that stores.)
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
        message = Message(new_id(), 0, room, user, text, time, protocol)
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

    # -- which rooms are in memory --------------------------------------------------

    def hold(self, room: str) -> None:
        """Keep ``room`` in memory until :meth:`release` (the hub holds each room someone is in).

        A durable store starts reading the room back at once, so that its
        window is there by the time someone asks.
        """
        count = self._holds.get(room, 0)
        self._holds[room] = count + 1
        if count == 0 and self.durable:
            window = self._windows.get(room)
            if window is None or not window.complete:
                self._ready(room).addErrback(self._read_failed, room)

    def release(self, room: str) -> None:
        """Undo one :meth:`hold`; a room of a durable store nobody holds leaves memory."""
        count = self._holds.get(room, 0) - 1
        if count > 0:
            self._holds[room] = count
            return
        self._holds.pop(room, None)
        if self.durable:
            self._forget(room)

    def using(self, room: str, read: Callable[[], Any], settled: bool = False) -> defer.Deferred:
        """``read()``, run once ``room``'s window is in memory and exact; fires with its result.

        At once (an already fired Deferred) when it is; else once the room
        has been read back from the store, off the reactor. The room is held
        while ``read`` runs, so what ``read`` does (a resume joining the
        room) happens on the window it read, in the same reactor turn.
        ``settled``: only after what the read found newer than its window
        (or held back meanwhile) is delivered into it (see :meth:`_ready`).
        """
        self.hold(room)
        d = self._ready(room, settled)
        d.addCallback(lambda _: read())

        def done(result: Any) -> Any:
            self.release(room)
            return result

        return d.addBoth(done)

    def read_recent(self, room: str, limit: int) -> defer.Deferred:
        """:meth:`recent`, reading the room back from the store if it is not in memory."""
        return self.using(room, lambda: self.recent(room, limit), settled=True)

    def read_since(self, room: str, seq: int) -> defer.Deferred:
        """:meth:`since`, reading the room back from the store if it is not in memory."""
        return self.using(room, lambda: self.since(room, seq), settled=True)

    def _ready(self, room: str, settled: bool = False) -> defer.Deferred:
        """Fires once ``room``'s window is in memory and complete (or known not to exist).

        A read of the store may find messages newer than the window it
        builds (Redis: stored while the read ran, acknowledged already);
        they are delivered once the waiters on the window have run
        (:meth:`_after_read`), so that a member joining at the read gets them
        live. A ``settled`` waiter (a history or resume read, which joins
        nobody) runs after that delivery: before, a history read that came
        while a join's read was in flight answered without messages its
        sender had been told were stored.
        """
        window = self._windows.get(room)
        if not self.durable or (window is not None and window.complete):
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        waiting = self._loading.get(room)
        in_flight = waiting is not None
        if waiting is None:
            waiting = self._loading[room] = ([], [])
        waiting[settled].append(d)  # (on the window as read, once settled)
        if in_flight:
            return d
        first, after = waiting

        def read(window: _Window) -> None:
            self._loading.pop(room, None)
            if self._holds.get(room):
                self._install(room, window)
            for w in first:
                w.callback(None)
            self._after_read(room)
            for w in after:
                w.callback(None)

        def failed(failure: Any) -> None:
            self._loading.pop(room, None)
            for w in first + after:
                w.errback(failure)
            self._after_read(room)

        self._read_room(room).addCallbacks(read, failed)
        return d

    def _read_failed(self, failure: Any, room: str) -> None:
        log.warn("history of {room} not read back: {why}", room=room, why=failure.getErrorMessage())

    def _read_room(self, room: str) -> defer.Deferred:
        """Read ``room`` back from the store, off the reactor; fires with a complete :class:`_Window`.

        Its Deferred must fire in order with the acknowledgements of the
        room's messages: every message acknowledged before it is in the
        window, and none acknowledged after it.
        """
        raise NotImplementedError

    def _after_read(self, room: str) -> None:
        """Called once the waiters of a read of ``room`` have run (Redis delivers what it held back)."""

    def _install(self, room: str, window: _Window) -> None:
        old = self._windows.pop(room, None)
        if old is not None:
            self._bytes -= old.bytes
            window.last_seq = max(window.last_seq, old.last_seq)
        window.bytes = WINDOW_OVERHEAD + sum(_size(m) for m in window.messages)
        self._windows[room] = window
        self._bytes += window.bytes
        self._evict(spare=room)  # its readers are about to use it: others go first, however small the budget

    def _forget(self, room: str) -> None:
        window = self._windows.pop(room, None)
        if window is not None:
            self._bytes -= window.bytes

    def _evict(self, spare: str | None = None) -> None:
        """Past the budget, drop the least recently used windows (see the module docstring)."""
        windows = self._windows
        for _ in range(len(windows)):
            if self._bytes <= self.budget:
                return
            room, window = next(iter(windows.items()))
            if room == spare:
                return
            if not self._holds.get(room):
                # Nobody here is in it: it goes (the memory store's retention: seq and all).
                self._forget(room)
                self.evictions += 1
                continue
            if self.durable and window.complete and window.messages:
                # Someone is in it: keep its seq (Redis delivers by it), read the rest back when asked.
                window.messages.clear()
                window.client_ids.clear()
                window.complete = False
                self._bytes -= window.bytes - WINDOW_OVERHEAD
                window.bytes = WINDOW_OVERHEAD
                self.evictions += 1
            windows.move_to_end(room)  # nothing more to take from it: look at the next

    # -- the windows --------------------------------------------------------------

    def _window(self, room: str) -> _Window:
        window = self._windows.get(room)
        if window is None:
            window = self._windows[room] = _Window()
            self._bytes += window.bytes
        return window

    def keep(self, message: Message, client_id: str | None = None) -> bool:
        """Put a stored message at the end of its room's window (False if it is there already).

        A durable store keeps in memory only the rooms it holds: a message
        to any other room is in the store, and False here (nobody in this
        process follows that room).
        """
        room = message.room
        window = self._windows.get(room)
        if window is None:
            if self.durable:
                return False
            window = self._window(room)
        if message.seq <= window.last_seq:
            return False
        window.last_seq = message.seq
        self._windows.move_to_end(room)
        if window.complete:
            self._append(window, message, client_id)
            self._evict()
        return True

    def _append(self, window: _Window, message: Message, client_id: str | None) -> None:
        window.messages.append(message)
        size = _size(message)
        window.bytes += size
        self._bytes += size
        if client_id:
            message.client_id = client_id
            window.client_ids[client_id] = message
        while len(window.messages) > self.limit:
            self._drop_oldest(window)

    def _drop_oldest(self, window: _Window) -> None:
        old = window.messages.popleft()
        size = _size(old)
        window.bytes -= size
        self._bytes -= size
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
        """The last ``limit`` kept messages of ``room`` in memory, oldest first (see :meth:`read_recent`)."""
        window = self._windows.get(room)
        if window is None or limit <= 0:
            return []
        self._windows.move_to_end(room)
        messages = window.messages
        if limit >= len(messages):
            return list(messages)
        return list(messages)[-limit:]

    def since(self, room: str, seq: int) -> Resume:
        """Every kept message after ``seq`` in memory, and whether some after it are gone (see :meth:`read_since`)."""
        window = self._windows.get(room)
        if window is None:
            return Resume([], 1, seq > 0, 0)
        self._windows.move_to_end(room)
        messages = window.messages
        last = window.last_seq
        first = messages[0].seq if messages else last + 1
        if seq > last:
            # The client saw a seq this room never reached (its history was
            # reset): its numbering means nothing here. Everything kept, flagged.
            return Resume(list(messages), first, True, last)
        missed = [m for m in messages if m.seq > seq] if seq < last else []
        return Resume(missed, first, seq + 1 < first and seq < last, last)

    def last_seq(self, room: str) -> int:
        """The room's newest ``seq`` as far as memory knows (0 for a room not in memory)."""
        window = self._windows.get(room)
        return window.last_seq if window is not None else 0

    def rooms(self) -> int:
        """How many rooms are in memory now."""
        return len(self._windows)

    def writes(self) -> dict[str, Any]:
        """How messages are being written now (a figure for ``/stats``); empty for a store that has no writer."""
        return {}

    def memory(self) -> dict[str, int]:
        """What the windows hold now: rooms, messages, approximate bytes, rooms held, evictions."""
        return {
            "rooms": len(self._windows),
            "messages": sum(len(w.messages) for w in self._windows.values()),
            "bytes": self._bytes,
            "budget": self.budget,
            "held": len(self._holds),
            "loading": len(self._loading),
            "evictions": self.evictions,
        }


class MemoryStore(Store):
    """Windows only: nothing survives a restart (unit tests, or ``--data-dir`` empty).

    The budget is its retention: past it the least recently used rooms
    nobody is in are forgotten, ``seq`` and all (see the module docstring).
    """


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
-- No index on time: keeping one cost every message 10-18 % of the writer's CPU
-- (bench/store_write.py), to spare the prune a scan of the file once a minute
-- (about 12 ms at 110,000 rows, 120 ms at 1.1 million, on the writer thread).
DROP INDEX IF EXISTS messages_time;
CREATE INDEX IF NOT EXISTS messages_client_id ON messages (room, client_id) WHERE client_id IS NOT NULL;
"""

#: A room's last seq: its newest row's, or its row in ``rooms`` when that is newer (every row of the
#: room pruned or trimmed away). Updating the ``rooms`` row with every message wrote one more page to
#: the WAL per room and transaction, about two fifths of the chat workload's WAL (W2: 11,000-14,000
#: pages a second), each copied again by the checkpointer.
_LAST_SEQ = (
    "SELECT max(ifnull((SELECT last_seq FROM rooms WHERE room = ?1), 0),"
    " ifnull((SELECT max(seq) FROM messages WHERE room = ?1), 0))"
)
#: before a prune deletes rows, the last seq of every room it touches goes into ``rooms``
_KEEP_LAST_SEQ = (
    "INSERT INTO rooms (room, last_seq) SELECT room, max(seq) FROM messages"
    " WHERE room IN (SELECT room FROM messages WHERE time < ?1) GROUP BY room"
    " ON CONFLICT (room) DO UPDATE SET last_seq = max(last_seq, excluded.last_seq)"
)

#: every room's last seq into ``rooms`` (see ``SQLiteStore._note_last_seqs``)
_ALL_LAST_SEQS = (
    "INSERT INTO rooms (room, last_seq) SELECT room, max(seq) FROM messages WHERE true GROUP BY room"
    " ON CONFLICT (room) DO UPDATE SET last_seq = max(last_seq, excluded.last_seq)"
)

#: how many queued writes one transaction takes at most
BATCH = 512
#: seconds between the checkpointer's copies of the WAL into the file (see ``_checkpoints``)
CHECKPOINT_INTERVAL = 1.0
#: how long a connection waits for a lock SQLite cannot take at once (Python's default, 5 s)
BUSY_TIMEOUT_MS = 5000
#: WAL pages (4 KB each) past which the writer starts the WAL again from its beginning once the
#: checkpointer has copied it (see ``_restart_wal``): about the largest the WAL file grows to
WAL_RESTART_PAGES = 10_000
#: before the restart, the checkpointer copies again what came in during its copy, at most this many
#: times, until that was at most ``CATCH_UP_PAGES`` (see ``_catch_up``)
CATCH_UP_COPIES = 4
CATCH_UP_PAGES = 100
#: rooms whose last ``seq`` the writer remembers between transactions (the rest are read from ``rooms``)
SEQ_CACHE = 4096
#: seconds between probes of a store that failed a write
PROBE_INTERVAL = 2.0
#: a room's rows in the file may pass ``limit`` by this fraction of it before they are trimmed (see ``_slack``)
TRIM_SLACK = 0.1
#: transactions on the reactor that take longer than this, ``SLOW_WRITES`` in a row (or one longer
#: than ``SLOW_WRITE_ALONE``), send the writes to the writer thread ...
SLOW_WRITE = 0.010
SLOW_WRITES = 3
SLOW_WRITE_ALONE = 0.1
#: ... for this many seconds
SLOW_HOLD_OFF = 30.0
#: text a reactor turn may commit itself (with at most ``BATCH`` messages); past it the turn's writes go to the thread
INLINE_MAX_BYTES = 256 * 1024
#: seconds between the log's lines while the history file keeps failing writes (see ``SQLiteStore._log_failure``)
FAILURE_LOG_INTERVAL = 60.0
#: free bytes a probe wants on the history file's disk before it calls the store healthy again
PROBE_FREE_BYTES = 1024 * 1024
_STOP = object()
#: the reactor asks the writer thread to start the WAL again (see ``SQLiteStore._restarted``)
_RESTART = object()


#: the start of SQLite's WAL index (the ``-shm`` file): version, unused, change counter, isInit,
#: big-endian checksums, page size (1 means 65536), frames in the WAL (mxFrame), pages in the database
_SHM_HEADER = struct.Struct("=IIIBBHII")
#: bytes of the WAL's header, and of each frame's header before its page
WAL_HEADER = 32
WAL_FRAME_HEADER = 24


class _Busy(Exception):
    """Another connection holds the file's write lock: the transaction was rolled back, nothing was written."""


class _Moved(Exception):
    """The history file (or its WAL) at the path is no longer the one chatd opened: nothing may be written."""


class SQLiteStore(Store):
    """Messages in one SQLite file, written with group commit on the reactor or, when that cannot be quick, a thread.

    Every message added in one reactor turn goes into one transaction
    (``synchronous=NORMAL`` in WAL mode: a commit survives the process being
    killed, not a power loss: no sync is waited for), and their Deferreds fire
    together, in order. The transaction gives each message its ``seq`` from
    the room's row in ``rooms``, so a failed transaction hands out nothing.
    Retention runs in the same transactions: a room keeps ``limit`` rows
    (give or take the trimming slack, see :meth:`_slack`), and a periodic
    prune deletes rows older than ``max_age`` (the ``rooms`` row stays, so
    ``seq`` goes on).

    Why on the reactor: a commit with no sync is tens of microseconds, and
    handing each message to a thread and back cost three to four times
    that (W1 at 10,000 deliveries a second, where every message is its own
    transaction: the writer thread took about 160 µs a message, woken cold
    on the one core, trading the GIL with the reactor at each of SQLite's
    calls; the same transaction on the reactor cost about 30).
    The writer thread (:meth:`_run`) is still there for what could wait:

    * the reactor's connection never waits for a lock: when another
      connection is writing, its transaction is rolled back and handed to
      the thread, which waits;
    * transactions longer than ``SLOW_WRITE`` (a disk slow to take writes;
      ``SLOW_WRITES`` in a row, as one alone may only have been preempted on
      a busy machine, or one past ``SLOW_WRITE_ALONE``) send the writes to
      the thread for ``SLOW_HOLD_OFF``;
    * a turn with more than ``BATCH`` messages or ``INLINE_MAX_BYTES`` of
      text (a burst, which would hold the reactor for as long as it takes
      to write) is the thread's;
    * so is the WAL's restart (which syncs the file): the turns' writes
      wait for it on the reactor, and the first transaction after it takes
      them all (see :meth:`_restarted`); and reads, prunes and probes always
      run there.

    While the thread has anything to do, every
    write goes to it too, behind what it has: so writes keep their order,
    one connection numbers a room at a time, and a room read back by the
    thread holds every message acknowledged before its answer and none
    after it, so a resume answered from it has no gap and no duplicate.
    """

    durable = True

    def __init__(
        self,
        reactor: Any,
        path: str,
        limit: int = 100,
        max_age: float = 0.0,
        synchronous: str = "NORMAL",
        budget: int = HISTORY_MEMORY,
        inline: bool = True,
    ) -> None:
        super().__init__(reactor, limit, max_age, budget)
        self.reactor = reactor
        self.path = path
        self.synchronous = synchronous
        # The C queue: the pure-Python Queue's Condition costs about 5 us a message more.
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopped: defer.Deferred | None = None
        self.batches = 0
        #: transactions the reactor ran itself (the rest of ``batches`` ran on the writer thread)
        self.inline_batches = 0
        #: False: every write goes to the writer thread (as when the reactor's writes were slow)
        self.inline = inline
        #: the reactor's own connection, which never waits for a lock
        self._db: sqlite3.Connection | None = None
        #: room -> last seq, for whichever connection writes (one at a time: see the class docstring)
        self._seqs: OrderedDict[str, int] = OrderedDict()
        #: writes added this reactor turn, committed together by ``_flush``, and the characters of their text
        self._pending: list[tuple[Message, str | None, defer.Deferred]] = []
        self._pending_bytes = 0
        self._flush_call: Any = None
        #: the next probe, while ``problem`` is set (one chain of probes at a time)
        self._probe_call: Any = None
        #: reactor transactions in a row that were slow (see ``SLOW_WRITES``)
        self._slow_writes = 0
        #: items put on the writer thread's queue and not yet answered
        self._outstanding = 0
        #: reactor time until which writes go to the thread (a transaction here was slow)
        self._slow_until = 0.0
        #: set at close: the checkpointer's last turn
        self._closing = threading.Event()
        self._checkpointer: threading.Thread | None = None
        self._checkpoint_db: sqlite3.Connection | None = None
        #: each writing connection's ``PRAGMA data_version`` at its last transaction (see ``_write``)
        self._data_versions: dict[int, int] = {}
        #: written since the checkpointer last looked (set by the writers, read by the checkpointer)
        self._written = False
        #: the checkpointer has copied the WAL up to its last commits: the writer thread restarts it (see ``_restart_wal``)
        self._copied = False
        #: the writer thread is restarting the WAL for the reactor, whose writes wait meanwhile (see ``_restarted``)
        self._restarting = False
        #: (device, inode) of the file and its WAL as opened (see ``_check_file``)
        self._identity: tuple[tuple[int, int], ...] | None = None
        #: the file's size at the last write (it never shrinks), and the WAL index opened to read its header
        self._file_size = 0
        self._shm: int | None = None
        #: while writes fail: when the log last said so, and the messages refused since (see ``_log_failure``)
        self._failure_logged = 0.0
        self._refused = 0

    # -- reactor side ------------------------------------------------------------

    def open(self) -> None:
        """Open (creating) the file and start the writer; blocking, at start only.

        No room is read now: each is read back when someone needs it.

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
        try:  # the checkpointer's own connection: opened now, so that a file it cannot use stops the start
            self._checkpoint_db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._checkpoint_db.execute(f"PRAGMA synchronous = {self.synchronous}")
        except sqlite3.Error as e:
            raise StartupError(f"--data-dir: cannot open the history file {self.path!r}: {e}") from None
        self._db = self._connect(wait=False)
        self._identity = self._file_identity()
        self._file_size = os.stat(self.path).st_size
        self._shm = os.open(self.path + "-shm", os.O_RDONLY)
        self._thread = threading.Thread(target=self._run, name="chatd-sqlite", daemon=True)
        self._thread.start()
        self._checkpointer = threading.Thread(target=self._checkpoints, name="chatd-sqlite-checkpoint", daemon=True)
        self._checkpointer.start()

    def load(self) -> defer.Deferred:
        if self._thread is None:
            self.open()
        return defer.succeed(None)

    def _connect(self, wait: bool = True) -> sqlite3.Connection:
        """A connection for writing; ``wait=False``: one that is told at once when the file is locked (the reactor's)."""
        timeout = BUSY_TIMEOUT_MS / 1000 if wait else 0
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=timeout)
        db.executescript(_SCHEMA)
        db.execute(f"PRAGMA synchronous = {self.synchronous}")
        # No checkpoint inside a commit: the checkpointer thread copies the WAL (see _checkpoints).
        db.execute("PRAGMA wal_autocheckpoint = 0")
        return db

    def _file_identity(self) -> tuple[tuple[int, int], ...]:
        """(device, inode) of the history file and of its WAL, as they are at the path now."""
        identity = []
        for path in (self.path, self.path + "-wal"):
            st = os.stat(path)
            identity.append((st.st_dev, st.st_ino))
        return tuple(identity)

    def _check_file(self) -> None:
        """Raise :class:`_Moved` unless the path still names the file and WAL chatd has open, whole (in every write).

        SQLite keeps writing to a file deleted, renamed or replaced under
        it (an operator's ``rm``, a restore copied over it, a data
        directory removed): every commit succeeds, into an inode nothing
        will ever open again. Each message would be acknowledged and lost
        at the next start, and the file found there then (none, or an old
        one) numbers the room from a ``seq`` already handed out. A file
        emptied in place (``: > chatd.sqlite3-wal`` to free space) is the
        same loss: SQLite writes the next frames at their old offsets behind
        a header of zeros, and the next start reads none of it.

        So every transaction first checks, under the write lock, that the
        path still names the inodes opened; that the file has not shrunk
        (chatd never shrinks it: no VACUUM, no auto-vacuum); and that the
        WAL still holds every frame SQLite's index (the ``-shm`` header,
        written under the same lock) says it has. Two ``stat`` calls and a
        ``pread``: a few microseconds. Once that fails its writes are
        refused until a restart opens the file at the path again: reopening
        it here would number rooms anew under connected clients.
        """
        try:
            st_db = os.stat(self.path)
            st_wal = os.stat(self.path + "-wal")
            header = os.pread(self._shm, _SHM_HEADER.size, 0) if self._shm is not None else b""
        except OSError:
            st_db = st_wal = None
            header = b""
        whole = st_db is not None and st_wal is not None
        if whole and self._identity is not None:
            whole = ((st_db.st_dev, st_db.st_ino), (st_wal.st_dev, st_wal.st_ino)) == self._identity
            whole = whole and st_db.st_size >= self._file_size
            if whole and len(header) == _SHM_HEADER.size:
                page, frames = _SHM_HEADER.unpack(header)[5:7]
                page = 65536 if page == 1 else page
                whole = not frames or st_wal.st_size >= WAL_HEADER + frames * (WAL_FRAME_HEADER + page)
        if not whole:
            raise _Moved(
                f"the history file {self.path} or its WAL was deleted, replaced or emptied while open; restart chatd"
            )
        self._file_size = st_db.st_size

    def _load(self, db: sqlite3.Connection) -> None:
        rooms = db.execute("SELECT count(*) FROM rooms").fetchone()[0]
        log.info("history: {rooms} rooms kept in {path}", rooms=rooms, path=self.path)

    def _read_room(self, room: str) -> defer.Deferred:
        if self._thread is None or self._stopped is not None:
            return defer.fail(StoreUnavailable("history store is not open"))
        d: defer.Deferred = defer.Deferred()
        self._put(("read", room, d))
        return d

    def _persist(self, message: Message, client_id: str | None) -> defer.Deferred:
        if self._thread is None or self._stopped is not None:
            return defer.fail(StoreUnavailable("history store is not open"))
        d: defer.Deferred = defer.Deferred()
        if (
            self._outstanding
            or not self.inline
            or (self._slow_until and self._still_slow())
            or len(self._pending) >= BATCH  # a burst: the thread takes the turn's writes
            or self._pending_bytes >= INLINE_MAX_BYTES
        ):
            self._put((message, client_id, d))  # the thread's, for a reason in the class docstring
            return d
        if self._copied and not self._restarting:
            self._restarting = True
            self._queue.put(_RESTART)  # not outstanding: the writes stay here, and wait for it
        if not self._pending and not self._restarting:
            self._flush_call = self.reactor.callLater(0, self._flush)
        self._pending.append((message, client_id, d))
        self._pending_bytes += len(message.text)
        return d

    def _still_slow(self) -> bool:
        """Whether the hold-off after slow writes still runs; says so in the log when it ends."""
        if self.clock.seconds() < self._slow_until:
            return True
        self._slow_until = 0.0
        log.info("history: writing on the reactor again")
        return False

    def writes(self) -> dict[str, Any]:
        if not self.inline:
            writer = "thread"
        elif self._slow_until and self._still_slow():
            writer = "thread: writes were slow"
        else:
            writer = "reactor"
        return {
            "writer": writer,
            "transactions": self.batches,
            "on_reactor": self.inline_batches,
            "queued": self._outstanding,
        }

    def _put(self, item: Any) -> None:
        """Queue ``item`` for the writer thread, behind this turn's writes (which go first, to keep their order)."""
        if self._pending:
            if self._flush_call is not None:  # none while a restart holds the writes: they queue behind it
                self._flush_call.cancel()
                self._flush_call = None
            pending, self._pending = self._pending, []
            self._pending_bytes = 0
            for write in pending:
                self._queue.put(write)
            self._outstanding += len(pending)
        self._queue.put(item)
        self._outstanding += 1

    def _flush(self) -> None:
        """This turn's writes, in one transaction on the reactor's connection (see the class docstring)."""
        self._flush_call = None
        if self._restarting:  # they wait for the WAL's restart (see _restarted)
            return
        writes, self._pending = self._pending, []
        self._pending_bytes = 0
        if not writes:
            return
        started = monotonic()
        try:
            results, failed = self._write(self._db, self._seqs, writes, [], wait=False)
        except _Busy:
            for write in writes:  # nothing was written: the thread waits for the lock
                self._put(write)
            return
        took = monotonic() - started
        self._written = True
        if failed is None:
            self.inline_batches += 1
            self._slow_writes = self._slow_writes + 1 if took > SLOW_WRITE else 0
            if self._slow_writes >= SLOW_WRITES or took > SLOW_WRITE_ALONE:
                self._slow_writes = 0
                self._slow_until = self.clock.seconds() + SLOW_HOLD_OFF
                log.warn(
                    "history: a write took {ms:.0f} ms; writing from the writer thread for {hold:.0f} s",
                    ms=took * 1000,
                    hold=SLOW_HOLD_OFF,
                )
        self._resolve(results, failed)

    def _probe(self) -> None:
        """An empty write transaction: clears ``problem`` once the file takes writes again."""
        self._probe_call = None
        if self.problem is None or self._stopped is not None:
            return
        self._put(("probe", None))
        self._probe_call = self.reactor.callLater(PROBE_INTERVAL, self._probe)

    def prune(self) -> None:
        super().prune()
        if self.max_age and self._thread is not None and self._stopped is None:
            self._put(("prune", self.clock.seconds() - self.max_age))

    def close(self) -> defer.Deferred:
        if self._thread is None:
            return defer.succeed(None)
        if self._stopped is None:
            self._stopped = defer.Deferred()
            self._closing.set()
            if self._probe_call is not None:
                self._probe_call.cancel()
                self._probe_call = None
            self._put(_STOP)  # this turn's writes first
            if self._db is not None:
                self._db.close()  # not the last connection: the writer's, closing last, copies the WAL into the file
                self._db = None
        return self._stopped

    def _restarted(self) -> None:
        """The writer thread has started the WAL again: the writes held meanwhile are committed now, together.

        Before, the writes of the turn that saw the WAL copied went to the
        writer thread with the restart, and every write after them went
        there too for as long as it had any outstanding: under steady
        traffic a cascade of small hand-offs, each a wake-up of the thread
        and of the reactor. In the chat workload (W2) the WAL is copied
        past ``WAL_RESTART_PAGES`` about once a second, and a fifth of all
        transactions ran on the thread (about 800 wake-ups a second, the
        reactor preempted as often).
        """
        self._restarting = False
        if self._pending and self._flush_call is None and self._db is not None:
            self._flush()

    def _handled(self, count: int, calls: list[tuple[Callable[..., None], tuple[Any, ...]]]) -> None:
        """The writer thread's answers to ``count`` queued items (one wake-up of the reactor for all)."""
        self._outstanding -= count
        for call, args in calls:
            call(*args)

    def _resolve(self, results: list[tuple[defer.Deferred, Any]], failed: str | None, probed: bool = False) -> None:
        if failed:
            if self._probe_call is None and self._stopped is None:
                # Unhealthy (/health 503) until a write works again: probe now and then.
                self._probe_call = self.reactor.callLater(PROBE_INTERVAL, self._probe)
            self._log_failure(failed, len(results))
            self.problem = f"history store: {failed}"
        elif results or probed:  # a probe's transaction wrote a page (see _write): the file takes writes
            if self.problem is not None:
                log.info(
                    "history store: writes work again ({refused} messages were refused while it failed)",
                    refused=self._refused,
                )
            self._refused = 0
            self.problem = None
        for d, outcome in results:
            if isinstance(outcome, Exception):
                d.errback(outcome)
            else:
                d.callback(outcome)

    def _log_failure(self, failed: str, refused: int) -> None:
        """Say in the log that writes fail: once as they start, then a line a minute with the count (reactor).

        A full disk fails every transaction, one per reactor turn with
        anything to write: a line each was thousands a minute (about 150 a
        second from four clients sending, 8,000 in 13 s on a 2 MB tmpfs),
        burying the one line that said why, and itself filling the disk the
        log shares. ``/health`` and ``chatd_store_healthy`` say it as long as
        it lasts; the log says it started, how it goes on, and when it ends.
        """
        self._refused += refused
        now = self.clock.seconds()
        if self.problem is None:
            self._failure_logged = now
            log.error("history store write failed: {error}; messages are refused until it works again", error=failed)
        elif now - self._failure_logged >= FAILURE_LOG_INTERVAL:
            self._failure_logged = now
            log.error(
                "history store still failing: {error} ({refused} messages refused so far)",
                error=failed,
                refused=self._refused,
            )

    # -- writer thread -----------------------------------------------------------

    def _run(self) -> None:
        db = self._connect()
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
                restart = _RESTART in batch
                writes = [b for b in batch if isinstance(b, tuple) and isinstance(b[0], Message)]
                prunes = [b[1] for b in batch if isinstance(b, tuple) and b[0] == "prune"]
                probe = any(isinstance(b, tuple) and b[0] == "probe" for b in batch)
                reads = [b for b in batch if isinstance(b, tuple) and b[0] == "read"]
                calls: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
                if writes or prunes or probe:
                    results, failed = self._write(db, self._seqs, writes, prunes)
                    if probe and failed is None:
                        failed = self._short_of_space()
                    calls.append((self._resolve, (results, failed, probe)))
                    self._written = True
                if reads:  # after the batch's writes: see the class docstring
                    calls.append((self._answer, ([(d, self._read(db, room)) for _, room, d in reads],)))
                if self._copied and (writes or prunes or probe or restart):  # what was written is acknowledged first
                    self.reactor.callFromThread(self._handled, 0, calls)
                    calls = []
                    self._restart_wal(db)
                if restart:
                    calls.append((self._restarted, ()))
                self.reactor.callFromThread(self._handled, len(batch) - restart, calls)
                if stop:
                    self._note_last_seqs(db)
                    return
        finally:
            # The checkpointer first: the last connection to close copies the WAL into the file.
            self._closing.set()
            if self._checkpointer is not None:
                self._checkpointer.join(10)
            db.close()
            if self._shm is not None:
                os.close(self._shm)
                self._shm = None
            if self._stopped is not None:
                self.reactor.callFromThread(self._stopped.callback, None)

    def _note_last_seqs(self, db: sqlite3.Connection) -> None:
        """Every room's last seq into ``rooms``, at a clean close (writer thread).

        Since ``_LAST_SEQ`` a room's row there may lag its newest message;
        a chatd from before it numbers from the row alone, and every write
        to such a room would fail on the primary key after a downgrade.
        After a clean stop the file suits both. One scan of the file: about
        160 ms per million kept messages.
        """
        try:
            db.execute(_ALL_LAST_SEQS)
        except sqlite3.Error as e:
            log.warn("history: could not note the rooms' last seqs at close: {error}", error=str(e))

    def _short_of_space(self) -> str | None:
        """Why a probe's page is no proof: the disk has less free than a batch of messages may need (writer thread).

        A failed transaction leaves its frames' room at the end of the WAL,
        so a one-page probe commits on a disk too full for any message of
        size; stay unhealthy until there is room for ``PROBE_FREE_BYTES``.
        """
        try:
            st = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
        except OSError:
            return None
        free = st.f_bavail * st.f_frsize
        return f"disk almost full: {free} bytes free" if free < PROBE_FREE_BYTES else None

    def _restart_wal(self, db: sqlite3.Connection) -> None:
        """Copy the WAL's last few pages into the file and start it again from the top (writer thread).

        The checkpointer copies the WAL without holding up the writers, but
        SQLite starts the WAL again from its beginning only when every frame
        was copied before a transaction starts: under steady traffic a
        commit always lands while a copy runs, and the WAL would grow for
        ever. So once the checkpointer has copied a WAL past
        ``WAL_RESTART_PAGES``, the writer thread finishes the job: what is
        left is the frames committed while that copy ran. The reactor asks
        for it and holds its writes meanwhile (see :meth:`_restarted`); with
        writes already on the thread, the thread does it after committing
        them. (Done by the checkpointer, it needs the write lock, which
        a reactor writing every turn holds whenever that thread gets the GIL
        back: without waiting it found the lock taken nearly every time and
        the WAL grew for as long as the traffic lasted; waiting, the writes
        the reactor handed over meanwhile would wait in SQLite's busy
        handler, which sleeps 1, 2, 5, 10 ... ms between tries.) RESTART,
        not TRUNCATE: the file keeps its size, so later commits write over
        it instead of growing it again (a file growing needs its metadata
        journalled, and that waits behind another file's sync). It never
        waits: with a reader in the file (another process, a backup) SQLite
        could only finish by waiting for it (the connection's busy timeout,
        5 s), so then it gives up at once and the checkpointer asks again
        after its next copy.
        """
        self._copied = False
        try:
            db.execute("PRAGMA busy_timeout = 0")
            db.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        except sqlite3.Error as e:
            log.warn("history file checkpoint failed: {error}", error=str(e))
        finally:
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")

    def _checkpoints(self) -> None:
        """The checkpointer thread: copies committed pages from the WAL into the file.

        A checkpoint writes every page changed since the last one and syncs
        the file: tens to hundreds of milliseconds when the disk is slow to
        sync. Run inside a commit (SQLite's ``wal_autocheckpoint``), it held
        up every message waiting behind that commit: W1's latency tail (p99
        38-90 ms from 40,000 deliveries a second, 5-8 ms with syncs off or
        with this thread, in runs alternating on 2026-12-03; on an hour when
        the disk synced fast, neither showed it). Here it runs on a
        connection of its own, PASSIVE (it never waits for or blocks the
        writer), every ``CHECKPOINT_INTERVAL`` while there were writes.
        """
        db = self._checkpoint_db
        last_warning: float | None = None
        try:
            while not self._closing.wait(CHECKPOINT_INTERVAL):
                if not self._written:
                    continue
                self._written = False
                try:
                    frames, copied = self._checkpoint(db)
                except sqlite3.Error as e:
                    self._written = True  # try again next time
                    if getattr(e, "sqlite_errorname", None) == "SQLITE_BUSY":
                        continue  # the writer was starting the WAL again: nothing wrong
                    now = monotonic()
                    if last_warning is None or now - last_warning >= 60:  # a failing disk: a line a minute
                        last_warning = now
                        log.warn("history file checkpoint failed: {error}", error=str(e))
                    continue
                if frames >= WAL_RESTART_PAGES and copied == frames:
                    self._catch_up(db, frames)
                    self._copied = True
        finally:
            db.close()

    def _catch_up(self, db: sqlite3.Connection, frames: int) -> None:
        """Copy again, at once, what was committed while the last copy ran, until that is little (checkpointer).

        The WAL's restart (:meth:`_restart_wal`) holds the writes while it
        copies what the checkpointer has not and syncs the file. In the chat
        workload a copy of the WAL's 11,000-14,000 pages took 85-112 ms, and
        the restart then copied the thousand-odd pages committed meanwhile:
        22-40 ms every second with every message waiting, W2's p99. Each
        copy here takes what the one before it left, a tenth of it or so,
        so the restart is left a few milliseconds' worth.
        """
        for _ in range(CATCH_UP_COPIES):
            try:
                _, now, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error:  # the copy before this one was whole: the restart copies what is left
                return
            if copied != now or now - frames <= CATCH_UP_PAGES:
                return
            frames = now

    @staticmethod
    def _checkpoint(db: sqlite3.Connection) -> tuple[int, int]:
        """One PASSIVE checkpoint (checkpointer thread): the WAL's frames, and how many are in the file now."""
        _, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return frames, copied

    def _read(self, db: sqlite3.Connection, room: str) -> _Window | Exception:
        """One room's window as the file keeps it (writer thread)."""
        try:
            (last,) = db.execute(_LAST_SEQ, (room,)).fetchone()
            rows = db.execute(  # not the rows waiting to be trimmed: they are no longer kept
                "SELECT seq, id, user, text, time, protocol, client_id FROM messages"
                " WHERE room = ? AND seq > ? ORDER BY seq",
                (room, last - self.limit),
            ).fetchall()
        except sqlite3.Error as e:
            log.error("history store read failed: {error}", error=str(e))
            return StoreUnavailable(f"history not available: history store failed ({e})")
        window = _Window(last)
        cutoff = self.clock.seconds() - self.max_age if self.max_age else None
        for seq, id_, user, text, time, protocol, client_id in rows:
            if cutoff is not None and time < cutoff:
                continue
            message = Message(id_, seq, room, user, text, time, protocol)
            window.messages.append(message)
            if client_id:
                message.client_id = client_id
                window.client_ids[client_id] = message
        while len(window.messages) > self.limit:
            old = window.messages.popleft()
            if old.client_id:
                window.client_ids.pop(old.client_id, None)
        return window

    @staticmethod
    def _answer(answers: list[tuple[defer.Deferred, Any]]) -> None:
        for d, outcome in answers:
            if isinstance(outcome, Exception):
                d.errback(outcome)
            else:
                d.callback(outcome)

    def _slack(self) -> int:
        """How many rows past ``limit`` a room may hold in the file before it is trimmed.

        Deleting a room's oldest row in every transaction dirties a second
        page of the room, written to the WAL at each commit and again at the
        checkpoint; trimming a tenth of ``limit`` at a time dirties it once
        per tenth (W2 in ``bench/store_write.py``: about an eighth less CPU
        per message). Every read of the file looks only at the newest
        ``limit`` rows of a room, so the extra rows are never seen; a small
        ``limit`` is trimmed exactly.
        """
        return max(1, int(self.limit * TRIM_SLACK))

    def _write(
        self,
        db: sqlite3.Connection,
        seqs: OrderedDict[str, int],
        writes: list[tuple[Message, str | None, defer.Deferred]],
        prunes: list[float],
        wait: bool = True,
    ) -> tuple[list[tuple[defer.Deferred, Any]], str | None]:
        """One transaction for the whole batch: every Deferred's outcome, in order, and what failed.

        ``wait=False`` (the reactor's connection): a file locked by another
        connection raises :class:`_Busy`, with nothing written.

        Each statement runs once per batch with ``executemany`` rather than
        once per message, which saves the per-call cost in Python (a few per
        cent of the writer's CPU; fewer pages written saves more, see
        :meth:`_slack`). The rows are inserted only after the loop, so a
        ``client_id`` sent twice in one batch cannot be found by the SELECT
        (which saw the first row when each was inserted at once): ``fresh``
        finds it instead.
        """
        limit = self.limit
        #: room -> its last seq before this batch (before) and after this batch's messages so far (touched)
        before: dict[str, int] = {}
        touched: dict[str, int] = {}
        #: (room, client_id) -> the message this batch stores with it
        fresh: dict[tuple[str, str], Message] = {}
        #: rooms whose last seq was read from the file (not the cache) in this batch
        looked_up: set[str] = set()
        rows: list[tuple[Any, ...]] = []
        results: list[tuple[defer.Deferred, Any]] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            self._check_file()
            (version,) = db.execute("PRAGMA data_version").fetchone()
            if self._data_versions.setdefault(id(db), version) != version:
                # Another connection committed since this one's last transaction: another chatd on the
                # file, or an operator's tool. The cached seqs may be behind it, and once it has trimmed
                # the rows they would collide with, an insert would hand out a seq it gave already.
                self._data_versions[id(db)] = version
                seqs.clear()
            for message, client_id, d in writes:
                room = message.room
                seq = touched.get(room)
                if seq is None:
                    seq = seqs.get(room)
                    if seq is None:
                        (seq,) = db.execute(_LAST_SEQ, (room,)).fetchone()
                        looked_up.add(room)
                    before[room] = seq
                if client_id:
                    original = fresh.get((room, client_id))
                    if original is None:
                        # Only among the kept rows: the file may still hold older ones (see _slack).
                        row = db.execute(
                            "SELECT seq, id, user, text, time, protocol FROM messages"
                            " WHERE room = ? AND client_id = ? AND seq > ?",
                            (room, client_id, before[room] - limit),
                        ).fetchone()
                        if row is not None:
                            seq_, id_, user, text, time, protocol = row
                            original = Message(id_, seq_, room, user, text, time, protocol)
                    if original is not None:
                        touched.setdefault(room, seq)
                        results.append((d, Stored(original, True)))
                        continue
                seq += 1
                touched[room] = seq
                stored = Message(message.id, seq, room, message.user, message.text, message.time, message.protocol)
                if client_id:
                    fresh[(room, client_id)] = stored
                rows.append((room, seq, stored.id, stored.user, stored.text, stored.time, stored.protocol, client_id))
                results.append((d, Stored(stored, False)))
            db.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            grown = [(room, seq) for room, seq in touched.items() if seq > before[room]]
            # Trim a room when its seq passes a multiple of the slack: at most limit + slack - 1 rows stay,
            # with no count kept anywhere, so the rule holds across restarts.
            slack = self._slack()
            trims = [(room, seq - limit) for room, seq in grown if seq > limit and seq // slack != before[room] // slack]
            # A room's last seq is its newest row's; its row in rooms is written only when that could go
            # (a trim, a prune) or the room was not cached (so every room has one): see _LAST_SEQ.
            trimmed = {room for room, _ in trims}
            kept = [(room, seq) for room, seq in grown if room in looked_up or room in trimmed]
            if kept:
                db.executemany(
                    "INSERT INTO rooms VALUES (?, ?) ON CONFLICT (room) DO UPDATE SET last_seq = excluded.last_seq", kept
                )
            if trims:
                db.executemany("DELETE FROM messages WHERE room = ? AND seq <= ?", trims)
            for cutoff in prunes:
                db.execute(_KEEP_LAST_SEQ, (cutoff,))
                db.execute("DELETE FROM messages WHERE time < ?", (cutoff,))
            if not writes:
                # A probe: an empty transaction writes nothing, and commits on a full disk too. Rewriting
                # the header page (its value unchanged) puts one page in the WAL: it proves the file takes writes.
                (version,) = db.execute("PRAGMA user_version").fetchone()
                db.execute(f"PRAGMA user_version = {int(version)}")
            db.execute("COMMIT")
        except Exception as e:  # not only sqlite3.Error: whatever it was, the lock is let go and the writes fail
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if not wait and getattr(e, "sqlite_errorcode", 0) & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise _Busy() from None
            if not isinstance(e, (sqlite3.Error, _Moved)):  # not the disk: a bug, which deserves its traceback
                log.failure("history store write failed")
            error = StoreUnavailable(f"message not stored: history store failed ({e})")
            return [(d, error) for _, _, d in writes], str(e)
        for room, seq in touched.items():
            seqs[room] = seq
            seqs.move_to_end(room)
        while len(seqs) > SEQ_CACHE:
            seqs.popitem(last=False)
        self.batches += 1
        return results, None


def from_options(reactor: Any, options: Any) -> Store:
    """The store ``twistd chatd``'s options ask for (Redis is built by ``chatd.redis``)."""
    limit = options["history-limit"]
    max_age = float(options["history-max-age"])
    budget = options["history-memory"]
    data_dir = options["data-dir"]
    if not data_dir:
        return MemoryStore(reactor, limit, max_age, budget)
    return SQLiteStore(reactor, os.path.join(data_dir, "chatd.sqlite3"), limit, max_age, budget=budget)
