"""What the hub fans out: chat messages and presence changes.

An event is immutable once published and carries a cache of its encodings,
keyed by wire format, so that one room broadcast encodes once per format (one
WebSocket frame, one SignalR JSON record, one protobuf...) however many
recipients share that format.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

T = TypeVar("T")


def _rfc3339_slow(seconds: float) -> str:
    dt = datetime.fromtimestamp(seconds, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


#: the last whole second formatted, and its text up to the milliseconds (one tuple: threads may log)
_second: tuple[int, str] = (-1, "")


def rfc3339(seconds: float) -> str:
    """UTC RFC 3339 with milliseconds, the one timestamp form on every protocol.

    Every presence event and message carries one, so the date and time of
    the current second are formatted once (``strftime`` was most of the
    cost) and only the milliseconds each time. Rounds exactly as
    ``datetime.fromtimestamp`` does (to the microsecond, half to even).
    """
    if not seconds >= 0:  # before 1970, or NaN: as datetime does it
        return _rfc3339_slow(seconds)
    whole = int(seconds)
    micros = round((seconds - whole) * 1e6)
    if micros >= 1_000_000:
        whole += 1
        micros -= 1_000_000
    global _second
    cached = _second
    if cached[0] != whole:
        cached = _second = (whole, datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S."))
    return f"{cached[1]}{micros // 1000:03d}Z"


#: random ids made per refill of :func:`new_id`'s pool (one ``getrandom`` call)
_IDS_PER_REFILL = 256
_ids: list[str] = []
_ids_lock = threading.Lock()


def new_id() -> str:
    """A new message id: 32 hex digits, a random (version 4) UUID as ``uuid4().hex`` writes it.

    ``uuid.uuid4()`` asks the kernel for 16 random bytes (a system call) and
    builds a ``UUID`` object for every message: 4 % of the server's CPU in
    the chat workload. The same randomness is taken 256 ids at a time.
    The pool is emptied in a forked child so that no two processes share ids.
    """
    try:
        return _ids.pop()
    except IndexError:
        pass
    raw = bytearray(os.urandom(16 * _IDS_PER_REFILL))
    for i in range(0, len(raw), 16):
        raw[i + 6] = (raw[i + 6] & 0x0F) | 0x40  # version 4
        raw[i + 8] = (raw[i + 8] & 0x3F) | 0x80  # RFC 4122 variant
    text = raw.hex()
    fresh = [text[i : i + 32] for i in range(0, len(text), 32)]
    with _ids_lock:  # the store's threads may make ids too
        _ids.extend(fresh)
        return _ids.pop()


os.register_at_fork(after_in_child=_ids.clear)


def _untracker() -> Callable[[object], None]:
    """CPython's ``PyObject_GC_UnTrack`` (public C API), or nothing elsewhere."""
    try:
        import ctypes

        untrack = ctypes.pythonapi.PyObject_GC_UnTrack
    except (ImportError, AttributeError):  # not CPython
        return lambda obj: None
    untrack.argtypes = (ctypes.py_object,)
    untrack.restype = None
    return untrack


#: takes an object out of the cyclic collector's lists (see :class:`Message`)
_untrack = _untracker()


class Event:
    """Base of everything delivered to sessions; ``room`` routes it."""

    __slots__ = ("room", "_encoded")
    kind = "event"

    def __init__(self, room: str) -> None:
        self.room = room
        self._encoded: dict[str, Any] | None = None

    def encoded(self, fmt: str, encode: Callable[[Any], T]) -> T:
        """``encode(self)``, computed once per format and shared by every recipient."""
        cache = self._encoded
        if cache is None:
            cache = self._encoded = {}
        elif fmt in cache:
            return cache[fmt]
        value = cache[fmt] = encode(self)
        return value

    def forget_encodings(self) -> None:
        """Drop the cached frames once the fan-out is over.

        Messages live on in history; keeping every frame of every kept
        message would double their memory for the rare history replay,
        which simply encodes again.
        """
        self._encoded = None


class Message(Event):
    """A chat message as stored and delivered: ids, order and origin are the hub's.

    **Outside the cyclic collector.** A message is kept in its room's
    window (``chatd.store``) long after it was delivered, 100 per room by
    default, and each collection walks every tracked object of the
    generations it collects: in the chat workload (W2, 1,000 rooms) young
    collections of mostly kept messages took 10-14 ms every 10 s, and a
    full collection walks all of them (8 ms per 100,000 on an idle core).
    A message refers only to strings, numbers and its encodings cache
    (bytes and prepared frames, which never refer back to it), so it can
    never be part of a reference cycle and reference counting alone frees
    it: it is untracked as it is made, as CPython untracks a tuple of
    strings.
    """

    __slots__ = ("id", "seq", "user", "text", "time", "protocol", "client_id")
    kind = "message"

    def __init__(
        self, id: str, seq: int, room: str, user: str, text: str, time: float, protocol: str
    ) -> None:
        super().__init__(room)
        self.id = id
        self.seq = seq
        self.user = user
        self.text = text
        self.time = time
        self.protocol = protocol
        #: the sender's idempotency key, if it gave one (never sent to other clients)
        self.client_id: str | None = None
        _untrack(self)

    @property
    def timestamp(self) -> str:
        return rfc3339(self.time)

    def as_dict(self) -> dict[str, Any]:
        """The documented wire shape, shared by the JSON protocols."""
        return {
            "type": "message",
            "id": self.id,
            "seq": self.seq,
            "room": self.room,
            "user": self.user,
            "message": self.text,
            "timestamp": self.timestamp,
            "protocol": self.protocol,
        }

    def __repr__(self) -> str:
        return f"<Message {self.room}#{self.seq} from {self.user!r} via {self.protocol}>"


class Presence(Event):
    """A user entered (``join``) or left (``leave``) a room; ``count`` is who is there now."""

    __slots__ = ("action", "user", "time", "protocol", "count")
    kind = "presence"

    def __init__(
        self, room: str, action: str, user: str, time: float, protocol: str, count: int
    ) -> None:
        super().__init__(room)
        self.action = action
        self.user = user
        self.time = time
        self.protocol = protocol
        self.count = count

    def as_dict(self) -> dict[str, Any]:
        return {
            "type": "presence",
            "action": self.action,
            "room": self.room,
            "user": self.user,
            "timestamp": rfc3339(self.time),
            "protocol": self.protocol,
            "count": self.count,
        }

    def __repr__(self) -> str:
        return f"<Presence {self.user!r} {self.action} {self.room}>"


class Truncated(Event):
    """Messages of a room were stored but are gone before this process could deliver them.

    Sent to the room's sessions instead of silently skipping: a live stream
    that jumps in ``seq`` says so (WebSocket ``{"type": "truncated"}``,
    SignalR a ``truncated`` stream item and ``HistoryTruncated(room, first_seq)``,
    gRPC ``DATA_LOSS`` on ``StreamMessages`` and an error event on ``Chat``).
    ``first_seq`` is the oldest message still kept.
    """

    __slots__ = ("first_seq",)
    kind = "truncated"

    def __init__(self, room: str, first_seq: int) -> None:
        super().__init__(room)
        self.first_seq = first_seq

    def as_dict(self) -> dict[str, Any]:
        return {"type": "truncated", "room": self.room, "first_seq": self.first_seq}

    def __repr__(self) -> str:
        return f"<Truncated {self.room} from {self.first_seq}>"
