"""HTTP pieces shared by the listeners: JSON resources, health, the info page,
and the Origin policy that the WebSocket upgrade and SignalR's CORS both use."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from html import escape
from typing import Any
from urllib.parse import urlsplit

import orjson
from twisted.internet.interfaces import ITCPTransport
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol
from twisted.web.resource import Resource
from twisted.web.server import Request

from chatd import __version__
from chatd.events import rfc3339


def _hostname(value: str | None) -> str | None:
    """The host part of an ``Origin`` URL or a ``Host`` header, lower-cased."""
    if not value:
        return None
    if "//" not in value:
        value = "//" + value
    try:
        return (urlsplit(value).hostname or "").lower() or None
    except ValueError:
        return None


class OriginPolicy:
    """Which browser origins may open connections.

    With no configured origins, a page served from the same host name (on
    any port: the browser client lives on another port) is allowed, and so
    is a request with no ``Origin`` at all (non-browser clients send none).
    Configured entries are exact origins (``https://chat.example.com``) or
    ``*`` for any.
    """

    def __init__(self, allowed: Iterable[str] = ()) -> None:
        self.allowed = {o.strip().rstrip("/").lower() for o in allowed if o.strip()}

    def allows(self, origin: str | None, host: str | None) -> bool:
        if origin is None or origin == "":
            return True
        if "*" in self.allowed:
            return True
        if origin.rstrip("/").lower() in self.allowed:
            return True
        if self.allowed:
            return False
        origin_host = _hostname(origin)
        return origin_host is not None and origin_host == _hostname(host)


def write_json(request: Request, body: Any, code: int = 200) -> bytes:
    """Set the JSON headers and status on ``request``; return the body to render."""
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return orjson.dumps(body)


class JsonResource(Resource):
    """``GET`` answers ``body()`` as JSON (a status code may come with it)."""

    isLeaf = True

    def __init__(self, body: Callable[[], tuple[int, Any]]) -> None:
        super().__init__()
        self._body = body

    def render_GET(self, request: Request) -> bytes:
        code, body = self._body()
        return write_json(request, body, code)

    render_HEAD = render_GET


def go_duration(seconds: float) -> str:
    """Format like Go's ``time.Duration.String()`` (``1h2m3.5s``), the seed's uptime form."""
    seconds = max(0.0, seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    out = ""
    if hours:
        out += f"{int(hours)}h"
    if hours or minutes:
        out += f"{int(minutes)}m"
    return out + f"{secs:.3f}".rstrip("0").rstrip(".") + "s"


def health(hub, service: str) -> tuple[int, dict]:
    """The health document: 200 while the hub serves; 503, with the reason, once
    shutdown starts or while the store cannot keep messages (Redis away)."""
    ok = hub.healthy
    body = {
        "status": "healthy" if ok else "unhealthy",
        "service": service,
        "timestamp": rfc3339(hub.clock.seconds()),
        "clients": len(hub.sessions),
        "uptime": go_duration(hub.uptime()),
    }
    if not ok:
        body["reason"] = hub.problem
    return (200 if ok else 503), body


_INFO = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>chatd</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family: system-ui, sans-serif; max-width: 40em; margin: 2em auto">
<h1>chatd {version}</h1>
<p>A real-time chat daemon: WebSocket, SignalR and gRPC clients share the same rooms.</p>
<ul>
<li>WebSocket (JSON): <code>/ws</code></li>
<li><a href="/health">/health</a>, <a href="/stats">/stats</a></li>
</ul>
<p>{clients} clients connected, {rooms} rooms active.</p>
</body></html>
"""


class InfoPage(Resource):
    """``GET /``: what this server is and where its endpoints are."""

    isLeaf = True

    def __init__(self, hub) -> None:
        super().__init__()
        self._hub = hub

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-security-policy", b"default-src 'none'; style-src 'unsafe-inline'")
        return _INFO.format(
            version=escape(__version__),
            clients=len(self._hub.sessions),
            rooms=len(self._hub.rooms()),
        ).encode()


#: The largest request body the ``--ws`` and ``--web`` listeners keep: they serve only GETs.
NO_BODY_LIMIT = 65536


class BoundedRequest(Request):
    """A ``twisted.web`` request that keeps at most ``NO_BODY_LIMIT`` bytes of body; past it, 413.

    twisted.web reads a whole body, of any size, before a resource sees it,
    and spools one over 100,000 bytes to a temporary file: one client POSTing
    to ``/health`` had the daemon write 2.5 GB to disk in 12 s. Past the
    bound nothing is stored (the rest is read and dropped until the request's
    deadline) and the answer is 413, whatever the resource.
    """

    body_limit = NO_BODY_LIMIT
    body_overflow = False
    _body_received = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.body_limit:
            self.body_overflow = True
            self.content = io.BytesIO()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_overflow:
            return
        self._body_received += len(data)
        if self._body_received > self.body_limit:
            self.body_overflow = True
            self.content.close()
            self.content = io.BytesIO()
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        if not self.body_overflow:
            super().process()
            return
        self.setResponseCode(413)
        self.setHeader(b"content-type", b"text/plain; charset=utf-8")
        self.write(f"Request body too large: the limit is {self.body_limit} bytes".encode())
        self.finish()


class DeadlineChannel(HTTPChannel):
    """An HTTP connection that must deliver each whole request within ``deadline`` seconds.

    twisted.web's ``timeOut`` is an idle timeout: every byte resets it, so a
    client trickling one header line a second held its socket forever (and
    before an upgrade nothing counts it against any limit). Here the clock
    runs from the moment the server waits for a request until the request
    is all in; while a request is being answered (a long poll, an event
    stream, a WebSocket once upgraded) it does not run.
    """

    deadline: float = 15.0
    #: told when a connection is dropped for being too slow (a metric)
    on_expired: Callable[[], None] | None = None
    #: put twisted.web's connection set-up off until the first bytes (see :meth:`start_http`)
    defer_setup: bool = False
    _deadline_call: Any = None
    #: whether ``HTTPChannel.connectionMade``'s set-up has run
    _http_started = False

    def connectionMade(self) -> None:
        if self.defer_setup and self.deadline and (self.timeOut is None or self.timeOut >= self.deadline):
            # Until the first bytes arrive the deadline is the only timer that can
            # fire first (the idle one would not fire sooner: see _expired), and
            # nothing is written, so producer registration can wait too.
            if ITCPTransport.providedBy(self.transport):
                self.transport.setTcpNoDelay(True)
        else:
            self.start_http()
        self._arm()

    def start_http(self) -> None:
        """Run twisted.web's connection set-up (idle timer, producer registration) if not yet done.

        It costs a timer, an interface adaptation and a producer registration
        per connection, all wasted on a connection that a subclass hands to
        another protocol on its first bytes (:class:`chatd.websocket.UpgradeChannel`):
        with ``defer_setup`` it runs only once the bytes show an HTTP request
        (before twisted.web reads them), so HTTP requests are served, timed
        and logged exactly as without it.
        """
        if not self._http_started:
            self._http_started = True
            super().connectionMade()

    def _arm(self) -> None:
        self._disarm()
        if self.deadline:
            self._deadline_call = self.callLater(self.deadline, self._expired)

    def _disarm(self) -> None:
        call, self._deadline_call = self._deadline_call, None
        if call is not None and call.active():
            call.cancel()

    def allContentReceived(self) -> None:
        self._disarm()
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        super().requestDone(request)
        if self.transport is not None and not self.transport.disconnecting:
            if self._waitingForTransport and getattr(self, "_networkProducer", None) is not None:
                # The transport said "full" while this request was answered, when
                # twisted.web only notes it (it pauses reading only between requests)
                # and never pauses later: a client pipelining requests and reading
                # nothing had every answer buffered, without end. Stop reading now;
                # the transport's resumeProducing starts it again once drained.
                self._networkProducer.pauseProducing()
            self._arm()  # waiting for the next request on a kept-alive connection

    def connectionLost(self, reason: Any) -> None:
        self._disarm()
        super().connectionLost(reason)

    def _expired(self) -> None:
        self._deadline_call = None
        transport = self.transport
        if transport is None:
            return  # handed over (WebSocketResource takes the transport): not ours to time any more
        if not self._http_started and self.timeOut is not None and self.timeOut <= self.deadline:
            # Nothing came, and twisted.web's idle timer, had it been started at
            # the accept, would be firing now as well: do what it does too.
            self.start_http()
            self.setTimeout(None)
            self.timeoutConnection()
        if self.on_expired is not None:
            self.on_expired()
        transport.loseConnection()


#: How long an HTTP/2 connection may carry no frame at all before it is closed.
#: Its idle timer runs while streams are open (unlike HTTP/1.1's, which stops
#: while a request is answered), so it must outlast the quietest stream chatd
#: serves: a SignalR long poll is held up to 90 s, SSE pings every 15 s.
HTTP2_IDLE_TIMEOUT = 300.0


class _Negotiated(_GenericHTTPChannelProtocol):
    """twisted.web's ALPN switch (HTTP/1.1 or HTTP/2), over a :class:`DeadlineChannel`.

    A ``Site`` advertises ``h2`` by ALPN on TLS listeners whenever ``h2`` is
    installed, but only its own protocol factory can speak it; a site whose
    protocol is a plain channel answers an HTTP/2 client with garbage. When
    HTTP/2 is chosen, the HTTP/1.1 channel's deadline is cancelled (HTTP/2
    frames reset the connection's idle timer instead).
    """

    def dataReceived(self, data: bytes) -> None:
        if self._negotiatedProtocol is None:
            transport = self._channel.transport
            if getattr(transport, "negotiatedProtocol", None) == b"h2":
                self._channel.start_http()  # its producer registration is handed to HTTP/2's
                self._channel._disarm()
                self.timeOut = HTTP2_IDLE_TIMEOUT
        super().dataReceived(data)


def with_deadline(site: Any, deadline: float, on_expired: Callable[[], None] | None = None) -> Any:
    """Give ``site``'s HTTP/1.1 connections :class:`DeadlineChannel`'s per-request deadline.

    A site whose channel is already a :class:`DeadlineChannel` (one that
    also takes WebSocket upgrades) keeps it, with this deadline. On TLS the
    channel sits behind twisted.web's ALPN switch (:class:`_Negotiated`),
    so HTTP/2 clients get HTTP/2.
    """
    base = site.protocol if isinstance(site.protocol, type) and issubclass(site.protocol, DeadlineChannel) else None
    channel = type(
        (base or DeadlineChannel).__name__,
        (base or DeadlineChannel,),
        {"deadline": deadline, "on_expired": staticmethod(on_expired)},
    )
    site.protocol = lambda: _Negotiated(channel())
    return site
