"""The plain WebSocket protocol: JSON text frames at ``/ws``.

Client to server (one JSON object per text frame)::

    {"user": U, "message": M, "room": R}          seed form: join R as U if needed, then send M
    {"type": "join", "room": R, "user": U}        -> {"type": "joined", "room", "user", "members"}
    {"type": "join", "room": R, "user": U, "since": N}
                                                  resume: every kept message after seq N, then live;
                                                  the reply adds "truncated": true and "first_seq"
                                                  when some of those are older than what is kept
    {"type": "leave", "room": R}                  -> {"type": "left", "room"}
    {"type": "message", "room": R, "message": M}  (must have joined R)
    {"type": "history", "room": R, "limit": N}    -> {"type": "history", "room", "messages": [...]}
                                                  (the newest that fit in 1 MiB; "truncated": true if not all)
    {"type": "ping"}                              -> {"type": "pong"}

Any request may carry ``"ref"`` (string or number); replies and errors echo it,
and a chat message with a ``ref`` is acknowledged once stored with
``{"type": "sent", "room", "id", "seq", "ref"}``. Any other ``ref`` is refused.
A chat message (either form) may carry ``"client_id"`` (1-64 characters): a
retry with the same one in the same room is stored and delivered once, and
its ``sent`` (always sent when there is a ``client_id``) carries the
original's ``id`` and ``seq``. A message the store could not keep gets an
error, never a ``sent``.

Every frame gets at most one reply. A refused request (malformed JSON, a
field of the wrong type, an unknown ``type``...) gets ``{"type": "error"}``
and changes nothing; a server bug answers ``"internal error"``. Neither
closes the connection.

Server to client::

    {"type": "message", "id", "seq", "room", "user", "message", "timestamp", "protocol"}
    {"type": "presence", "action": "join"|"leave", "room", "user", "timestamp", "protocol", "count"}
    {"type": "error", "error": REASON, "request": TYPE}

Close codes: 1013 server full or too many connections from the client's
address, 1008 too slow (send buffer exceeded) or bad origin, 1001 server going
away, 4000 closed by an operator, 4001 token expired (come back with a new
one), 4008 idle (``--idle-timeout``: no data frame and no ping from the client
for that long; pongs answering the server's keep-alive pings do not count,
they only show the peer is alive). A 1008 "too slow" reason ends with where to
resume, ``; resume with ROOM since=N, ...`` (N the seq of the last message
sent to the client in that room), so rejoining with ``"since": N`` misses
nothing.

With token authentication on (``chatd.auth``) the upgrade request carries
the token as ``?token=`` (browsers) or ``Authorization: Bearer``; without a
valid one the upgrade is refused with HTTP 401 before any session exists.
The user name is then the token's: ``user`` may be left out, and another
name gets an error reply, as does a room outside the token's ``rooms``.
"""

from __future__ import annotations

import operator
import os
import threading
from collections import Counter, deque
from collections.abc import Callable
from pprint import pformat
from typing import Any

import autobahn.twisted.websocket as _autobahn_twisted
import autobahn.websocket.protocol as _autobahn_protocol
import orjson
import txaio
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.util import create_transport_details as _create_transport_details
from autobahn.twisted.util import peer2str as _peer2str
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.util import hltype as _hltype
from autobahn.util import hlval as _hlval
from autobahn.wamp.types import TransportDetails
from autobahn.websocket.protocol import PreparedMessage
from autobahn.websocket.types import ConnectionDeny
from autobahn.websocket.utf8validator import Utf8Validator as _Utf8Validator
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ISSLTransport
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.web.server import Site

from chatd import fastwrite, validate
from chatd.auth import Identity, Unauthenticated
from chatd.events import Event, Message
from chatd.http import DeadlineChannel, OriginPolicy
from chatd.hub import Hub, Joined, SendBudget, ServerFull, Session
from chatd.limits import IdleTimer
from chatd.logs import printable
from chatd.ordered import InOrder
from chatd.validate import ChatError
from chatd.wsframes import FastReceive
from chatd.wshandshake import FastHandshake

_log = Logger()  # Autobahn claims ``self.log`` on protocols.

PROTOCOL = "websocket"
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TRY_AGAIN_LATER = 1013
#: frames a connection may send while one of its requests is read from the store
MAX_BACKLOG = 1000
#: Autobahn's timer calls (keep-alive pings above all) run in one reactor turn at most
KEEP_ALIVE_CHUNK = 100
CLOSE_KICKED = 4000
CLOSE_TOKEN_EXPIRED = 4001
CLOSE_IDLE = 4008


def frame(payload: bytes, binary: bool = False) -> PreparedMessage:
    """One whole, unmasked, uncompressed server frame of ``payload``.

    Server frames are unmasked, so one frame serves every recipient.
    Replies are framed this way too (see :class:`DirectSend`), not by
    Autobahn's ``sendMessage``: that costs three times as much per message
    and refuses to *send* more than ``maxMessagePayloadSize``, which is
    chatd's inbound limit (``--read-buffer-size``) -- a history reply of
    long messages is larger than any one request, and used to drop the
    connection.
    """
    return PreparedMessage(payload, binary, False, True)


def _prepare(event: Event) -> PreparedMessage:
    return frame(orjson.dumps(event.as_dict()))


def _send_close(proto: WebSocketServerProtocol, code: int, reason: str) -> None:
    # Autobahn's sendClose() only lets applications use 1000 and 3000-4999;
    # a server may rightly say 1001, 1008 or 1013 (RFC 6455 section 7.4.1).
    data = reason.encode()[:123].decode("utf-8", "ignore").encode()
    proto.sendCloseFrame(code=code, reasonUtf8=data, isReply=False)


class WebSocketSession(Session):
    """The hub's handle on one WebSocket connection."""

    protocol = PROTOCOL

    def __init__(
        self, proto: ChatServerProtocol, peer: str, write_limit: int, identity: Identity | None = None
    ) -> None:
        super().__init__(peer, identity)
        self._proto = proto
        self.budget = SendBudget(write_limit, self._too_slow)
        self.close_reason: str | None = None
        #: when the hub took the connection (its one log line, at the close, says how long it was open)
        self.opened = 0.0
        #: set by a request whose answer is being read from the store (a resume, a history)
        self.reading: defer.Deferred | None = None
        #: a close frame has been sent: nothing more is (see :meth:`deliver`)
        self.closing = False
        #: the connection's transport while deliveries may skip Autobahn's send path
        #: (a plain TCP connection, no compression, nothing queued by Autobahn); else None
        self.direct: fastwrite.FastServer | None = None

    def deliver(self, event: Event) -> None:
        # The common case first, touching as few objects as it can (this runs
        # once per recipient): a connection with nothing buffered and no close
        # under way sends the shared frame straight to its socket. With
        # nothing buffered the send budget is not counting (it counts only
        # while the transport has paused it, which a full buffer does).
        out = self.direct
        if out is not None and out.direct and not self.closing:
            out.send_direct(event.encoded(PROTOCOL, _prepare).payloadHybi)
            if isinstance(event, Message):
                self.delivered(event)
            return
        # Once a close frame has been sent (the server's, or its answer to the
        # peer's), no data frame may follow (RFC 6455 5.5.1). The session stays
        # in its rooms until the TCP connection ends, a reactor turn or more
        # later: in a wave of closes, each one's leave reached the others.
        if self.closing:
            return
        frame = event.encoded(PROTOCOL, _prepare)
        budget = self.budget
        # The budget counts only while the transport is backed up (paused): skip the call otherwise.
        if (budget.paused or budget.overflowed) and not budget.charge(len(frame.payloadHybi)):
            return
        self._proto.sendPreparedMessage(frame)
        if isinstance(event, Message):
            self.delivered(event)

    def send(self, body: dict) -> None:
        """A reply to this client only (none once the connection is closing, see :meth:`deliver`)."""
        if self.closing:
            return
        payload = orjson.dumps(body)
        if self.budget.charge(len(payload)):
            self._proto.sendMessage(payload)

    def close(self, reason: str, code: int = CLOSE_KICKED) -> None:
        self.close_reason = reason
        self._proto.factory.hub.disconnect(self)
        _send_close(self._proto, code, reason)

    def going_away(self, reason: str) -> None:
        self.close(reason, CLOSE_GOING_AWAY)

    def token_expired(self) -> None:
        self.close("token expired", CLOSE_TOKEN_EXPIRED)

    def _too_slow(self) -> None:
        self._proto.factory.hub.metrics.too_slow(PROTOCOL)
        reason = f"too slow: more than {self.budget.limit} bytes waiting to be sent"
        # Like gRPC's: where to resume, so a reconnect with ``since`` misses nothing.
        # Only rooms still joined count; a close reason holds 123 bytes, so with many
        # rooms the last ones may be cut (the client's own last seen seq still works).
        rooms = sorted(room for room in self.last_seqs if room in self.rooms)
        if rooms:
            reason += "; resume with " + ", ".join(f"{room} since={self.last_seqs[room]}" for room in rooms)
        self.close(reason, CLOSE_POLICY)


class _TypeName:
    """Autobahn's ``hltype(obj)``, formatted only if a log line is ever written.

    Autobahn passes ``func=hltype(self.method)`` to its debug log calls on
    every connection, every read and every write; the argument is built
    (a qualified name split, joined and decorated: about 1.5 us) even
    though debug lines are dropped at chatd's log levels: some 16 times
    per connection. This stands in for the string until something formats it.
    """

    __slots__ = ("_obj",)
    _format = staticmethod(_hltype)

    def __init__(self, obj: object) -> None:
        self._obj = obj

    def __str__(self) -> str:
        return self._format(self._obj)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    __repr__ = __str__


class _Value(_TypeName):
    """Autobahn's ``hlval(value)``, likewise: a lost connection's debug lines pass its
    reason, a ``Failure``, whose text is its traceback (about 3 us per connection)."""

    __slots__ = ()
    _format = staticmethod(_hlval)


def _pformat(value: object) -> str:
    """``pprint.pformat``, but ``"[]"`` at once for the empty list that
    :class:`ServerProtocol` leaves Autobahn to dump on every connection."""
    if type(value) is list and not value:
        return "[]"
    return pformat(value)


class _LazyUtf8Validator:
    """Autobahn's incremental UTF-8 validator, made only when first used.

    Autobahn's ``_connectionMade`` makes one for every connection (a CFFI
    object with a finaliser: about 1 % of the server's CPU per connection
    in a reconnect storm, W5) for its own frame parser's text messages.
    chatd's :class:`~chatd.wsframes.FastReceive` checks the plain frames
    itself, so most connections never use it. Autobahn calls only
    ``reset`` (a new validator is already reset) and ``validate``.
    """

    __slots__ = ("_validator",)
    _make = staticmethod(_Utf8Validator)

    def __init__(self) -> None:
        self._validator: Any = None

    def reset(self) -> None:
        if self._validator is not None:
            self._validator.reset()

    def validate(self, payload: bytes) -> tuple[bool, bool, int, int]:
        if self._validator is None:
            self._validator = self._make()
        return self._validator.validate(payload)


def _defer_type_names() -> None:
    """Make Autobahn's WebSocket modules build debug log arguments lazily (see :class:`_TypeName`),
    and its UTF-8 validators when they are needed (:class:`_LazyUtf8Validator`)."""
    for module in (_autobahn_protocol, _autobahn_twisted):
        if module.hltype is _hltype:
            module.hltype = _TypeName
        if module.hlval is _hlval:
            module.hlval = _Value
    if _autobahn_protocol.pformat is pformat:
        _autobahn_protocol.pformat = _pformat
    if _autobahn_protocol.Utf8Validator is _Utf8Validator:
        _autobahn_protocol.Utf8Validator = _LazyUtf8Validator


_defer_type_names()

#: the options a server connection copies from its factory
_OPTIONS = WebSocketServerProtocol.CONFIG_ATTRS
_options_of = operator.attrgetter(*_OPTIONS)


class ServerProtocol(WebSocketServerProtocol):
    """Autobahn's server protocol, lighter per connection.

    **Options.** Autobahn's ``_connectionMade`` copies the factory's some 30
    options onto every connection and, for a debug line nobody reads,
    pretty-prints them all (``pprint.pformat``), log level or not: about a
    fifth of the server's CPU in a reconnect storm. Here the options are
    class attributes of one subclass per factory (made at its first
    connection, made again if its options change), and each connection
    only switches its class to it: nothing is copied or printed, and a
    connection's ``__dict__`` holds its own state alone. That matters more
    than it looks: at 88 attributes an instance dict had outgrown its
    128-slot table (3.3 KB); at under 60 it stays in it (1.7 KB), a fifth
    of an idle connection's memory (W3). An attribute already set on the
    connection still wins, as it did.

    **What the handshake leaves behind.** The request's bytes, its parsed
    headers and extension offers, and the 101 response are kept by Autobahn
    for the connection's life; they are dropped once it is open. The send
    queue (a ``deque``, 600 bytes) is used only for Autobahn's ``sync`` or
    chopped writes, which chatd never asks for: a connection gets one only
    if it does (:class:`DirectSend`).

    **The handshake timer.** Autobahn starts its opening-handshake timer
    (``openHandshakeTimeout``) as the connection is made. Behind
    twisted.web's ``WebSocketResource``, and on the short way in
    (:class:`UpgradeChannel`), the protocol is made only once the whole
    request is in, and the handshake ends (accepted or refused) within the
    same call unless ``onConnect`` waits: the timer was created and
    cancelled at once, for every connection. It is started only if the
    handshake is still pending when :meth:`processHandshake` returns.
    """

    CONFIG_ATTRS: tuple[str, ...] = ()
    #: empty until a queued write needs a real one (see :class:`DirectSend`)
    send_queue: Any = ()

    def connectionMade(self) -> None:
        # Autobahn's Twisted adapter, less two things paid on every connection:
        # its transport details ask the kernel for the process and thread ids
        # (two syscalls), and its setTcpNoDelay(self.tcpNoDelay) only raised an
        # AttributeError (the option is set on the connection later, in
        # _connectionMade); the HTTP channel that accepted the connection has
        # already set TCP_NODELAY (see chatd.http.DeadlineChannel).
        details = self._transport_details = _transport_details(self.transport, self.is_server)
        self.peer = details.peer
        self._connectionMade()
        self.log.debug(
            '{func} connection established for peer="{peer}"',
            func=_TypeName(self.connectionMade),
            peer=_Value(self.peer),
        )

    def _connectionMade(self) -> None:
        self.__class__ = _with_options(type(self), self.factory)
        own = self.__dict__.get("openHandshakeTimeout")
        self.openHandshakeTimeout = 0  # no timer yet: see processHandshake
        super()._connectionMade()
        if own is None:
            del self.openHandshakeTimeout
        else:
            self.openHandshakeTimeout = own
        del self.send_queue

    def processHandshake(self) -> None:
        self._read_handshake()
        if self.state == self.STATE_OPEN:
            # Read by nothing once open (see the class docstring).
            self.http_request_data = self.http_response_data = None
            self.http_headers = {}
            self.websocket_extensions = []
        elif (
            self.state == self.STATE_CONNECTING
            and self.openHandshakeTimeout > 0
            and self.openHandshakeTimeoutCall is None
        ):
            self.openHandshakeTimeoutCall = self.factory._batched_timer.call_later(
                self.openHandshakeTimeout, self.onOpenHandshakeTimeout
            )

    def _read_handshake(self) -> None:
        """Autobahn's reading of the request (a subclass may take the plain case first: :mod:`chatd.wshandshake`)."""
        super().processHandshake()

    #: this connection's refusal is in the log already, by chatd's own budgeted line (see failHandshake)
    _refusal_logged = False

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:  # noqa: N803
        """Autobahn's answer to a refused upgrade, logged as chatd logs refusals.

        Autobahn logs every refusal twice (an info line, then a warning as it
        drops the connection), outside the budget chatd's own refusal lines
        keep (:meth:`CloseLog.refused`): a flood of upgrades with bad tokens
        or bad headers would flood the log. A refusal chatd decided is in
        the log already; one Autobahn's parser decided gets its line here.
        """
        closes = getattr(self.factory, "closes", None)
        if not self._refusal_logged:
            if closes is None:  # a factory without chatd's close log: Autobahn's lines, as they were
                super().failHandshake(reason, code, responseHeaders)
                return
            closes.refused(f"bad upgrade ({code})", self.peer, printable(reason))
        self.wasNotCleanReason = reason
        self.sendHttpErrorResponse(code, reason, responseHeaders)
        own = vars(self).get("log")
        self.log = _QUIET  # dropConnection's warning: the refusal is logged already
        try:
            self.dropConnection(abort=False)
        finally:
            if own is None:
                del self.log
            else:
                self.log = own

    #: the deadline of a clean close that waits on the peer to read (see dropConnection)
    _close_deadline: Any = None
    #: bytes the transport still held for the peer at the last look
    _close_left = 0

    def dropConnection(self, abort: bool = False) -> None:
        """Autobahn's, with a deadline on a clean close that makes no progress.

        Answering a peer's close, Autobahn ends the TCP connection cleanly:
        the transport closes once everything queued is written. A peer that
        stopped reading (with less waiting than the slow-client bound) and
        then sent its close never lets that happen, and no timer of
        Autobahn's covers it (``closeHandshakeTimeout`` runs only for a
        close the server began): the session, its rooms and its buffers
        would be held for ever. So every ``closeHandshakeTimeout`` what is
        still on its way to the peer (:func:`chatd.fastwrite.unwritten`) is looked at: a
        peer that took some of it since the last look gets another period,
        one that took nothing is aborted.
        """
        was_open = self.state != self.STATE_CLOSED
        super().dropConnection(abort)
        if not abort and was_open and self._close_deadline is None and self.closeHandshakeTimeout:
            self._close_left = fastwrite.unwritten(self.transport)
            if self._close_left:
                self._close_deadline = self.factory.reactor.callLater(self.closeHandshakeTimeout, self._close_overdue)

    def _close_overdue(self) -> None:
        self._close_deadline = None
        transport = self.transport
        if transport is None or not getattr(transport, "connected", False):
            return
        left = fastwrite.unwritten(transport)
        if left and left < self._close_left:  # the peer is reading: give it another period
            self._close_left = left
            self._close_deadline = self.factory.reactor.callLater(self.closeHandshakeTimeout, self._close_overdue)
        elif left:
            transport.abortConnection()

    def _connectionLost(self, reason: Any) -> None:
        if self._close_deadline is not None:
            self._close_deadline.cancel()
            self._close_deadline = None
        super()._connectionLost(reason)


class _Quiet:
    """A txaio logger that says nothing (see ServerProtocol.failHandshake)."""

    def __getattr__(self, level: str) -> Callable[..., None]:
        return _say_nothing


def _say_nothing(*args: Any, **kwargs: Any) -> None:
    pass


_QUIET = _Quiet()


#: this process's and its reactor thread's ids, for :func:`_transport_details`
_own_ids: tuple[int, int] | None = None


def _forget_own_ids() -> None:
    global _own_ids
    _own_ids = None


os.register_at_fork(after_in_child=_forget_own_ids)


def _transport_details(transport: Any, is_server: bool | None) -> TransportDetails:
    """What Autobahn's ``create_transport_details`` returns, the process and thread ids looked up once.

    Autobahn calls ``os.getpid()`` and ``threading.get_native_id()`` (a
    syscall each) for every connection, for fields chatd never reads; a
    reactor runs in one thread of one process. TLS transports (their
    channel id and certificate) are left to Autobahn.
    """
    global _own_ids
    if ISSLTransport.providedBy(transport):
        return _create_transport_details(transport, is_server)
    if _own_ids is None:
        _own_ids = (os.getpid(), threading.get_native_id())
    return TransportDetails(
        channel_type=TransportDetails.CHANNEL_TYPE_TCP,
        channel_framing=TransportDetails.CHANNEL_FRAMING_WEBSOCKET,
        peer=_peer2str(transport),
        is_server=is_server,
        own_pid=_own_ids[0],
        own_tid=_own_ids[1],
        own_fd=-1,
        is_secure=False,
        channel_id={},
        peer_cert=None,
    )


def _with_options(cls: type, factory: Any) -> type:
    """``cls``, or the subclass of it carrying ``factory``'s current options as class attributes."""
    if "_chatd_options" in cls.__dict__:
        return cls  # already switched (a connection made twice)
    values = _options_of(factory)
    made = factory.__dict__.get("_chatd_protocol")
    if made is None or made.__bases__[0] is not cls or made._chatd_options != values:
        # A function option (perMessageCompressionAccept) must not become a method.
        attrs = {k: staticmethod(v) if hasattr(type(v), "__get__") else v for k, v in zip(_OPTIONS, values)}
        made = type(cls.__name__, (cls,), {**attrs, "_chatd_options": values})
        made.__module__ = cls.__module__
        made.__qualname__ = cls.__qualname__
        factory._chatd_protocol = made
    return made


class DirectSend:
    """Autobahn's send path without its per-write bookkeeping nobody here reads.

    ``sendData`` (every frame's last stop) builds a debug log call's
    arguments (``hltype``/``hlval`` format the method and peer) whether or
    not debug is on, and counts wire octets in ``trafficStats`` that chatd
    never reads: about a sixth of the CPU of a fan-out. An unqueued, unchopped
    write goes straight to the transport; anything else (``sync``,
    ``chopsize``, frames already queued, ``logOctets``) takes Autobahn's own
    path. A prepared frame, when compression is off, skips the hop through
    ``sendPreparedMessage``'s own checks the same way, and a whole message
    is framed by :func:`frame` (a third of ``sendMessage``'s cost, and no
    refusal to send more than the inbound limit).
    """

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        if sync or chopsize or self.send_queue or self.logOctets:
            if type(self.send_queue) is not deque:
                self.send_queue = deque()  # the connection's own, made when first needed (see ServerProtocol)
            self._queue_used()
            super().sendData(data, sync, chopsize)
        else:
            self.transport.write(data)

    def _queue_used(self) -> None:
        """Autobahn's send queue holds frames now: whatever writes around it must stop (see ChatServerProtocol)."""

    def sendMessage(  # noqa: N802 (Autobahn's names)
        self,
        payload: bytes,
        isBinary: bool = False,  # noqa: N803
        fragmentSize: int | None = None,  # noqa: N803
        sync: bool = False,
        doNotCompress: bool = False,  # noqa: N803
    ) -> None:
        if (
            self.state == self.STATE_OPEN
            and fragmentSize is None
            and not sync
            and not self.autoFragmentSize
            and self._perMessageCompress is None
            and not self.send_queue
            and not self.logOctets
            and not self.trackedTimings
        ):
            self.transport.write(frame(payload, isBinary).payloadHybi)
        else:
            super().sendMessage(payload, isBinary, fragmentSize, sync, doNotCompress)

    def sendPreparedMessage(self, preparedMsg: PreparedMessage) -> None:  # noqa: N803 (Autobahn's name)
        if self._perMessageCompress is None and not self.send_queue and not self.logOctets:
            self.transport.write(preparedMsg.payloadHybi)
        else:
            super().sendPreparedMessage(preparedMsg)


class CloseLog(Service):
    """The one log line of each connection, at its close; past :attr:`per_second`, a summary.

    A line is formatted and written for every connection (about 45 us of
    CPU with twistd's log file observer, measured in-process: several
    hundredths of the server's CPU per connection in a reconnect storm). Up to ``per_second``
    closes a second are logged one by one, as ever; the rest of that
    second are counted by close code and told in one line when the second
    is over (or when the service stops), so an operator still sees every
    close, and who, whenever the rate is one a human reads line by line.
    Connections refused before they became sessions (server full, a bad
    token, a foreign origin) share the same budget and get their own
    summary line, counted by kind.
    """

    name = "websocket-closes"
    #: closes a second logged one line each
    per_second = 20

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._window_end = 0.0
        self._lines = 0
        #: close code -> closes in this second not logged one by one
        self._skipped: Counter[int | None] = Counter()
        #: refusal kind -> refusals in this second not logged one by one
        self._refusals: Counter[str] = Counter()
        self._summary: IDelayedCall | None = None

    def _line(self) -> bool:
        """Whether this second may have one more line; counts it."""
        now = self.clock.seconds()
        if now >= self._window_end:
            self._window_end, self._lines = now + 1.0, 0
        if self._lines < self.per_second:
            self._lines += 1
            return True
        if self._summary is None:
            self._summary = self.clock.callLater(self._window_end - now, self.summarise)
        return False

    def refused(self, kind: str, peer: str, reason: str) -> None:
        """Log a connection refused before it became a session (``kind``: what the summary counts it as).

        Refusals share the closes' budget of lines a second: a storm against
        a full server, or of bad tokens, costs a line each otherwise.
        """
        if self._line():
            _log.info("{peer} refused: {reason}", peer=peer, reason=reason)
        else:
            self._refusals[kind] += 1

    def closed(self, session: WebSocketSession, clean: bool, code: int | None, reason: str | None) -> None:
        """Log the close of ``session`` (its peer's ``code`` and ``reason``), or count it under load."""
        now = self.clock.seconds()
        if self._line():
            # A peer's close reason is its own text: escaped, it cannot forge a log line.
            why = session.close_reason or printable(reason or "") or ("closed" if clean else "connection lost")
            _log.info(
                "{peer} ({user}) disconnected after {open:.1f} s: {why} (code {code})",
                peer=session.peer,
                user=session.user or "-",
                open=now - session.opened,
                why=why,
                code=code,
            )
            return
        self._skipped[code] += 1

    def summarise(self) -> None:
        """Log the closes counted but not logged one by one, if any."""
        if self._summary is not None and self._summary.active():
            self._summary.cancel()
        self._summary = None
        refusals, self._refusals = self._refusals, Counter()
        skipped, self._skipped = self._skipped, Counter()
        span = self.clock.seconds() - self._window_end + 1.0
        for counted, what, label in ((refusals, "refused", "{n} {key}"), (skipped, "closed", "{n} with code {key}")):
            if counted:
                _log.info(
                    "{count} more connections {what} in {span:.1f} s, not logged one by one: {kinds}",
                    count=sum(counted.values()),
                    what=what,
                    span=span,
                    kinds=", ".join(label.format(n=n, key=key) for key, n in counted.most_common()),
                )

    def stopService(self) -> None:
        super().stopService()
        self.summarise()


class ChatServerProtocol(FastHandshake, FastReceive, DirectSend, ServerProtocol):
    """One WebSocket connection: parse, validate, call the hub, reply."""

    factory: ChatWebSocketFactory
    session: WebSocketSession | None = None
    identity: Identity | None = None
    #: frames wait here while an answer is read from the store (made at the first frame)
    _in_order: InOrder[tuple[bytes, bool]] | None = None
    _idle: IdleTimer | None = None
    #: the client sent a message or a ping since the last keep-alive check (see _sendAutoPing)
    _heard = False

    def onConnect(self, request):
        auth = self.factory.hub.auth
        if auth is not None:
            token = request.params.get("token")
            try:
                self.identity = auth.from_request(request.headers.get("authorization"), token[0] if token else None)
            except Unauthenticated as e:
                self.factory.hub.metrics.error("unauthenticated", PROTOCOL)
                raise self._refuse(401, "unauthenticated", e.reason) from None
        origin = request.headers.get("origin")
        if not self.factory.origins.allows(origin, request.host):
            raise self._refuse(403, "origin not allowed", "origin not allowed", f"origin {printable(origin)} not allowed")
        return None

    def _refuse(self, code: int, kind: str, reason: str, logged: str | None = None) -> ConnectionDeny:
        """The refusal of this upgrade, logged once (see :meth:`ServerProtocol.failHandshake`)."""
        self.factory.closes.refused(kind, self.peer, logged or reason)
        self._refusal_logged = True
        return ConnectionDeny(code, reason)

    def onOpen(self) -> None:
        hub = self.factory.hub
        session = WebSocketSession(self, self.peer, self.factory.write_limit, self.identity)
        try:
            hub.connect(session)
        except ServerFull as e:
            hub.metrics.error("server_full", PROTOCOL)
            self.factory.closes.refused("server full", self.peer, e.reason)
            _send_close(self, CLOSE_TRY_AGAIN_LATER, e.reason)
            return
        except Unauthenticated as e:  # expired between the upgrade and now
            _send_close(self, CLOSE_TOKEN_EXPIRED, e.reason)
            return
        self.session = session
        session.budget.attach(self.transport)
        if fastwrite.install(self.transport) and self._perMessageCompress is None and not self.logOctets:
            session.direct = self.transport
        # No line here: a connection is logged once, when it ends (see onClose),
        # which halves the log's share of a reconnect storm.
        session.opened = hub.clock.seconds()
        self._watch_idle()

    def _watch_idle(self) -> None:
        """Close the connection after ``--idle-timeout`` seconds without a message or ping from it."""
        timeout = self.factory.idle_timeout
        if timeout > 0:
            self._idle = IdleTimer(self.factory.hub.clock, timeout, self._idle_expired)
            self._idle.start()

    def _idle_expired(self) -> None:
        session = self.session
        if session is None or session.id not in self.factory.hub.sessions:
            return
        self.factory.hub.metrics.limited("idle_timeout", PROTOCOL)
        session.close(f"idle: nothing received for {self.factory.idle_timeout:g} s", CLOSE_IDLE)

    def onPing(self, payload: bytes) -> None:
        # A client's own ping is activity; a pong (answering our keep-alive) is not.
        self._heard = True
        if self._idle is not None:
            self._idle.touch()
        super().onPing(payload)

    def _sendAutoPing(self) -> None:
        """Autobahn's keep-alive ping, sent only to a client silent for a whole interval.

        Autobahn pings every connection ``autoPingInterval`` after it opened
        (and after each answer), however much the client is sending. A
        client that sent a message since the last check is known to be
        there; a ping would only cost both ends a frame each, and they came
        in bursts: every connection opened in the same second is pinged in
        the same reactor turn (txaio's timer buckets are whole seconds).
        With 1,000 chat clients that was a 13-26 ms turn for the pings and
        up to 57 ms for the pongs, every second for as long as the burst of
        connections had lasted (W2's tail). A silent client (one that only
        receives, or a peer gone without a FIN) is pinged as before, and
        closed when it does not answer within ``autoPingTimeout``.
        """
        if self._heard:
            self._heard = False
            self.autoPingPendingCall = self.factory._batched_timer.call_later(
                self.autoPingInterval, self._sendAutoPing
            )
            return
        super()._sendAutoPing()

    def sendCloseFrame(
        self,
        code: int | None = None,
        reasonUtf8: bytes | None = None,  # noqa: N803 (Autobahn's names)
        isReply: bool = False,  # noqa: N803
    ) -> None:
        # Every close frame leaves this way: the server's own and its answer to the peer's.
        if self.session is not None:
            self.session.closing = True
        super().sendCloseFrame(code, reasonUtf8, isReply)

    def _queue_used(self) -> None:
        if self.session is not None:
            self.session.direct = None  # deliveries must queue behind Autobahn's frames from now on

    def onOpenHandshakeTimeout(self) -> None:
        self.factory.hub.metrics.limited("handshake_timeout", PROTOCOL)
        super().onOpenHandshakeTimeout()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self._heard = True
        if self._idle is not None:
            self._idle.touch()
        session = self.session
        if session is None or session.id not in self.factory.hub.sessions:
            return
        gate = self._in_order
        if gate is None:
            gate = self._in_order = InOrder(self._handle, MAX_BACKLOG, self._too_many)
        gate.submit((payload, isBinary))

    def _handle(self, frame: tuple[bytes, bool]) -> defer.Deferred | None:
        """Answer one frame; the Deferred of a read from the store it started, if any (see :mod:`chatd.ordered`)."""
        session = self.session
        if session is None or session.id not in self.factory.hub.sessions:
            return None
        session.reading = None
        reply = dispatch(self.factory.hub, session, *frame)
        if isinstance(reply, defer.Deferred):
            reply.addCallback(self._reply_later, session)
        elif reply is not None:
            session.send(reply)
        read, session.reading = session.reading, None
        return read

    def _too_many(self, frame: tuple[bytes, bool]) -> None:
        if self.session is not None:
            self.session.send(_error(f"too many requests while one is being answered (at most {MAX_BACKLOG})", None))

    def _reply_later(self, reply: dict | None, session: WebSocketSession) -> None:
        """The reply of a request that waited (a message being stored), if the client is still here."""
        if reply is not None and session.id in self.factory.hub.sessions:
            session.send(reply)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._idle is not None:
            self._idle.stop()
            self._idle = None
        session = self.session
        if session is None:
            return
        self.session = None
        self.factory.hub.disconnect(session)
        self.factory.closes.closed(session, wasClean, code, reason)


def dispatch(
    hub: Hub, session: Session, payload: bytes, is_binary: bool = False
) -> dict | defer.Deferred | None:
    """Handle one client frame; return the reply for this client, if any.

    A chat message's reply waits for the store: it comes as a Deferred that
    fires with the ``sent`` (or error) reply and never fails.

    Whatever the frame holds, this returns (never raises): bad input becomes
    an error reply and changes nothing, and a bug in a handler becomes an
    ``internal error`` reply, logged once, so one odd frame can never drop
    the connection or take others with it. Kept apart from the Autobahn
    protocol so it can be driven (and fuzzed) without sockets.
    """
    request: dict | None = None
    try:
        request = _parse(payload, is_binary)
        kind = request.get("type")
        if kind is None and not request.keys() & {"user", "message", "room"}:
            raise ChatError("missing type (or the user, message and room of a chat message)")
        # Only strings name handlers: a list or object as "type" is unhashable.
        handler = _HANDLERS.get(kind) if kind is None or isinstance(kind, str) else None
        if handler is None:
            raise ChatError(f"unknown type: {str(kind)[:64]}")
        if "ref" in request and not _is_ref(request["ref"]):
            raise ChatError("ref must be a string or a number")
        reply = handler(hub, session, request)
    except Exception:
        return _refused(Failure(), hub, session, request)
    if isinstance(reply, defer.Deferred):
        return reply.addCallbacks(_finish, _refused, callbackArgs=(request,), errbackArgs=(hub, session, request))
    return _finish(reply, request)


def _finish(reply: dict | None, request: dict) -> dict | None:
    if reply is not None:
        _echo_ref(request, reply)
    return reply


def _refused(failure: Failure, hub: Hub, session: Session, request: dict | None) -> dict:
    """The error reply for a request that failed, at once or once the store answered."""
    if failure.check(ChatError):
        hub.metrics.error("bad_request", PROTOCOL)
        return _error(failure.value.reason, request)
    hub.metrics.error("internal", PROTOCOL)
    _log.failure(
        "{peer}: {request} request failed",
        failure,
        peer=session.peer,
        request=printable(_request_name(request) or "-", 64),
    )
    return _error("internal error", request)


def _parse(payload: bytes, is_binary: bool) -> dict:
    if is_binary:
        raise ChatError("binary frames are not supported: send JSON text")
    try:
        request = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise ChatError("malformed JSON") from None
    if not isinstance(request, dict):
        raise ChatError("a request must be a JSON object")
    return request


def _is_ref(value: object) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def _request_name(request: dict | None) -> str | int | float | None:
    """What an error's ``request`` field says: the type as sent, if it is a plain value."""
    if request is None:
        return None
    kind = request.get("type")
    if kind is None:
        return "message"
    return kind if _is_ref(kind) else None


def _error(reason: str, request: dict | None) -> dict:
    error: dict[str, Any] = {"type": "error", "error": reason}
    name = _request_name(request)
    if name is not None:
        error["request"] = name
    if request is not None:
        _echo_ref(request, error)
    return error


def _echo_ref(request: dict, reply: dict) -> None:
    ref = request.get("ref")
    if _is_ref(ref):
        reply["ref"] = ref


def _join(hub: Hub, session: Session, request: dict) -> dict | defer.Deferred:
    room = validate.room(request.get("room"))
    since = validate.since_seq(request["since"], "since") if request.get("since") is not None else None
    hub.identify(session, request.get("user", session.user))

    def reply(joined: Joined) -> dict:
        body = {"type": "joined", "room": room, "user": session.user, "members": list(joined)}
        if joined.truncated:
            body["truncated"] = True
            body["first_seq"] = joined.first_seq
        return body

    joined = hub.join(session, room, since_seq=since)
    if isinstance(joined, defer.Deferred):
        _reading(session, joined)
        return joined.addCallback(reply)
    return reply(joined)


def _leave(hub: Hub, session: Session, request: dict) -> dict:
    hub.leave(session, request.get("room"))
    return {"type": "left", "room": request["room"]}


def _message(hub: Hub, session: Session, request: dict) -> dict | None:
    # Every check comes before the first change: a refused message must not
    # leave the connection named (identify) as a side effect.
    room = validate.room(request.get("room"))
    text = validate.message(request.get("message"), hub.limits)
    client_id = validate.client_id(request.get("client_id"))
    if room not in session.rooms:
        raise ChatError(f"not in room {room}: join it first")
    if "user" in request:
        hub.identify(session, request["user"])  # in a room, so named: this only checks
    return _sent(request, hub.publish(room, session.user, text, PROTOCOL, client_id, source=session))


def _seed(hub: Hub, session: Session, request: dict) -> dict | None:
    """The seed's bare ``{"user", "message", "room"}``: join as needed, then send."""
    room = validate.room(request.get("room"))
    text = validate.message(request.get("message"), hub.limits)
    client_id = validate.client_id(request.get("client_id"))
    user = request.get("user")
    if user is None and session.identity is not None:
        user = session.identity.user  # a token names the sender
    user = validate.user(user)
    if session.identity is not None:
        session.identity.check_user(user)
        session.identity.check_room(room)
    hub.check_rate(user, session, PROTOCOL)  # refused before the join below, so a refusal changes nothing
    hub.identify(session, user)
    if room not in session.rooms:
        hub.join(session, room)
    return _sent(request, hub.publish(room, session.user, text, PROTOCOL, client_id, source=session))


def _sent(request: dict, stored: defer.Deferred) -> defer.Deferred:
    """The acknowledgement of a stored message, for senders that asked (a ``ref`` or a ``client_id``)."""

    def ack(message: Message) -> dict | None:
        if "ref" not in request and not request.get("client_id"):
            return None
        reply = {"type": "sent", "room": message.room, "id": message.id, "seq": message.seq}
        if request.get("client_id"):
            reply["client_id"] = request["client_id"]
        return reply

    return stored.addCallback(ack)


#: the largest ``history`` reply, in bytes: the ``websockets`` library's default limit on a message it reads
HISTORY_REPLY_MAX = 1 << 20


def _history(hub: Hub, session: Session, request: dict) -> defer.Deferred:
    messages = hub.history(request.get("room"), request.get("limit"), session.identity)
    _reading(session, messages)
    return messages.addCallback(_history_reply, request)


def _history_reply(kept: list[Message], request: dict) -> dict:
    """The newest of ``kept`` whose reply, ``ref`` included, fits in ``HISTORY_REPLY_MAX``; ``truncated`` if not all.

    A room's kept messages at the default limits (100 of 4,096 characters)
    are up to 1.6 MB of JSON in three- and four-byte UTF-8 text; the
    ``websockets`` client reads at most 1 MiB a message unless told
    otherwise and closed the connection on such a reply (1009). The older
    messages left out are still kept: ``join`` with ``since`` replays every
    kept message, one frame each.
    """
    reply: dict[str, Any] = {"type": "history", "room": request["room"], "messages": []}
    bodies = [m.as_dict() for m in kept]
    envelope = dict(reply, truncated=True)
    _echo_ref(request, envelope)
    size = len(orjson.dumps(envelope))
    start = len(bodies)  # newest first, while the next one (and the comma before it) still fits
    while start:
        more = len(orjson.dumps(bodies[start - 1])) + (start < len(bodies))
        if size + more > HISTORY_REPLY_MAX:
            break
        size += more
        start -= 1
    reply["messages"] = bodies[start:]
    if start:
        reply["truncated"] = True
    return reply


def _reading(session: Session, answer: defer.Deferred) -> None:
    """Mark a request whose answer is read from the store: the connection's next frames wait for it."""
    if not answer.called and isinstance(session, WebSocketSession):
        session.reading = answer


def _ping(hub: Hub, session: Session, request: dict) -> dict:
    return {"type": "pong"}


_HANDLERS: dict[Any, Callable[[Hub, Session, dict], dict | defer.Deferred | None]] = {
    None: _seed,
    "join": _join,
    "leave": _leave,
    "message": _message,
    "history": _history,
    "ping": _ping,
}


def server_options(read_limit: int, handshake_timeout: float = 15) -> dict[str, Any]:
    """Autobahn options every chatd WebSocket server shares (``/ws`` and SignalR).

    ``handshake_timeout`` (``--handshake-timeout``) bounds the opening
    handshake; the HTTP request before it is bounded by the site's timeout.
    """
    return {
        "maxFramePayloadSize": read_limit,
        "maxMessagePayloadSize": read_limit,
        "openHandshakeTimeout": handshake_timeout,
        "closeHandshakeTimeout": 2,
        # Tell a misbehaving client why (e.g. 1009 message too big) before dropping it.
        "failByDrop": False,
        # No compression: one prepared frame serves every recipient.
        "perMessageCompressionAccept": lambda offers: None,
    }


class ChatWebSocketFactory(WebSocketServerFactory):
    """Autobahn factory carrying the hub and the per-connection limits."""

    protocol = ChatServerProtocol

    def __init__(
        self,
        hub: Hub,
        origins: OriginPolicy | None = None,
        read_limit: int = 65536,
        write_limit: int = 1 << 20,
        idle_timeout: float = 0,
        handshake_timeout: float = 15,
        keep_alive: float = 30,
    ) -> None:
        super().__init__()
        # Autobahn's timers (keep-alive pings, handshake timeouts) share one batched timer whose
        # buckets are whole seconds; its default runs up to 1,000 of a bucket's calls in one
        # reactor turn. In chunks of KEEP_ALIVE_CHUNK spread over the second, the pings to a
        # burst of idle clients (and the pongs that answer them) no longer stall deliveries.
        self._batched_timer = txaio.make_batched_timer(bucket_seconds=1.0, chunk_size=KEEP_ALIVE_CHUNK)
        self.hub = hub
        self.origins = origins or OriginPolicy()
        self.write_limit = write_limit
        #: seconds a connection may send nothing before it is closed (0: never)
        self.idle_timeout = idle_timeout
        #: logs each close (a service of its own, so a summary still pending is written at stop)
        self.closes = CloseLog(hub.clock)
        self.setProtocolOptions(
            **server_options(read_limit, handshake_timeout), autoPingInterval=keep_alive, autoPingTimeout=keep_alive
        )


def resource(factory: ChatWebSocketFactory) -> WebSocketResource:
    """The ``/ws`` resource for a ``twisted.web`` site."""
    return WebSocketResource(factory)


#: The longest request head taken the short way: twisted.web's own bound on
#: the request line plus headers, so nothing it would refuse for size gets in.
_MAX_HEAD = 16384
#: twisted.web's bound is 500 header lines; a real upgrade has about ten.
_MAX_LINES = 100


def _whole_upgrade(data: bytes) -> bool:
    """Whether ``data`` is a whole ``GET /ws`` request head that Autobahn may parse directly.

    Only a plain case qualifies (the complete head in the first bytes of the
    connection, HTTP/1.1, no body): anything else takes twisted.web's path,
    which ends at the same Autobahn handshake, so what a client sees is the
    same either way.
    """
    end = data.find(b"\r\n\r\n", 0, _MAX_HEAD)
    if end < 0 or not (data.startswith(b"GET /ws ") or data.startswith(b"GET /ws?")):
        return False
    line = data[: data.find(b"\r\n")]
    if not line.endswith(b" HTTP/1.1") or data.count(b"\r\n", 0, end) > _MAX_LINES:
        return False
    head = data[:end].lower()
    return b"\ncontent-length:" not in head and b"\ntransfer-encoding:" not in head


class UpgradeChannel(DeadlineChannel):
    """An HTTP connection of the ``--ws`` port that takes ``GET /ws`` upgrades the short way.

    Through twisted.web, an upgrade is parsed into a ``Request``, routed to
    ``WebSocketResource``, then serialised again for Autobahn to parse a
    second time: measured in a storm of 10,000 connections at 1,000 a
    second, going round it saves a tenth of the server's CPU per connection
    and two thirds of the handshake p99.
    When the first bytes of a connection are a whole ``GET /ws`` request
    head, they go to the WebSocket protocol directly; it parses once (a
    plain request by :mod:`chatd.wshandshake`, any other by Autobahn) and
    answers exactly as behind the resource (same Origin and token checks in
    ``onConnect``, same limits when the session opens). Every other request (``/health``,
    ``/stats``, ``/metrics``, ``/``, a request that trickles in, a second
    request on a kept-alive connection) stays with twisted.web, with its
    access log line and its deadline.
    """

    #: the factory of ``/ws`` connections (set by :func:`serve_upgrades`)
    upgrades: ChatWebSocketFactory
    #: twisted.web's set-up waits for the first bytes: an upgrade taken the short way never needs it
    defer_setup = True
    _first = True

    def connectionMade(self) -> None:
        # The direct write path from the accept, not from the session's open:
        # the 101 (and any HTTP answer on this port) is sent at once, where
        # Twisted's buffered write cost two epoll_ctl and a reactor event.
        # A TLS or UNIX listener's transports are left as they are (see chatd.fastwrite).
        fastwrite.install(self.transport)
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        if self._first:
            self._first = False
            if _whole_upgrade(data):
                self._upgrade(data)
                return
            self.start_http()
        super().dataReceived(data)

    def _upgrade(self, data: bytes) -> None:
        """Hand the transport and the request's bytes to a new WebSocket protocol."""
        self._disarm()  # the request is all in: the handshake has its own timeout
        self.setTimeout(None)
        transport = self.transport
        # No producer is registered on the short way (this channel's set-up was put
        # off, see DeadlineChannel.start_http): the session registers its own.
        protocol = self.upgrades.buildProtocol(transport.getPeer())
        self.transport = None
        # As WebSocketResource does it: TLS wraps either this protocol or the transport's.
        if isinstance(transport, ProtocolWrapper):
            transport.wrappedProtocol = protocol
        elif isinstance(transport.protocol, ProtocolWrapper):
            transport.protocol.wrappedProtocol = protocol
        else:
            transport.protocol = protocol
        protocol.makeConnection(transport)
        protocol.dataReceived(data)


def serve_upgrades(site: Site, factory: ChatWebSocketFactory) -> Site:
    """Let ``site`` take ``GET /ws`` upgrades for ``factory`` the short way (see :class:`UpgradeChannel`).

    The site's resource tree must still serve ``/ws`` (with :func:`resource`)
    for the requests that do not qualify.
    """
    site.protocol = type("UpgradeChannel", (UpgradeChannel,), {"upgrades": factory})
    return site
