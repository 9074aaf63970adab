"""The one validator every protocol adapter shares.

Each function takes a value straight off the wire (any type) and returns the
clean value or raises :class:`ChatError` with a reason meant for the peer.
Adapters turn a ``ChatError`` into their own protocol's error form, so the
rules and the wording are the same over WebSocket, SignalR and gRPC.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

ROOM_RULE = "1-64 characters of A-Z a-z 0-9 _ . -"
USER_RULE = "1-32 characters, letters, digits, spaces and _ . - (no leading or trailing space)"

#: bytes a message's record takes besides its text, at most (see ``history_bytes``)
MESSAGE_ENVELOPE = 512

_ROOM_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# \w is Unicode-aware: non-Latin letters and digits are welcome in names.
_USER_RE = re.compile(r"[\w.\-]([\w .\-]{0,30}[\w.\-])?")


def history_bytes(history_limit: int, max_message_length: int) -> int:
    """The most bytes a full room's history can take on the wire, in any protocol.

    A ``history`` reply, a ``GetHistory`` completion or a resume's replay is
    written in one go, and a client that reads must be able to take it
    however slowly it reads: a send budget below this closed such a client
    as too slow. Each kept message at the longest text, every character at
    its longest encoded (a control character in JSON is six bytes,
    ``\u0001``), plus ``MESSAGE_ENVELOPE`` for the rest of its record (id,
    seq, room, user, time, framing).
    """
    return history_limit * (max_message_length * 6 + MESSAGE_ENVELOPE)


class ChatError(Exception):
    """Bad input or a refused request; ``reason`` is shown to the peer as is."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """Input limits, configured once (``chatd.tap``) and shared by all adapters."""

    max_message_length: int = 4096
    history_limit: int = 100
    #: messages a second one user may send, on average (0: no limit)
    message_rate: int = 0
    #: messages one user may send at once before the rate applies
    message_burst: int = 50
    #: messages one connection may send a second, on average, whatever the user names on it (0: no limit);
    #: gRPC's one-shot SendMessage calls count per client address
    connection_rate: int = 0
    #: messages one connection may send at once before its rate applies
    connection_burst: int = 100
    #: rooms one connection may be in at once (0: no limit)
    rooms_per_connection: int = 0


class RateLimited(ChatError):
    """A user sent faster than ``Limits.message_rate`` allows."""


class ConnectionRateLimited(RateLimited):
    """A connection sent faster than ``Limits.connection_rate`` allows (whatever its user names)."""


class TooManyRooms(ChatError):
    """A join past ``Limits.rooms_per_connection``."""


def room(value: Any) -> str:
    """A room name: ``ROOM_RULE``."""
    if not isinstance(value, str):
        raise ChatError("room must be a string")
    if not _ROOM_RE.fullmatch(value):
        raise ChatError(f"invalid room name: must be {ROOM_RULE}")
    return value


def user(value: Any) -> str:
    """A user name: ``USER_RULE``."""
    if not isinstance(value, str):
        raise ChatError("user must be a string")
    if not _USER_RE.fullmatch(value):
        raise ChatError(f"invalid user name: must be {USER_RULE}")
    return value


def message(value: Any, limits: Limits) -> str:
    """Message text: non-empty, not only white space, at most the configured length."""
    if not isinstance(value, str):
        raise ChatError("message must be a string")
    if not value.strip():
        raise ChatError("message must not be empty")
    if len(value) > limits.max_message_length:
        raise ChatError(
            f"message too long: {len(value)} characters, the limit is {limits.max_message_length}"
        )
    return value


def limit(value: Any, limits: Limits) -> int:
    """A history length: an integer from 1 to the history limit; missing means all kept."""
    if value is None:
        return limits.history_limit
    if isinstance(value, bool) or not isinstance(value, int):
        raise ChatError("limit must be an integer")
    if value < 1:
        raise ChatError("limit must be at least 1")
    return min(value, limits.history_limit)


def client_id(value: Any) -> str | None:
    """A sender's idempotency key: 1-64 printable characters, or absent (None, "")."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ChatError("client_id must be a string")
    if len(value) > 64 or not value.isprintable():
        raise ChatError("client_id must be 1-64 printable characters")
    return value


def since_seq(value: Any, name: str = "since_seq") -> int:
    """A sequence number to resume after (0 means from the oldest kept message)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value >= 1 << 63:
        raise ChatError(f"{name} must be a non-negative integer")
    return value
