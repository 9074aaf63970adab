"""One connection's requests, answered in the order they came, while some wait for the store.

A ``join`` with ``since`` or a ``history`` of a room that is not in memory
is answered once the store has read the room back (off the reactor). A
client may pipeline: send the join and then, without waiting, a message to
the same room. Handled at once, that message would join the room and be
delivered live before the join's replay, and then again inside it. So
while a read is pending, a connection's later requests wait behind it and
are handled, in order, when it has answered: what a client sees is what it
would see if every read were instant. Each protocol adapter owns one
:class:`InOrder` per connection; what a request is (a frame, a record) is
the adapter's business.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from twisted.internet import defer

T = TypeVar("T")


class InOrder(Generic[T]):
    """Hands requests to ``handle`` one by one, holding them while a read it started is pending.

    ``handle(request)`` returns the Deferred of a read the request started
    (one not fired yet), or None. Past ``limit`` held requests, ``on_full``
    is called with the refused request instead (the adapter answers it in its
    protocol's form), so a client cannot grow the queue without bound.
    """

    __slots__ = ("_handle", "_on_full", "_held", "limit")

    def __init__(self, handle: Callable[[T], defer.Deferred | None], limit: int, on_full: Callable[[T], None]) -> None:
        self._handle = handle
        self._on_full = on_full
        self._held: deque[T] | None = None
        self.limit = limit

    @property
    def waiting(self) -> int:
        """How many requests are held behind a read."""
        return len(self._held) if self._held is not None else 0

    def submit(self, request: T) -> None:
        """Handle ``request`` now, or after the read that is pending."""
        held = self._held
        if held is not None:
            if len(held) >= self.limit:
                self._on_full(request)
            else:
                held.append(request)
            return
        read = self._handle(request)
        if read is not None and not read.called:
            self._held = deque()
            read.addBoth(self._answered)

    def _answered(self, result: Any) -> Any:
        held, self._held = self._held, None
        while held:
            self.submit(held.popleft())
            if self._held is not None:  # another read: the rest wait behind it
                self._held.extend(held)
                break
        return result
