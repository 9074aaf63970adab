"""Write to a TCP socket at once when nothing is waiting, as asyncio and Go do.

A Twisted transport never writes in ``write()``: it appends to its buffer
and registers the socket for writability (``epoll_ctl``), and the next
reactor turn sends and unregisters it (a second ``epoll_ctl``); see
twisted/twisted#5303, open since 2011. For a chat server that is three
syscalls and two reactor events per delivery where one ``send`` does.

:func:`install` gives one accepted plain-TCP connection a ``write`` that,
when the transport has nothing buffered, calls ``send`` on the socket
straight away; whatever the kernel does not take (``EAGAIN``, a partial
send) and every error go to Twisted's own buffered ``write``, so from then
on Twisted's code owns the connection until its buffer is empty again:

- order: new bytes are sent directly only when nothing older is buffered;
- ``loseConnection``/``loseWriteConnection``: once asked, every write takes
  Twisted's path, which closes after the buffer drains;
- producers: the remainder goes through ``FileDescriptor.write``, which
  pauses a streaming producer (chatd's :class:`~chatd.hub.SendBudget`) when
  the buffer passes ``bufferSize``, and ``doWrite`` resumes it once drained,
  so ``--write-buffer-size`` still closes a reader that stopped reading;
- a connection lost under a write: the error is not raised or acted on
  here (the caller may be half-way through a fan-out); the bytes are
  buffered and the reactor's next ``doWrite`` meets the error and runs
  ``connectionLost`` the usual way;
- TLS: a transport with TLS started (``startTLS``) writes through its TLS
  layer as before; an ``ssl:`` listener's protocols never see a
  ``tcp.Server`` at all (their transport is the TLS protocol), so they are
  left alone.

Why a per-connection class swap and not a global patch or a custom port:
listeners are built from endpoint strings (``tcp:``, ``ssl:``,
``systemd:``, ``unix:``), and replacing ``tcp.Port`` would mean owning
every endpoint parser; patching ``tcp.Server`` globally would change every
Twisted connection in the process (the Redis client, the manhole).
Swapping ``__class__`` of exactly ``tcp.Server`` instances to a subclass,
at the point where a chat protocol takes the connection, touches only
those connections, costs no memory per connection (no bound methods in the
instance dict) and keeps ``isinstance`` checks true. The ``--ws`` port's
connections take it as they are accepted (``chatd.websocket.UpgradeChannel``),
so their HTTP answers and the WebSocket 101 are direct too.
"""

from __future__ import annotations

import fcntl
import sys
import termios
from collections.abc import Iterable
from typing import Any

from twisted.internet import tcp

__all__ = ["FastServer", "install", "unwritten"]


class FastServer(tcp.Server):
    """A ``tcp.Server`` whose writes go out at once while nothing is buffered.

    ``direct`` says whether a write may go straight to the socket now:
    nothing buffered, no close asked for or under way, connected, no TLS.
    It is worked out again after every step that can change one of those
    (a write that had to buffer, the reactor draining the buffer, a close,
    TLS starting), so a fan-out can test one attribute per recipient and
    call :meth:`send_direct` (see ``chatd.websocket.WebSocketSession``).
    """

    #: see the class docstring; ``install`` sets it for each connection
    direct = False

    def _update_direct(self) -> None:
        self.direct = not (
            self.dataBuffer
            or self._tempDataLen
            or self.TLS
            or self.disconnecting
            or self._writeDisconnecting
            or self._aborting
            or not self.connected
        )

    def send_direct(self, data: bytes) -> None:
        """Send ``data`` (non-empty bytes) now; only while :attr:`direct` is true.

        What the kernel does not take (``EAGAIN``, a partial send) and every
        error go to Twisted's buffered ``write``; see the module docstring.
        """
        try:
            sent = self.socket.send(data)
        except OSError:
            # EAGAIN, ENOBUFS, EINTR or a dead peer: let doWrite retry and
            # report a lost connection from the reactor, not from here.
            sent = 0
        if sent < len(data):
            tcp.Server.write(self, data[sent:] if sent else data)
            self.direct = False  # bytes are buffered now

    def write(self, data: bytes) -> None:
        if self.direct and type(data) is bytes and data:
            self.send_direct(data)
            return
        # Anything unusual (TLS, a close under way, bytes already waiting, not
        # bytes at all) is Twisted's to handle, exactly as before.
        tcp.Server.write(self, data)
        self._update_direct()

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        iovec = list(iovec)
        if self.direct and all(type(i) is bytes for i in iovec):
            self.write(b"".join(iovec))
        else:
            tcp.Server.writeSequence(self, iovec)
            self._update_direct()

    # Every other step that changes what ``direct`` depends on.

    def doWrite(self):  # type: ignore[no-untyped-def]
        result = tcp.Server.doWrite(self)
        self._update_direct()
        return result

    def loseConnection(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self.direct = False
        tcp.Server.loseConnection(self, *args, **kwargs)
        self._update_direct()

    def loseWriteConnection(self) -> None:
        self.direct = False
        tcp.Server.loseWriteConnection(self)
        self._update_direct()

    def abortConnection(self) -> None:
        self.direct = False
        tcp.Server.abortConnection(self)
        self._update_direct()

    def connectionLost(self, reason) -> None:  # type: ignore[no-untyped-def]
        self.direct = False
        tcp.Server.connectionLost(self, reason)
        self._update_direct()

    def startTLS(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.direct = False
        result = tcp.Server.startTLS(self, *args, **kwargs)
        self._update_direct()
        return result


def install(transport: object) -> bool:
    """Give ``transport`` the direct write path if it is a plain accepted TCP connection.

    Returns whether it did: anything else (TLS, UNIX sockets, test
    transports, subclasses of ``tcp.Server`` with their own ideas) is left
    as it is.
    """
    if type(transport) is tcp.Server and not transport.TLS:
        transport.__class__ = FastServer
        # The instance's attributes were laid out for tcp.Server; under the new
        # class CPython no longer finds them by its fast path and every read
        # takes the generic lookup, about twice as slow. A plain dict of the
        # same attributes is fast again.
        transport.__dict__ = dict(transport.__dict__)
        transport._update_direct()
        return True
    return type(transport) is FastServer


def unwritten(transport: Any) -> int:
    """Bytes on their way to the peer that it has not taken: the transport's buffer and the kernel's.

    The kernel's part (``SIOCOUTQ``: sent but not acknowledged, or not sent
    yet) moves as soon as the peer reads; the transport's only once the
    kernel's has room again, which can take seconds of reading. 0 when
    the transport holds nothing (its close does not wait on the peer; no
    system call is made then, the common case) or cannot tell (not a
    Twisted TCP transport).
    """
    try:
        held = len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    except (AttributeError, TypeError):
        return 0
    if not held:
        return 0
    try:
        queued = fcntl.ioctl(transport.socket.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        held += int.from_bytes(queued, sys.byteorder)
    except (AttributeError, OSError, ValueError):
        pass
    return held
