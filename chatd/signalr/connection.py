"""One SignalR connection above its transport: handshake, keep-alive, close, reconnect.

:class:`HubConnection` is the protocol core. It is fed bytes by whichever
transport carries the connection (WebSocket, Server-Sent Events plus POSTs,
long polling), writes records through a small :class:`Transport` interface,
and hands hub messages (invocations, stream items, cancels) to a
:class:`Dispatcher`: the chat hub adapter. Its timers run on an injected
clock (``IReactorTime``), so keep-alives and timeouts are tested with
``twisted.internet.task.Clock``.

Lifecycle: ``handshake`` (waits for the handshake request, at most
``handshake_timeout``) -> ``open`` -> ``closed``. With stateful reconnect
(negotiated, then handshake version 2) a lost WebSocket turns ``open`` into
``detached`` for ``disconnect_timeout``: every sequenced message sent stays
buffered until acknowledged, and a new WebSocket on the same connection id
gets a Sequence message and the unacknowledged messages again.

A connection with no transport is bounded in time in every state: from
negotiate until a transport arrives (records may come by POST before any,
as signalrcore sends its handshake) and after one ends, it lives at most
``disconnect_timeout`` (ASP.NET Core closes connections that have no active
transport after its DisconnectTimeout). Without that, a client that
negotiates and POSTs a handshake but never opens a stream or a poll would
keep a hub session (and a ``--max-connections`` slot) until a restart.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from chatd.auth import Identity
from chatd.logs import printable
from chatd.signalr import protocol as p
from chatd.validate import ChatError

log = Logger()

HANDSHAKE = "handshake"
OPEN = "open"
DETACHED = "detached"
CLOSED = "closed"


@dataclass(frozen=True)
class Options:
    """Intervals and bounds; the defaults are ASP.NET Core's."""

    keep_alive: float = 15.0
    client_timeout: float = 30.0
    handshake_timeout: float = 15.0
    #: how long a connection may be without a transport: before the first one, after a stateful
    #: WebSocket drops, between two long polls
    disconnect_timeout: float = 15.0
    poll_timeout: float = 90.0
    ack_delay: float = 1.0
    max_message_size: int = p.DEFAULT_MAX_MESSAGE_SIZE
    #: bytes that may wait for a slow client (or an acknowledgement) before it is disconnected
    write_limit: int = 1 << 20


class Transport(Protocol):
    """What the core needs of a transport; each write is exactly one record."""

    name: str
    supports_binary: bool
    #: long polling carries no pings either way (the polls themselves show liveness)
    inherent_keep_alive: bool
    #: whether a new transport may take over after this one drops (stateful reconnect);
    #: optional, False when missing
    supports_reconnect: bool
    #: a socket that takes a whole frame at once now, or None (see ``chatd.signalr.chat.SignalRSession.deliver``);
    #: optional, None when missing
    direct: Any

    def write(self, data: bytes, binary: bool) -> None: ...

    def close(self) -> None: ...


class Dispatcher(Protocol):
    """The hub adapter behind one connection (``chatd.signalr.chat``)."""

    def on_message(self, message: dict) -> None: ...

    def on_close(self) -> None: ...

    def on_too_slow(self) -> None: ...


class HubConnection:
    """The state of one SignalR connection, whatever carries it."""

    def __init__(
        self,
        clock: IReactorTime,
        dispatcher_factory: Callable[[HubConnection], Dispatcher],
        options: Options | None = None,
        connection_id: str = "",
        token: str = "",
        stateful_allowed: bool = False,
        on_closed: Callable[[HubConnection], None] | None = None,
        peer: str = "",
        user: str | None = None,
        identity: Identity | None = None,
    ) -> None:
        self.clock = clock
        self.options = options = options or Options()
        self.connection_id = connection_id
        self.token = token or connection_id
        self.peer = peer
        #: a user name the client asked for before the handshake (``?user=``)
        self.user = user
        #: what the client's token proved at negotiate (``chatd.auth``); None when tokens are off
        self.identity = identity
        self.stateful_allowed = stateful_allowed
        self.stateful = False
        self.state = HANDSHAKE
        self.codec: p.Codec | None = None
        self.transport: Transport | None = None
        #: the first transport's name; a connection never changes transports
        self.transport_name: str | None = None
        self.dispatcher: Dispatcher | None = None
        self.close_error: str | None = None
        #: the timeout that ended the connection, if one did ("handshake_timeout"), for metrics
        self.expired: str | None = None
        self._factory = dispatcher_factory
        self._on_closed = on_closed
        self._handshake = p.HandshakeReader(options.max_message_size)
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        now = clock.seconds()
        #: when the server last wrote to the client: the keep-alive pings only after a quiet spell
        self.last_sent = now
        self._last_received = now
        self._tick: IDelayedCall | None = None
        self._timer: IDelayedCall | None = clock.callLater(
            options.handshake_timeout, self._handshake_expired
        )
        #: runs whenever no transport is attached (see the module docstring)
        self._orphan_timer: IDelayedCall | None = None
        self._orphaned()
        # stateful reconnect
        self._sent = 0
        self._unacked: deque[tuple[int, bytes]] = deque()
        self._unacked_bytes = 0
        self._next_receiving = 1
        self._latest_received = 0
        self._waiting_for_sequence = False
        self._ack_timer: IDelayedCall | None = None

    # -- transport side ------------------------------------------------------

    def attach(self, transport: Transport) -> None:
        """Start writing to ``transport``: the first one, or a stateful reconnect's."""
        if self.state == CLOSED:
            transport.close()
            return
        reconnect = False
        if self.transport is not None:
            # Only a stateful connection may take a new WebSocket while the
            # old one looks alive (the server had not noticed it die yet).
            reconnect = self.stateful
            self._detach()
        if self.state == DETACHED:
            reconnect = True
            self.state = OPEN
        self._cancel_orphan()
        if self.transport_name is None:
            self.transport_name = transport.name
        self.transport = transport
        self._last_received = self.clock.seconds()
        if self.codec is not None and self.codec.binary and not transport.supports_binary:
            self.close(error=f"the {transport.name} transport cannot carry the '{self.codec.name}' protocol")
            return
        if reconnect:
            self.codec.reset()  # type: ignore[union-attr]
            self._waiting_for_sequence = True
            first = self._unacked[0][0] if self._unacked else self._sent + 1
            self._write(self.codec.encode({"type": p.SEQUENCE, "sequenceId": first}))  # type: ignore[union-attr]
            for _, record in list(self._unacked):
                self._write(record)
            log.debug("{peer} reconnected; {n} messages sent again", peer=self.peer, n=len(self._unacked))
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        for record in pending:
            self._write(record)
        self._schedule_tick()

    def _detach(self) -> None:
        old, self.transport = self.transport, None
        if old is not None:
            old.close()

    def data_received(self, data: bytes) -> None:
        """Bytes from the client: any part of any number of records."""
        if self.state in (CLOSED, DETACHED) or not data:
            return
        self._last_received = self.clock.seconds()
        if self.state == HANDSHAKE:
            data = self._handle_handshake(data)
            if not data or self.state != OPEN:
                return
        try:
            messages = self.codec.feed(data)  # type: ignore[union-attr]
        except p.ProtocolError as e:
            log.info("{peer}: protocol error: {reason}", peer=self.peer, reason=printable(e.reason))
            self.close(error=f"Connection closed with an error: {e.reason}")
            return
        for message in messages:
            if self.state != OPEN:
                return
            self._handle(message)

    def transport_lost(self, transport: Transport) -> None:
        """The transport ended (peer gone, network down, long-poll idle)."""
        if transport is not self.transport:
            return
        self.transport = None
        if self.state == CLOSED:
            return
        if self.state == OPEN and self.stateful:
            self.state = DETACHED
            self._cancel_tick()
            self._orphaned()
            log.debug("{peer} lost its transport; waiting for a reconnect", peer=self.peer)
            return
        self._finish("transport closed")

    # -- hub side ------------------------------------------------------------

    def send(self, message: dict) -> None:
        """Encode and send one hub message."""
        if self.state in (CLOSED, HANDSHAKE):
            return
        self.send_record(self.codec.encode(message), message["type"] in p.SEQUENCED)  # type: ignore[union-attr]

    def send_record(self, record: bytes, sequenced: bool = True) -> None:
        """Send one record encoded already (an event's shared encoding)."""
        if self.state in (CLOSED, HANDSHAKE):
            return
        if self.stateful and sequenced:
            self._sent += 1
            self._unacked.append((self._sent, record))
            self._unacked_bytes += len(record)
            if self._unacked_bytes > self.options.write_limit:
                self.too_slow(f"more than {self.options.write_limit} bytes not acknowledged")
                return
        if self.transport is None:
            if self.state == DETACHED:
                return  # buffered above, sent again on reconnect
            self._queue(record)
            return
        self._write(record)

    def too_slow(self, what: str) -> None:
        """Close a client that does not keep up, so the room's others carry on."""
        if self.state == CLOSED:
            return
        if self.dispatcher is not None:
            self.dispatcher.on_too_slow()
        self.close(error=f"too slow: {what}")

    def close(self, error: str | None = None, allow_reconnect: bool = False) -> None:
        """Close from the server side: a Close message, then the transport ends."""
        if self.state == CLOSED:
            return
        if error:
            self.close_error = error
        if self.state == OPEN and self.codec is not None:
            record = self.codec.encode(p.close(error, allow_reconnect))
            if self.transport is not None:
                self._write(record)
            else:
                self._queue(record)
        self._finish(error or "closed by the server")

    @property
    def protocol_name(self) -> str | None:
        return self.codec.name if self.codec else None

    # -- internals -----------------------------------------------------------

    def _handle_handshake(self, data: bytes) -> bytes:
        try:
            parsed = self._handshake.feed(data)
        except p.ProtocolError as e:
            self._fail_handshake(e.reason)
            return b""
        if parsed is None:
            return b""
        request, rest = parsed
        error = p.check_handshake(request)
        if error is None and self.transport is not None and not self.transport.supports_binary:
            if p.CODECS[request["protocol"]].binary:
                error = (
                    f"Cannot use the '{request['protocol']}' protocol on the current transport. "
                    "The transport does not support 'Binary' transfer format."
                )
        if error is not None:
            self._fail_handshake(error)
            return b""
        self.codec = p.codec(request["protocol"], self.options.max_message_size)
        # Only a WebSocket can be replaced by a new one on the same connection.
        self.stateful = (
            self.stateful_allowed
            and request["version"] >= 2
            and getattr(self.transport, "supports_reconnect", False)
        )
        try:
            self.dispatcher = self._factory(self)
        except ChatError as e:
            self._fail_handshake(e.reason)
            return b""
        self._cancel_timer()
        self.state = OPEN
        self.send_record(p.handshake_response(), sequenced=False)
        log.info(
            "{peer} connected over signalr ({transport}, {protocol})",
            peer=self.peer,
            transport=self.transport_name or "-",
            protocol=self.codec.name,
        )
        self._schedule_tick()
        return rest

    def _fail_handshake(self, error: str) -> None:
        log.info("{peer}: handshake refused: {error}", peer=self.peer, error=printable(error))
        self.close_error = error
        record = p.handshake_response(error)
        if self.transport is not None:
            self.transport.write(record, False)
        else:
            self._queue(record)
        self._finish(error)

    def _handle(self, message: dict) -> None:
        kind = message["type"]
        if self.stateful:
            if self._waiting_for_sequence:
                if kind != p.SEQUENCE:
                    return
                self._waiting_for_sequence = False
            if kind in p.SEQUENCED:
                current = self._next_receiving
                self._next_receiving += 1
                if current <= self._latest_received:
                    if current == self._latest_received:
                        self._schedule_ack()
                    return  # seen before the reconnect
                self._latest_received = current
                self._schedule_ack()
        if kind == p.PING:
            return
        if kind == p.CLOSE:
            self._finish(message.get("error") or "closed by the client", write_close=False)
            return
        if kind == p.ACK:
            self._acked(message["sequenceId"])
            return
        if kind == p.SEQUENCE:
            if self.stateful:
                if message["sequenceId"] > self._next_receiving:
                    self.close(error="Sequence ID greater than amount of messages we've received.")
                    return
                self._next_receiving = message["sequenceId"]
            return
        self.dispatcher.on_message(message)  # type: ignore[union-attr]

    def _acked(self, sequence_id: int) -> None:
        while self._unacked and self._unacked[0][0] <= sequence_id:
            _, record = self._unacked.popleft()
            self._unacked_bytes -= len(record)

    def _schedule_ack(self) -> None:
        if self._ack_timer is None:
            self._ack_timer = self.clock.callLater(self.options.ack_delay, self._send_ack)

    def _send_ack(self) -> None:
        self._ack_timer = None
        if self.state == OPEN and self.transport is not None and not self._waiting_for_sequence:
            self._write(self.codec.encode({"type": p.ACK, "sequenceId": self._latest_received}))  # type: ignore[union-attr]

    def _write(self, record: bytes) -> None:
        self.last_sent = self.clock.seconds()
        binary = self.codec.binary if self.codec is not None else False
        self.transport.write(record, binary)  # type: ignore[union-attr]

    def _queue(self, record: bytes) -> None:
        self._pending.append(record)
        self._pending_bytes += len(record)
        if self._pending_bytes > self.options.write_limit and self.state != CLOSED:
            self._pending.clear()
            if self.dispatcher is not None:
                self.dispatcher.on_too_slow()
            self._finish("too slow: no transport took the pending messages")

    # keep-alive: one timer per connection, due at the earlier of the next
    # ping and the client timeout; writes only move a timestamp.

    def _schedule_tick(self) -> None:
        if self.state != OPEN or self.transport is None or self.transport.inherent_keep_alive:
            return
        if self._tick is not None and self._tick.active():
            return
        due = min(
            self.last_sent + self.options.keep_alive,
            self._last_received + self.options.client_timeout,
        )
        self._tick = self.clock.callLater(max(0.0, due - self.clock.seconds()), self._on_tick)

    def _cancel_tick(self) -> None:
        if self._tick is not None and self._tick.active():
            self._tick.cancel()
        self._tick = None

    def _on_tick(self) -> None:
        self._tick = None
        if self.state != OPEN or self.transport is None:
            return
        now = self.clock.seconds()
        if now - self._last_received >= self.options.client_timeout:
            log.info("{peer}: client timeout", peer=self.peer)
            self.close(error="Client timeout elapsed without receiving a message from the client.")
            return
        if now - self.last_sent >= self.options.keep_alive:
            self._write(self.codec.encode(p.PING_MESSAGE))  # type: ignore[union-attr]
        self._schedule_tick()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _handshake_expired(self) -> None:
        self._timer = None
        if self.state == HANDSHAKE:
            self.expired = "handshake_timeout"
            self._fail_handshake("Handshake was canceled.")

    def _orphaned(self) -> None:
        """No transport now: the connection has ``disconnect_timeout`` to get one."""
        self._cancel_orphan()
        self._orphan_timer = self.clock.callLater(self.options.disconnect_timeout, self._orphan_expired)

    def _cancel_orphan(self) -> None:
        if self._orphan_timer is not None and self._orphan_timer.active():
            self._orphan_timer.cancel()
        self._orphan_timer = None

    def _orphan_expired(self) -> None:
        self._orphan_timer = None
        if self.state == CLOSED or self.transport is not None:
            return
        if self.state == DETACHED:
            self._finish("the client did not reconnect in time")
        else:
            self._finish(f"no transport within {self.options.disconnect_timeout:g} s")

    def _finish(self, why: str, write_close: bool = True) -> None:
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self._cancel_tick()
        self._cancel_timer()
        self._cancel_orphan()
        if self._ack_timer is not None and self._ack_timer.active():
            self._ack_timer.cancel()
        self._ack_timer = None
        self._unacked.clear()
        transport, self.transport = self.transport, None
        if transport is not None:
            transport.close()
        dispatcher, self.dispatcher = self.dispatcher, None
        if dispatcher is not None:
            try:
                dispatcher.on_close()
            except Exception:
                log.failure("closing the hub side of {peer} failed", peer=self.peer)
        log.info("{peer} signalr connection closed: {why}", peer=self.peer, why=printable(why))
        if self._on_closed is not None:
            self._on_closed(self)

    def __repr__(self) -> str:
        return f"<HubConnection {self.connection_id} {self.state} {self.transport_name or '-'}>"
