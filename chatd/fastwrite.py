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

**Several writes in one reactor turn are one send.** Under load a
connection is written to more than once per turn: a batch of stored
messages acknowledged together, several senders' messages read in one
poll, a replay. The first write of a turn goes out at once, as above;
later ones in the same turn are held and sent together, as one ``send``
of the frames back to back, when the turn ends (a ``callLater(0)``, which
runs before the reactor polls again), or sooner once
:data:`HOLD_LIMIT` bytes are held, so that a reader that stopped still
fills Twisted's buffer and pauses the producer within the turn. That is
what Go's gorilla does in its write pump, and it is where a server under
load saves syscalls: the frames are the same, the order is the same, and
a close (``loseConnection``) sends what is held first.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet import tcp
from twisted.logger import Logger

__all__ = ["FastServer", "HOLD_LIMIT", "install"]

#: bytes held for one connection within a turn before they are sent anyway (see the module docstring)
HOLD_LIMIT = 64 * 1024


class _Turns:
    """Which reactor turn it is, for :class:`FastServer`; the one owner of the held connections.

    A turn ends when the ``callLater(0)`` armed by its first direct send
    runs: then every connection holding writes sends them, and the next
    write to any connection counts as the first of a new turn.
    """

    def __init__(self) -> None:
        self.n = 0
        self.armed = False
        self.held: list[FastServer] = []

    def arm(self, reactor) -> None:
        self.armed = True
        reactor.callLater(0, self.end)

    def end(self) -> None:
        self.n += 1
        self.armed = False
        held, self.held = self.held, []
        for transport in held:
            try:
                transport._flush()
            except Exception:  # one connection's failure must not keep the others' frames held
                _log.failure("sending the writes held for {transport} failed", transport=transport)


_log = Logger()
_turns = _Turns()


class FastServer(tcp.Server):
    """A ``tcp.Server`` whose writes go out at once while nothing is buffered."""

    #: writes held in this turn (see the module docstring); None when there are none
    _pending: list[bytes] | None = None
    _pending_size = 0
    #: the turn of this connection's last direct send
    _sent_turn = -1

    def write(self, data: bytes) -> None:
        pending = self._pending
        if pending is not None:
            if type(data) is bytes:
                pending.append(data)
                self._pending_size += len(data)
                if self._pending_size > HOLD_LIMIT:
                    self._flush()
                return
            self._flush()
        # Anything unusual (TLS, a close under way, bytes already waiting, not
        # bytes at all) is Twisted's to handle, exactly as before.
        if (
            self.dataBuffer
            or self._tempDataLen
            or self.TLS
            or self.disconnecting
            or self._writeDisconnecting
            or self._aborting
            or not self.connected
            or type(data) is not bytes
            or not data
        ):
            tcp.Server.write(self, data)
            return
        turns = _turns
        if self._sent_turn == turns.n:
            self._pending = [data]
            self._pending_size = len(data)
            turns.held.append(self)
            return
        self._sent_turn = turns.n
        if not turns.armed:
            turns.arm(self.reactor)
        self._send(data)

    def _send(self, data: bytes) -> None:
        try:
            sent = self.socket.send(data)
        except OSError:
            # EAGAIN, ENOBUFS, EINTR or a dead peer: let doWrite retry and
            # report a lost connection from the reactor, not from here.
            sent = 0
        if sent < len(data):
            tcp.Server.write(self, data[sent:] if sent else data)

    def _flush(self) -> None:
        """Send what this turn held, in order, ahead of anything written after."""
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        data = b"".join(pending) if len(pending) > 1 else pending[0]
        if self.dataBuffer or self._tempDataLen or self._aborting or not self.connected:
            tcp.Server.write(self, data)
        else:
            self._send(data)

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        iovec = list(iovec)
        if not self.dataBuffer and not self._tempDataLen and all(type(i) is bytes for i in iovec):
            self.write(b"".join(iovec))
        else:
            self._flush()
            tcp.Server.writeSequence(self, iovec)

    def loseConnection(self, *args, **kwargs) -> None:
        self._flush()
        tcp.Server.loseConnection(self, *args, **kwargs)

    def loseWriteConnection(self) -> None:
        self._flush()
        tcp.Server.loseWriteConnection(self)

    def abortConnection(self) -> None:
        self._pending = None
        tcp.Server.abortConnection(self)

    def connectionLost(self, reason) -> None:
        self._pending = None
        tcp.Server.connectionLost(self, reason)


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
        # (a write reads ten) takes the generic lookup, about twice as slow.
        # A plain dict of the same attributes is fast again.
        transport.__dict__ = dict(transport.__dict__)
        return True
    return type(transport) is FastServer
