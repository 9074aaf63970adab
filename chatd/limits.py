"""Limits per address and per connection, shared by every protocol.

Each adapter describes its peer its own way: Autobahn says ``tcp4:1.2.3.4:5``
or ``tcp6:::1:5``, twisted.web ``1.2.3.4:5`` (``::1:5`` for IPv6), grpcio
``ipv4:1.2.3.4:5`` or ``ipv6:[::1]:5``. :func:`address` reduces all of them
to one key per client address, so :class:`AddressCount` (owned by the hub)
counts a client's WebSocket, SignalR and gRPC connections together.
IPv4-mapped IPv6 addresses (``::ffff:1.2.3.4``, what a dual-stack listener
reports for an IPv4 client) count as the IPv4 address. Unix sockets and
anything else that is not an IP address are not limited: they are local.

:class:`IdleTimer` closes a connection that has sent nothing for a while
with one timer per connection; activity only moves a timestamp, so the hot
path pays one clock read per message.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from urllib.parse import unquote

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["AddressCount", "IdleTimer", "address"]

_SCHEMES = ("tcp4:", "tcp6:", "tcp:", "ipv4:", "ipv6:")


def address(peer: str) -> str | None:
    """The client address in ``peer`` (any adapter's form), normalised; None if it is not an IP.

    With a scheme (``tcp4:``, ``tcp6:``, ``ipv4:``, ``ipv6:``) a port always
    follows; without one, ``host:port``, ``[v6]:port`` or a bare address.
    """
    text = unquote(peer or "").strip()
    has_port = False
    for scheme in _SCHEMES:
        if text.startswith(scheme):
            text, has_port = text[len(scheme):], True
            break
    if text.startswith("["):  # [v6]:port
        text = text[1:].partition("]")[0]
    elif has_port or text.count(":") == 1:
        text = text.rpartition(":")[0]
    try:
        ip = ipaddress.ip_address(text.partition("%")[0])  # a scope id (fe80::1%eth0) is the same host
    except ValueError:
        return None
    return _normal(ip)


def _normal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


class AddressCount:
    """How many connections each client address has open, against ``limit`` (0: no limit).

    Counts are kept only while an address has a connection, so the table is
    as big as the number of distinct clients connected, never more.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.counts: dict[str, int] = {}

    def refusal(self, peer: str) -> str | None:
        """Why one more connection from ``peer`` is refused, or None if it is allowed."""
        key = address(peer) if self.limit else None
        if key is not None and self.counts.get(key, 0) >= self.limit:
            return f"too many connections from {key}: at most {self.limit} at once, close one or try again later"
        return None

    def claim(self, peer: str) -> str | None:
        """Count one more connection from ``peer`` (see :meth:`refusal`); the key to :meth:`release`.

        None when the connection is not counted (no limit, or not an IP address).
        """
        key = address(peer) if self.limit else None
        if key is not None:
            self.counts[key] = self.counts.get(key, 0) + 1
        return key

    def release(self, key: str | None) -> None:
        """Give back what :meth:`claim` counted (a None key is a no-op)."""
        if key is None:
            return
        left = self.counts.get(key, 0) - 1
        if left > 0:
            self.counts[key] = left
        else:
            self.counts.pop(key, None)


class IdleTimer:
    """Calls ``on_idle`` once nothing has been :meth:`touch`-ed for ``timeout`` seconds.

    One delayed call per connection: a touch only records the time, and
    when the call comes due early it is set again for the remainder.
    """

    def __init__(self, clock: IReactorTime, timeout: float, on_idle: Callable[[], None]) -> None:
        self.clock = clock
        self.timeout = timeout
        self._on_idle = on_idle
        self._last = clock.seconds()
        self._call: IDelayedCall | None = None

    def start(self) -> None:
        """Begin timing from now (a timeout of 0 never fires)."""
        self._last = self.clock.seconds()
        if self.timeout > 0 and self._call is None:
            self._call = self.clock.callLater(self.timeout, self._due)

    def touch(self) -> None:
        """The peer did something: the timeout runs from now."""
        self._last = self.clock.seconds()

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _due(self) -> None:
        self._call = None
        left = self._last + self.timeout - self.clock.seconds()
        if left > 0:
            self._call = self.clock.callLater(left, self._due)
            return
        self._on_idle()
