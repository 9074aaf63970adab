"""SignalR over HTTP: negotiate, WebSockets, Server-Sent Events, long polling.

The resources here route requests to :class:`HubConnection` objects kept by
a :class:`ConnectionManager`, following ASP.NET Core's
``HttpConnectionDispatcher`` (dotnet/aspnetcore ``TransportProtocols.md``)::

    POST   /signalr/negotiate[?negotiateVersion=1]   -> connection id, token, transports
    GET    /signalr[?id=T]  + Upgrade: websocket      -> WebSockets (no id: skipNegotiation)
    GET    /signalr?id=T    + Accept: text/event-stream -> Server-Sent Events
    GET    /signalr?id=T                               -> a long poll
    POST   /signalr?id=T                               -> records from the client (SSE, long polling)
    DELETE /signalr?id=T                               -> stop long polling
    OPTIONS (any)                                       -> CORS preflight
    GET    /signalr/health                             -> the health document

``id`` is the connection token (negotiate version 1) or the connection id
(version 0). Errors: no id -> 400, unknown id -> 404, another transport ->
400, a second WebSocket or event stream on one id -> 409, other methods -> 405.

With token authentication on (``chatd.auth``) every request but the CORS
preflight and ``/signalr/health`` must carry a valid token, as the official
clients' ``accessTokenFactory`` sends it: ``Authorization: Bearer`` or the
``access_token`` query parameter (browsers' WebSockets and EventSource
cannot set headers). Without one the answer is 401 before anything else is
looked at. A transport request must come from the token's user that
negotiated the connection (else 403, as ASP.NET Core does).

Request bodies are bounded: a POST may carry at most ``body_limit`` bytes
of records (see :func:`site`), negotiate takes none (a few bytes are
tolerated); past that the answer is 413 with a text saying the limit, and
the connection is left as it was. twisted.web reads a whole body before any
resource sees it, so :class:`_BoundedRequest` stops storing one as soon as
its Content-Length or the bytes read pass the site's bound. The records of
an accepted POST are handed to the connection ``_SLICE`` bytes per reactor
turn (:class:`_Inbox`), one POST after another, so a large one neither
stalls the reactor nor reorders the connection's records; the POST is
answered once its last byte has been handed over.
"""

from __future__ import annotations

import io
import secrets
from collections import deque
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory
from autobahn.websocket.protocol import PreparedMessage
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from chatd import fastwrite, validate
from chatd.auth import Identity, Unauthenticated
from chatd.http import JsonResource, OriginPolicy, health, write_json
from chatd.hub import Hub, SendBudget, ServerFull
from chatd.signalr.chat import ChatHub
from chatd.signalr.connection import CLOSED, HubConnection, Options
from chatd.validate import ChatError
from chatd.websocket import DirectSend, ServerProtocol, frame, server_options
from chatd.wsframes import FastReceive

log = Logger()

WEBSOCKETS = "WebSockets"
SERVER_SENT_EVENTS = "ServerSentEvents"
LONG_POLLING = "LongPolling"

AVAILABLE_TRANSPORTS = [
    {"transport": WEBSOCKETS, "transferFormats": ["Text", "Binary"]},
    {"transport": SERVER_SENT_EVENTS, "transferFormats": ["Text"]},
    {"transport": LONG_POLLING, "transferFormats": ["Text", "Binary"]},
]

_NO_CACHE = b"no-cache, no-store"
_CORS_METHODS = b"GET, POST, DELETE, OPTIONS"
_CORS_HEADERS = b"X-Requested-With, X-SignalR-User-Agent, Authorization, Content-Type"

#: a POST body may hold this many largest records: the JS client joins every record
#: queued while its previous POST was in flight into one body
_RECORDS_PER_POST = 16
#: negotiate takes no body; this much is tolerated from clients that send a little anyway
_NEGOTIATE_BODY_LIMIT = 1024
#: bytes of a POST handed to its connection per reactor turn (about 1-2 ms of records)
_SLICE = 16 * 1024
#: POSTs that may wait behind the one being handed over, per connection
_MAX_QUEUED_POSTS = 4


def _new_id() -> str:
    """16 random bytes, base64url: URL-safe as clients append it unencoded."""
    return secrets.token_urlsafe(16)


def query(request: Request, name: str) -> str | None:
    """A query parameter, its name matched case-insensitively (as ASP.NET does)."""
    wanted = name.lower().encode()
    for key, values in request.args.items():
        if key.lower() == wanted and values:
            return values[0].decode("utf-8", "replace")
    return None


def _peer(request: Request) -> str:
    address = request.getClientAddress()
    host = getattr(address, "host", None)
    if host is None:
        return str(address)
    # [v6]:port, so the address can be told from the port (chatd.limits.address)
    return f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"


class ConnectionManager:
    """Every SignalR connection of this listener, by the ``id`` clients present."""

    def __init__(self, hub: Hub, clock: IReactorTime, options: Options) -> None:
        self.hub = hub
        self.clock = clock
        self.options = options
        self.connections: dict[str, HubConnection] = {}
        #: token -> the long-polling transport of a connection that uses one
        self.long_polls: dict[str, LongPollingTransport] = {}
        #: token -> POSTed records still being handed to a connection
        self.inboxes: dict[str, _Inbox] = {}
        #: token -> the address slot each connection holds (``Hub.claim_address``)
        self._addresses: dict[str, str | None] = {}

    def create(
        self,
        peer: str,
        user: str | None,
        stateful: bool = False,
        version: int = 1,
        identity: Identity | None = None,
    ) -> HubConnection:
        """A new connection, counted against its address from now until it closes.

        Raises :class:`chatd.hub.AddressFull` when ``peer``'s address has
        ``--max-connections-per-ip`` connections open (negotiated ones included).
        """
        address_key = self.hub.claim_address(peer, "signalr")
        connection_id = _new_id()
        token = _new_id() if version >= 1 else connection_id
        connection = HubConnection(
            self.clock,
            lambda conn: ChatHub(self.hub, conn),
            self.options,
            connection_id=connection_id,
            token=token,
            stateful_allowed=stateful,
            on_closed=self._closed,
            peer=peer,
            user=user,
            identity=identity,
        )
        self.connections[token] = connection
        self._addresses[token] = address_key
        return connection

    def get(self, token: str | None) -> HubConnection | None:
        return self.connections.get(token) if token else None

    def _closed(self, connection: HubConnection) -> None:
        self.hub.release_address(self._addresses.pop(connection.token, None))
        if connection.expired is not None:
            self.hub.metrics.limited(connection.expired, "signalr")
        transport = self.long_polls.get(connection.token)
        if transport is not None and not transport.done:
            return  # the last records (the Close), then a 204, still wait for a poll
        self.forget(connection)

    def forget(self, connection: HubConnection) -> None:
        if self.connections.get(connection.token) is connection:
            del self.connections[connection.token]
            self.long_polls.pop(connection.token, None)

    def inbox(self, connection: HubConnection) -> _Inbox:
        """The queue of POSTed records of ``connection`` (made on first use)."""
        inbox = self.inboxes.get(connection.token)
        if inbox is None or inbox.connection is not connection:
            inbox = self.inboxes[connection.token] = _Inbox(connection, self.clock, self._inbox_empty)
        return inbox

    def _inbox_empty(self, inbox: _Inbox) -> None:
        if self.inboxes.get(inbox.connection.token) is inbox:
            del self.inboxes[inbox.connection.token]

    def going_away(self, reason: str) -> None:
        """Close every connection, inviting clients to reconnect (server shutdown)."""
        for connection in list(self.connections.values()):
            dispatcher = connection.dispatcher
            if isinstance(dispatcher, ChatHub):
                dispatcher.session.going_away(reason)
            else:
                connection.close(error=reason, allow_reconnect=True)


# -- WebSockets ----------------------------------------------------------------


class SignalRWebSocketProtocol(FastReceive, DirectSend, ServerProtocol):
    """A WebSocket carrying one SignalR connection (text frames for json, binary for messagepack)."""

    factory: SignalRWebSocketFactory
    name = WEBSOCKETS
    supports_binary = True
    inherent_keep_alive = False
    supports_reconnect = True
    connection: HubConnection | None = None
    _target: tuple[HubConnection | None, str | None, Identity | None] = (None, None, None)
    #: the socket while a shared frame may go straight to it (see ``SignalRSession.deliver``):
    #: a plain TCP connection, no compression, nothing queued by Autobahn, no close frame sent
    direct: fastwrite.FastServer | None = None

    def onOpen(self) -> None:
        connection, user, identity = self._target
        manager = self.factory.manager
        if connection is None:
            try:
                connection = manager.create(self.peer, user, identity=identity)  # skipNegotiation
            except ServerFull as e:
                # 1008 with the reason (sendClose allows only 1000 and 3000-4999)
                self.sendCloseFrame(code=1008, reasonUtf8=e.reason.encode()[:123], isReply=False)
                return
        elif connection.state == CLOSED:
            self.sendClose(1000)
            return
        self.connection = connection
        self.budget = SendBudget(manager.options.write_limit, self._too_slow)
        self.budget.attach(self.transport)
        if fastwrite.install(self.transport) and self._perMessageCompress is None and not self.logOctets:
            self.direct = self.transport
        connection.attach(self)

    def write(self, data: bytes, binary: bool) -> None:
        # Between the peer's close frame and onClose, writes go nowhere
        # (Autobahn would raise); onClose tells the connection.
        if self.state == self.STATE_OPEN and self.budget.charge(len(data)):
            self.sendPreparedMessage(self.factory.frame(data, binary))

    def close(self) -> None:
        self.sendClose(1000)

    def sendCloseFrame(  # noqa: N802 (Autobahn's names)
        self,
        code: int | None = None,
        reasonUtf8: bytes | None = None,  # noqa: N803
        isReply: bool = False,  # noqa: N803
    ) -> None:
        self.direct = None  # no data frame may follow a close frame (RFC 6455 5.5.1)
        super().sendCloseFrame(code, reasonUtf8, isReply)

    def _queue_used(self) -> None:
        self.direct = None  # frames must queue behind Autobahn's from now on

    def _too_slow(self) -> None:
        if self.connection is not None:
            self.connection.too_slow(f"more than {self.budget.limit} bytes waiting to be sent")

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.connection is not None and self.connection.transport is self:
            self.connection.data_received(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.transport_lost(self)


class SignalRWebSocketFactory(WebSocketServerFactory):
    """Autobahn factory; the resource names the connection before each upgrade."""

    protocol = SignalRWebSocketProtocol

    def __init__(
        self, manager: ConnectionManager, read_limit: int, handshake_timeout: float = 15, message_limit: int = 0
    ) -> None:
        super().__init__()
        self.manager = manager
        self.pending: tuple[HubConnection | None, str | None, Identity | None] = (None, None, None)
        #: the last record written and its frame (see :meth:`frame`)
        self._last_frame: tuple[bytes | None, bool, PreparedMessage | None] = (None, False, None)
        # No WebSocket pings: SignalR has its own, and signalrcore reads
        # ping frames as data.
        options = server_options(read_limit, handshake_timeout)
        # One WebSocket message may hold many records: the .NET client sends all its pipe
        # holds as one message (records written while a send was in flight), as ASP.NET
        # Core takes it; a message bounded by one record's limit was closed with 1009.
        # Each record is still bounded by the codec; the message (and any frame of it,
        # one frame when the pipe held one segment) as a POST body is.
        options["maxFramePayloadSize"] = options["maxMessagePayloadSize"] = max(read_limit, message_limit)
        self.setProtocolOptions(**options, autoPingInterval=0)

    def frame(self, record: bytes, binary: bool) -> PreparedMessage:
        """The WebSocket frame of ``record``, built once for a fan-out.

        A fan-out writes the same record object (cached per hub protocol by
        the event) to every connection in turn, so the last frame built is
        kept and reused while the same record comes again.
        """
        last_record, last_binary, last_frame = self._last_frame
        if record is last_record and binary == last_binary:
            return last_frame
        built = frame(record, binary)
        self._last_frame = (record, binary, built)
        return built

    def buildProtocol(self, addr: Any) -> SignalRWebSocketProtocol:
        proto = super().buildProtocol(addr)
        # WebSocketResource.render builds the protocol and runs the upgrade
        # synchronously, so the connection chosen by render is this one's.
        proto._target, self.pending = self.pending, (None, None, None)
        return proto


# -- Server-Sent Events ----------------------------------------------------------


class ServerSentEventsTransport:
    """A ``text/event-stream`` response carrying records as ``data:`` lines."""

    name = SERVER_SENT_EVENTS
    supports_binary = False
    inherent_keep_alive = False
    direct = None

    def __init__(self, request: Request, connection: HubConnection, write_limit: int) -> None:
        self.request = request
        self.connection = connection
        self.open = True
        self.budget = SendBudget(write_limit, self._too_slow)
        request.registerProducer(self.budget, True)
        request.notifyFinish().addBoth(self._gone)

    def write(self, data: bytes, binary: bool) -> None:
        if not self.open or not self.budget.charge(len(data)):
            return
        out = bytearray()
        for line in data.split(b"\n"):
            out += b"data: " + line.rstrip(b"\r") + b"\r\n"
        out += b"\r\n"
        self.request.write(bytes(out))

    def close(self) -> None:
        if self.open:
            self.open = False
            self.request.unregisterProducer()
            self.request.finish()

    def _too_slow(self) -> None:
        self.connection.too_slow(f"more than {self.budget.limit} bytes waiting to be sent")

    def _gone(self, _: Any) -> None:
        if self.open:
            self.open = False
            self.connection.transport_lost(self)


# -- long polling ------------------------------------------------------------------


class LongPollingTransport:
    """Records wait here for the client's next poll; one record per response.

    One record per response because signalrcore reads only the first record
    of each poll. The connection counts as gone when no poll has come for
    ``disconnect_timeout``.
    """

    name = LONG_POLLING
    supports_binary = True
    inherent_keep_alive = True
    direct = None

    def __init__(self, connection: HubConnection, manager: ConnectionManager) -> None:
        self.connection = connection
        self.manager = manager
        self.clock = manager.clock
        self.options = manager.options
        self.records: deque[bytes] = deque()
        self.size = 0
        self.closing = False
        #: the client was told to stop (204) or is gone: the connection can be forgotten
        self.done = False
        self.poll: Request | None = None
        self._poll_timer: IDelayedCall | None = None
        self._idle_timer: IDelayedCall | None = None
        self._idle()

    def write(self, data: bytes, binary: bool) -> None:
        if self.closing:
            return
        self.records.append(data)
        self.size += len(data)
        if self.size > self.options.write_limit:
            self.records.clear()
            self.size = 0
            self.connection.too_slow(f"more than {self.options.write_limit} bytes not polled")
            return
        if self.poll is not None:
            self._answer(self.poll)

    def close(self) -> None:
        self.closing = True
        if self.poll is not None:
            self._answer(self.poll)

    def take_poll(self, request: Request) -> Any:
        """A new poll: answer it now if anything waits, else hold it."""
        if self.poll is not None:
            self._end(self.poll, 204)
        self._cancel(self._idle_timer)
        if self.records or self.closing:
            return self._respond(request)
        self.poll = request
        self._poll_timer = self.clock.callLater(self.options.poll_timeout, self._poll_expired, request)
        request.notifyFinish().addErrback(self._poll_lost, request)
        return NOT_DONE_YET

    def delete(self) -> None:
        """The client stopped (DELETE): end everything, the waiting poll gets 204."""
        self.records.clear()
        self.size = 0
        self.closing = True
        if self.poll is not None:
            self._end(self.poll, 204)
        self.connection.transport_lost(self)
        self._finished()

    def _respond(self, request: Request) -> bytes:
        _poll_headers(request)
        if self.records:
            record = self.records.popleft()
            self.size -= len(record)
            self._idle()
            return record
        # closing and drained: 204 tells the client to stop
        request.setResponseCode(204)
        self._finished()
        return b""

    def _answer(self, request: Request) -> None:
        self.poll = None
        self._cancel(self._poll_timer)
        body = self._respond(request)
        if _open(request):
            request.write(body)
            request.finish()

    def _end(self, request: Request, code: int) -> None:
        if request is self.poll:
            self.poll = None
            self._cancel(self._poll_timer)
        if _open(request):
            _poll_headers(request)
            request.setResponseCode(code)
            request.finish()

    def _poll_expired(self, request: Request) -> None:
        self._poll_timer = None
        if request is self.poll:
            self.poll = None
            if _open(request):
                _poll_headers(request)
                request.finish()
            self._idle()

    def _poll_lost(self, _: Any, request: Request) -> None:
        if request is self.poll:
            self.poll = None
            self._cancel(self._poll_timer)
            self._idle()

    def _idle(self) -> None:
        self._cancel(self._idle_timer)
        self._idle_timer = self.clock.callLater(self.options.disconnect_timeout, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if self.poll is None:
            log.debug("{peer}: no poll for a while; gone", peer=self.connection.peer)
            self.records.clear()
            self.closing = True
            self.connection.transport_lost(self)
            self._finished()

    def _finished(self) -> None:
        self.done = True
        self._cancel(self._idle_timer)
        self._cancel(self._poll_timer)
        if self.connection.state == CLOSED:
            self.manager.forget(self.connection)

    @staticmethod
    def _cancel(call: IDelayedCall | None) -> None:
        if call is not None and call.active():
            call.cancel()


def _open(request: Request) -> bool:
    """The response can still be written: not finished, client still there."""
    return not request.finished and not getattr(request, "_disconnected", False)


def _poll_headers(request: Request) -> None:
    request.setHeader(b"content-type", b"application/octet-stream")
    request.setHeader(b"cache-control", _NO_CACHE)
    request.setHeader(b"pragma", b"no-cache")
    request.setHeader(b"expires", b"Thu, 01 Jan 1970 00:00:00 GMT")


# -- POST bodies ---------------------------------------------------------------------


class _Inbox:
    """The POSTed bytes of one connection, handed over ``_SLICE`` bytes per reactor turn.

    The codec keeps a record cut between two slices, so slicing anywhere is
    safe. A POST that arrives while an earlier one is still being handed
    over waits behind it: the connection sees the bytes in the order the
    POSTs came, and each POST is answered (200, empty) once it is all in.
    """

    def __init__(self, connection: HubConnection, clock: IReactorTime, on_empty: Any) -> None:
        self.connection = connection
        self.clock = clock
        self._on_empty = on_empty
        #: [bytes, offset, request] of each POST not handed over yet, oldest first
        self._queue: deque[list[Any]] = deque()
        self._call: IDelayedCall | None = None

    @property
    def busy(self) -> bool:
        return bool(self._queue)

    def full(self) -> bool:
        return len(self._queue) > _MAX_QUEUED_POSTS

    def add(self, data: bytes, request: Request) -> bool:
        """Queue one POST body; True when it was handled at once (answer it now)."""
        if not self._queue:
            self.connection.data_received(data[:_SLICE])
            if len(data) <= _SLICE:
                self._on_empty(self)
                return True
            self._queue.append([data, _SLICE, request])
        else:
            self._queue.append([data, 0, request])
        self._schedule()
        return False

    def _schedule(self) -> None:
        if self._call is None:
            self._call = self.clock.callLater(0, self._run)

    def _run(self) -> None:
        self._call = None
        entry = self._queue[0]
        data, offset, request = entry
        if self.connection.state != CLOSED:
            self.connection.data_received(data[offset : offset + _SLICE])
            entry[1] = offset + _SLICE
        if self.connection.state == CLOSED or entry[1] >= len(data):
            self._queue.popleft()
            _posted(request)
        if self.connection.state == CLOSED:
            # Nothing more will be read: answer what waits.
            while self._queue:
                _posted(self._queue.popleft()[2])
        if self._queue:
            self._schedule()
        else:
            self._on_empty(self)


def _posted(request: Request) -> None:
    """Answer a POST whose records were all handed over."""
    if _open(request):
        request.setHeader(b"content-type", b"text/plain")
        request.finish()


def _body_size(request: Request) -> int:
    """How many body bytes the request holds (or said it would hold)."""
    if getattr(request, "body_overflow", False):
        return getattr(request, "body_received", 0) or (1 << 62)
    declared = request.getHeader(b"content-length")
    if declared is not None:
        try:
            return max(int(declared), 0)
        except ValueError:
            pass
    content = request.content
    if content is None:
        return 0
    position = content.tell()
    content.seek(0, io.SEEK_END)
    size = content.tell()
    content.seek(position)
    return max(size, position)


class _BoundedRequest(Request):
    """A ``twisted.web`` request that stops storing its body past the site's ``body_limit``.

    twisted.web reads the whole body before rendering; this keeps memory to
    the bound whatever the client sends (a huge Content-Length, or a chunked
    body that never ends) and flags the request, so the resource answers 413
    once the body is read, leaving a keep-alive connection usable.
    """

    body_overflow = False
    body_received = 0

    def _limit(self) -> int:
        return getattr(getattr(self.channel, "site", None), "body_limit", 1 << 62)

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._limit():
            self.body_overflow = True
            self.body_received = length
            self.content = io.BytesIO()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        self.body_received += len(data)
        if self.body_overflow:
            return
        if self.body_received > self._limit():
            self.body_overflow = True
            self.content.close()
            self.content = io.BytesIO()
            return
        super().handleContentChunk(data)


# -- resources ---------------------------------------------------------------------


def _text(request: Request, code: int, message: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return message.encode()


class _CorsResource(Resource):
    """CORS for browser pages on other origins, with the WebSocket Origin policy.

    Credentials are allowed (the JS client sends them by default), so the
    origin is echoed, never ``*``; a request from an origin the policy
    refuses gets 403 whatever its method.
    """

    #: the largest request body this resource takes
    body_limit = _NEGOTIATE_BODY_LIMIT
    #: where a refused body is counted (``hub.metrics``), if anywhere
    metrics: Any = None

    def __init__(self, origins: OriginPolicy) -> None:
        super().__init__()
        self.origins = origins

    def render(self, request: Request) -> Any:
        origin = request.getHeader(b"origin")
        if origin is not None:
            host = request.getHeader(b"host")
            if not self.origins.allows(origin.decode("latin-1"), host.decode("latin-1") if host else None):
                return _text(request, 403, "Origin not allowed")
            request.setHeader(b"access-control-allow-origin", origin)
            request.setHeader(b"access-control-allow-credentials", b"true")
            request.setHeader(b"vary", b"Origin")
        if request.method == b"OPTIONS":
            request.setResponseCode(204)
            request.setHeader(b"access-control-allow-methods", _CORS_METHODS)
            wanted = request.getHeader(b"access-control-request-headers")
            request.setHeader(b"access-control-allow-headers", wanted or _CORS_HEADERS)
            request.setHeader(b"access-control-max-age", b"600")
            return b""
        if not hasattr(self, "render_" + request.method.decode("ascii", "replace")):
            return _text(request, 405, "Method not allowed")
        refused = self._authenticate(request)
        if refused is not None:
            return refused
        if _body_size(request) > self.body_limit:
            if self.metrics is not None:
                self.metrics.limited("post_body", "signalr")
            return _text(request, 413, f"Request body too large: the limit is {self.body_limit} bytes")
        return super().render(request)

    #: the hub, whose ``auth`` verifies tokens (None: no token is asked for)
    hub: Hub | None = None

    def _authenticate(self, request: Request) -> bytes | None:
        """With tokens on, verify the request's and keep its identity on it; the 401 answer if it fails."""
        request.chatd_identity = None  # type: ignore[attr-defined]
        auth = self.hub.auth if self.hub is not None else None
        if auth is None:
            return None
        try:
            identity = auth.from_request(request.getHeader(b"authorization"), query(request, "access_token"))
        except Unauthenticated as e:
            self.hub.metrics.error("unauthenticated", "signalr")  # type: ignore[union-attr]
            log.info("{peer} refused: {reason}", peer=_peer(request), reason=e.reason)
            request.setHeader(b"www-authenticate", b'Bearer error="invalid_token"')
            return _text(request, 401, e.reason)
        request.chatd_identity = identity  # type: ignore[attr-defined]
        return None


def _identity(request: Request) -> Identity | None:
    return getattr(request, "chatd_identity", None)


class NegotiateResource(_CorsResource):
    """``POST /signalr/negotiate``: a new connection and how it may be reached."""

    isLeaf = True

    def __init__(self, manager: ConnectionManager, origins: OriginPolicy) -> None:
        super().__init__(origins)
        self.manager = manager
        self.hub = manager.hub
        self.metrics = manager.hub.metrics

    def render_POST(self, request: Request) -> bytes:
        raw = query(request, "negotiateVersion")
        try:
            version = int(raw) if raw is not None else 0
        except ValueError:
            return write_json(request, {"error": "negotiateVersion must be an integer"}, 400)
        version = min(max(version, 0), 1)
        user = query(request, "user")
        identity = _identity(request)
        if user is not None:
            try:
                user = validate.user(user)
                if identity is not None:
                    identity.check_user(user)
            except ChatError as e:
                return write_json(request, {"error": e.reason})
        hub = self.manager.hub
        if hub.closing:
            return write_json(request, {"error": "server shutting down, try again shortly"})
        if len(self.manager.connections) >= hub.max_connections:
            # Negotiated connections hold memory before their handshake counts
            # them against --max-connections: bound them too.
            return write_json(request, {"error": f"server full: {hub.max_connections} connections open"})
        stateful = version >= 1 and (query(request, "useStatefulReconnect") or "").lower() == "true"
        try:
            connection = self.manager.create(_peer(request), user, stateful, version, identity)
        except ServerFull as e:
            # SignalR's own form: clients show a negotiate response's "error" as the reason.
            return write_json(request, {"error": e.reason})
        body: dict[str, Any] = {
            "connectionId": connection.connection_id,
            "negotiateVersion": version,
            "availableTransports": AVAILABLE_TRANSPORTS,
        }
        if version >= 1:
            body["connectionToken"] = connection.token
        if stateful:
            body["useStatefulReconnect"] = True
        return write_json(request, body)


class ConnectionResource(_CorsResource):
    """``/signalr``: every transport of every connection, routed as ASP.NET Core does."""

    def __init__(
        self,
        hub: Hub,
        manager: ConnectionManager,
        origins: OriginPolicy,
        ws_factory: SignalRWebSocketFactory,
        body_limit: int,
    ) -> None:
        super().__init__(origins)
        self.hub = hub
        self.body_limit = body_limit
        self.manager = manager
        self.metrics = hub.metrics
        self.ws_factory = ws_factory
        self.ws_resource = WebSocketResource(ws_factory)
        self.putChild(b"negotiate", NegotiateResource(manager, origins))
        self.putChild(b"health", JsonResource(lambda: health(hub, "signalr")))

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"":
            return self
        return super().getChild(path, request)

    def _lookup(self, request: Request) -> tuple[HubConnection | None, bytes | None]:
        token = query(request, "id")
        if not token:
            return None, _text(request, 400, "Connection ID required")
        connection = self.manager.get(token)
        if connection is None:
            return None, _text(request, 404, "No Connection with that ID")
        identity = _identity(request)
        if connection.identity is not None and (identity is None or identity.user != connection.identity.user):
            return None, _text(request, 403, "Forbidden: the token is another user's than the connection's")
        return connection, None

    def render_GET(self, request: Request) -> Any:
        upgrade = (request.getHeader(b"upgrade") or b"").lower()
        if upgrade == b"websocket":
            return self._websocket(request)
        if b"text/event-stream" in (request.getHeader(b"accept") or b""):
            return self._event_stream(request)
        return self._long_poll(request)

    def _websocket(self, request: Request) -> Any:
        token = query(request, "id")
        connection = None
        if token:
            connection, error = self._lookup(request)
            if error is not None:
                return error
            assert connection is not None
            if connection.transport_name not in (None, WEBSOCKETS):
                return _text(request, 400, "Cannot change transports mid-connection")
            if connection.transport is not None and not connection.stateful:
                return _text(request, 409, "Connection already has an active WebSocket")
        user = query(request, "user")
        identity = _identity(request)
        if connection is None and user is not None:
            try:
                user = validate.user(user)
                if identity is not None:
                    identity.check_user(user)
            except ChatError as e:
                return _text(request, 400, e.reason)
        self.ws_factory.pending = (connection, user, identity)
        try:
            return self.ws_resource.render(request)
        finally:
            self.ws_factory.pending = (None, None, None)

    def _event_stream(self, request: Request) -> Any:
        connection, error = self._lookup(request)
        if error is not None:
            return error
        assert connection is not None
        if connection.transport_name not in (None, SERVER_SENT_EVENTS):
            return _text(request, 400, "Cannot change transports mid-connection")
        if connection.transport is not None:
            return _text(request, 409, "Connection already has an active event stream")
        if connection.state == CLOSED:
            return _text(request, 404, "No Connection with that ID")
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", _NO_CACHE)
        request.setHeader(b"content-encoding", b"identity")
        request.setHeader(b"x-accel-buffering", b"no")
        request.write(b":\r\n")
        connection.attach(ServerSentEventsTransport(request, connection, self.manager.options.write_limit))
        return NOT_DONE_YET

    def _long_poll(self, request: Request) -> Any:
        connection, error = self._lookup(request)
        if error is not None:
            return error
        assert connection is not None
        if connection.transport_name not in (None, LONG_POLLING):
            return _text(request, 400, "Cannot change transports mid-connection")
        transport = self.manager.long_polls.get(connection.token)
        if transport is None:
            if connection.state == CLOSED:
                return _text(request, 404, "No Connection with that ID")
            # The first poll activates the connection and returns at once.
            transport = self.manager.long_polls[connection.token] = LongPollingTransport(connection, self.manager)
            connection.attach(transport)
            _poll_headers(request)
            request.setHeader(b"content-length", b"0")
            return b""
        return transport.take_poll(request)

    def render_POST(self, request: Request) -> Any:
        connection, error = self._lookup(request)
        if error is not None:
            return error
        assert connection is not None
        if connection.transport_name == WEBSOCKETS:
            return _text(request, 405, "POST requests are not allowed for WebSocket connections.")
        if connection.state == CLOSED:
            return _text(request, 404, "No Connection with that ID")
        inbox = self.manager.inbox(connection)
        if inbox.full():
            return _text(request, 429, "Too many POST requests waiting on this connection")
        if not inbox.add(request.content.read(), request):
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"text/plain")
        return b""

    def render_DELETE(self, request: Request) -> bytes:
        connection, error = self._lookup(request)
        if error is not None:
            return error
        assert connection is not None
        transport = self.manager.long_polls.get(connection.token)
        if connection.transport_name != LONG_POLLING or transport is None:
            return _text(request, 400, "Cannot terminate this connection using the DELETE endpoint.")
        transport.delete()
        request.setResponseCode(202)
        return b""


class SignalRSite(Site):
    """The SignalR listener's site; when it stops listening, clients are told to come back."""

    requestFactory = _BoundedRequest

    def __init__(self, resource: Resource, manager: ConnectionManager, body_limit: int) -> None:
        super().__init__(resource)
        self.manager = manager
        #: the largest request body kept (larger ones are counted, not stored, and get 413)
        self.body_limit = body_limit
        self.noisy = False

    def stopFactory(self) -> None:
        self.manager.going_away("server shutting down")
        super().stopFactory()


def site(
    hub: Hub,
    clock: IReactorTime,
    origins: OriginPolicy | None = None,
    options: Options | None = None,
    read_limit: int = 65536,
    max_post: int | None = None,
    handshake_timeout: float = 15,
) -> SignalRSite:
    """The SignalR listener's ``twisted.web`` site: ``/signalr`` and ``/signalr/health``.

    ``read_limit`` bounds a WebSocket frame; a POST, the HTTP transports'
    frame, may hold ``max_post`` bytes (``--signalr-max-post``), by default
    ``_RECORDS_PER_POST`` times as much because clients batch records into
    one POST; past it the answer is 413. ``handshake_timeout`` bounds a
    WebSocket's opening handshake (``--handshake-timeout``).
    """
    origins = origins or OriginPolicy()
    options = options or Options()
    manager = ConnectionManager(hub, clock, options)
    frame_limit = max(read_limit, options.max_message_size)
    body_limit = max_post if max_post else _RECORDS_PER_POST * frame_limit
    ws_factory = SignalRWebSocketFactory(manager, frame_limit, handshake_timeout, body_limit)
    root = Resource()
    root.putChild(b"signalr", ConnectionResource(hub, manager, origins, ws_factory, body_limit))
    return SignalRSite(root, manager, body_limit)
