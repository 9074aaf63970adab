"""The browser client's listener (``--web``): the page, its config, and stats.

chatd serves its own page so that ``http://host:3000`` is the whole setup:
no separate static server, no build step. The page is plain files (``web/``
in a source checkout, ``chatd/web`` once installed) plus two JSON documents
made here:

``GET /config.json``
    Where the page's protocols listen, as seen by *this* request: the host
    name the browser used, each listener's real port (``tcp:0`` in tests),
    and ``wss``/``https`` when the listener is ``ssl:`` or the page itself
    came over TLS. A listener on a ``unix:`` socket is assumed to sit behind
    a reverse proxy on the page's own origin, so its URL is the page's
    origin plus the listener's path. ``--web-ws-url``/``--web-signalr-url``
    override both (a reverse proxy's path or URL). A protocol that is not
    configured is ``null``. ``"auth": true`` says the chat protocols want a
    token (``--auth-secret``): the page then asks for one (or takes it from
    its URL's ``#token=``) and sends it with every connection.
``GET /stats``
    The hub's figures, same-origin so the page needs no CORS.

Every response carries the security headers; the HTML page gets a
Content-Security-Policy whose ``connect-src`` names exactly the origins that
``/config.json`` hands out, and no inline script or style is allowed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from twisted.logger import Logger
from twisted.web import http, pages
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from chatd import __version__
from chatd.http import BoundedRequest, JsonResource, health, write_json

log = Logger()

#: protocol -> (path on its listener, its URL schemes (plain, secure)).
PROTOCOL_PATHS: dict[str, tuple[str, tuple[str, str]]] = {
    "websocket": ("/ws", ("ws", "wss")),
    "signalr": ("/signalr", ("http", "https")),
}

#: How many kept messages the page asks for when it opens a room.
HISTORY_SHOWN = 50

#: protocol -> the tap listener option that serves it.
PROTOCOL_LISTENERS = {"websocket": "ws", "signalr": "signalr"}

#: protocol -> the tap option that overrides where the page connects (a reverse proxy's URL or path).
PUBLIC_URL_OPTIONS = {"websocket": "web-ws-url", "signalr": "web-signalr-url"}

_PUBLIC_NETLOC_RE = re.compile(r"([A-Za-z0-9.\-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(:[0-9]{1,5})?")
_PUBLIC_PATH_RE = re.compile(r"/[A-Za-z0-9._~%/\-]*")

_HOST_RE = re.compile(r"[A-Za-z0-9.\-]{1,253}")
_IPV6_RE = re.compile(r"[0-9A-Fa-f:.]{2,45}")

_BASE_HEADERS = {
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"x-frame-options": b"DENY",
    b"cross-origin-opener-policy": b"same-origin",
    b"cross-origin-resource-policy": b"same-origin",
    b"permissions-policy": b"camera=(), microphone=(), geolocation=(), payment=(), usb=()",
}

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".json": "application/json",
}


def static_dir() -> Path:
    """Where the page's files are: installed next to the package, or ``web/`` in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "web", here.parent / "web"):
        if (candidate / "index.html").is_file():
            return candidate
    raise FileNotFoundError(f"the browser client's files are missing (looked in {here / 'web'})")


def page_is_secure(request: Request) -> bool:
    """True when the browser reached the page over TLS, directly or through a proxy."""
    if request.isSecure():
        return True
    forwarded = request.getHeader(b"x-forwarded-proto")
    return forwarded is not None and forwarded.split(b",")[0].strip().lower() == b"https"


def page_host(request: Request) -> str:
    """The host name the browser used for the page, safe to put into URLs and headers.

    The ``Host`` header is the peer's to choose; anything that is not a
    plain DNS name or IP literal falls back to the address that accepted the
    connection, so a forged header cannot inject into the CSP or the config.
    """
    raw = (request.getHeader(b"host") or b"").decode("latin-1")
    try:
        name = urlsplit("//" + raw).hostname or ""
    except ValueError:
        name = ""
    if name and ":" not in name and _HOST_RE.fullmatch(name):
        return name
    if name and _IPV6_RE.fullmatch(name):
        return f"[{name}]"
    local = request.getHost()
    host = getattr(local, "host", "") or "localhost"
    return f"[{host}]" if ":" in host else host


def _page_origin(request: Request) -> str:
    scheme = "https" if page_is_secure(request) else "http"
    raw = (request.getHeader(b"host") or b"").decode("latin-1")
    try:
        port = urlsplit("//" + raw).port
    except ValueError:
        port = None
    host = page_host(request)
    return f"{scheme}://{host}:{port}" if port else f"{scheme}://{host}"


class ListenerMap:
    """Finds a listener's description and bound port when asked, not when built.

    Listeners are started after the web site is built (``tcp:0`` picks the
    port then), and another listener may be added to the tree after this
    one; looking them up per request keeps the web listener independent of
    the order of ``makeService``.
    """

    def __init__(self, services: Any, descriptions: Callable[[str], str | None]) -> None:
        self._services = services
        self._descriptions = descriptions

    def public_url(self, protocol: str) -> str:
        """The configured override of ``protocol``'s URL, or ``""`` to derive it."""
        return self._descriptions(PUBLIC_URL_OPTIONS[protocol]) or ""

    def lookup(self, name: str) -> tuple[str, Any] | None:
        """``(endpoint description, IListeningPort or None)`` of a listener, or None if absent."""
        description = self._descriptions(name)
        if not description:
            return None
        try:
            service = self._services.getServiceNamed(name)
        except KeyError:
            # Served by another process on this port (``--workers``: SignalR
            # lives in the first worker only): the configured port still holds.
            port = _configured_port(description)
            return (description, _FixedPort(port)) if port else None
        return description, getattr(service, "port", None)


def _configured_port(description: str) -> int | None:
    parts = description.split(":")
    return int(parts[1]) if parts[0] in ("tcp", "tcp6", "ssl") and len(parts) > 1 and parts[1].isdigit() else None


class _FixedPort:
    """An ``IListeningPort`` stand-in that only knows its port number."""

    def __init__(self, port: int) -> None:
        self.port = port

    def getHost(self) -> Any:
        return self


def check_public_url(protocol: str, value: str) -> str:
    """Validate an override: a path on the page's own origin, or an absolute URL of the right scheme.

    Raises ``ValueError``; the value ends up in a header (the CSP), so only
    plain host names, ports and path characters pass.
    """
    value = value.strip()
    if not value or _PUBLIC_PATH_RE.fullmatch(value):
        return value
    schemes = PROTOCOL_PATHS[protocol][1]
    parts = urlsplit(value)
    if (
        parts.scheme not in schemes
        or not _PUBLIC_NETLOC_RE.fullmatch(parts.netloc)
        or (parts.path and not _PUBLIC_PATH_RE.fullmatch(parts.path))
        or parts.query
        or parts.fragment
    ):
        raise ValueError(
            f"{value!r} is neither a path (such as {PROTOCOL_PATHS[protocol][0]}) nor an absolute "
            f"{' or '.join(s + '://' for s in schemes)} URL with a plain host name"
        )
    return value


def check_options(options: Any) -> None:
    """Reject a malformed ``--web-*-url`` at start (called from ``Options.postOptions``)."""
    from twisted.python import usage

    for protocol, name in PUBLIC_URL_OPTIONS.items():
        try:
            options[name] = check_public_url(protocol, options.get(name) or "")
        except ValueError as e:
            raise usage.UsageError(f"--{name}: {e}") from None


def _same_origin(protocol: str, path: str, request: Request) -> str:
    origin = _page_origin(request)
    if protocol == "websocket":
        origin = origin.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
    return origin + path


def protocol_url(
    protocol: str, found: tuple[str, Any] | None, request: Request, public: str = ""
) -> str | None:
    """The URL a browser on ``request``'s page uses to reach ``protocol``'s listener.

    ``public`` (``--web-ws-url``/``--web-signalr-url``) wins: a path means the
    page's own origin (a reverse proxy in front of everything), a URL is used
    as it is.
    """
    if public.startswith("/"):
        return _same_origin(protocol, public, request)
    if public:
        return public
    if found is None:
        return None
    description, port = found
    path, (plain, secure_scheme) = PROTOCOL_PATHS[protocol]
    kind = description.split(":", 1)[0].lower()
    secure = kind == "ssl" or page_is_secure(request)
    scheme = secure_scheme if secure else plain
    address = port.getHost() if port is not None else None
    number = getattr(address, "port", None)
    if kind == "unix" or number is None:
        # Not reachable by port from a browser: a reverse proxy on the page's
        # origin forwards the path.
        return _same_origin(protocol, path, request)
    return f"{scheme}://{page_host(request)}:{number}{path}"


def client_config(
    listeners: ListenerMap, request: Request, limits: Any = None, auth: bool = False
) -> dict[str, Any]:
    """The document at ``/config.json``; ``limits`` (the hub's) adds the input bounds."""
    urls = {
        protocol: protocol_url(protocol, listeners.lookup(name), request, listeners.public_url(protocol))
        for protocol, name in PROTOCOL_LISTENERS.items()
    }
    config: dict[str, Any] = {
        "version": __version__,
        "protocols": [p for p, url in urls.items() if url],
        **urls,
        "stats": "/stats",
        "auth": auth,
    }
    if limits is not None:
        config["maxMessageLength"] = limits.max_message_length
        config["historyLimit"] = min(HISTORY_SHOWN, limits.history_limit)
    return config


def connect_sources(config: dict[str, Any]) -> list[str]:
    """The origins the page may connect to: each protocol URL's origin (SignalR's in both schemes)."""
    sources = ["'self'"]
    for protocol in PROTOCOL_LISTENERS:
        url = config.get(protocol)
        if not url:
            continue
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        sources.append(origin)
        if parts.scheme in ("http", "https"):
            ws = "wss" if parts.scheme == "https" else "ws"
            sources.append(f"{ws}://{parts.netloc}")
    return list(dict.fromkeys(sources))


def content_security_policy(config: dict[str, Any]) -> str:
    """No inline script or style, nothing from elsewhere, no framing."""
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            "connect-src " + " ".join(connect_sources(config)),
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


def set_security_headers(request: Request, csp: str | None = None) -> None:
    for name, value in _BASE_HEADERS.items():
        request.setHeader(name, value)
    if page_is_secure(request):
        request.setHeader(b"strict-transport-security", b"max-age=31536000")
    if csp is not None:
        request.setHeader(b"content-security-policy", csp.encode())


class _Tree(Resource):
    """A resource whose unknown children are a plain 404 (escaped, no deprecated page)."""

    def getChild(self, path: bytes, request: Request) -> Resource:
        return pages.notFound()


class StaticFile(_Tree):
    """One of the page's files, read once at start and served from memory.

    The set of files is fixed when the site is built, so no request path
    can reach anything else on disk and there is no directory listing. An
    ETag lets the browser revalidate cheaply on every load (``no-cache``),
    so an upgraded daemon's page shows at once.
    """

    def __init__(self, body: bytes, content_type: str, listeners: ListenerMap | None = None) -> None:
        super().__init__()
        self.body = body
        self.content_type = content_type.encode()
        self.etag = b'"' + hashlib.sha256(body).hexdigest()[:20].encode() + b'"'
        self._listeners = listeners

    def render_GET(self, request: Request) -> bytes:
        csp = None
        if self._listeners is not None:
            csp = content_security_policy(client_config(self._listeners, request))
        set_security_headers(request, csp)
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"cache-control", b"no-cache")
        if request.setETag(self.etag) == http.CACHED:
            return b""
        return self.body


def static_files(directory: Path, listeners: ListenerMap) -> dict[bytes, StaticFile]:
    """The servable files of ``directory`` by URL name; HTML pages get the CSP."""
    files: dict[bytes, StaticFile] = {}
    for path in sorted(directory.iterdir()):
        content_type = _CONTENT_TYPES.get(path.suffix)
        if content_type is None or not path.is_file() or path.name.startswith("."):
            continue
        html = path.suffix == ".html"
        files[path.name.encode()] = StaticFile(path.read_bytes(), content_type, listeners if html else None)
    return files


class ConfigResource(Resource):
    """``GET /config.json``: see the module docstring."""

    isLeaf = True

    def __init__(self, listeners: ListenerMap, limits: Any = None, auth: bool = False) -> None:
        super().__init__()
        self._listeners = listeners
        self._limits = limits
        self._auth = auth

    def render_GET(self, request: Request) -> bytes:
        set_security_headers(request)
        return write_json(request, client_config(self._listeners, request, self._limits, self._auth))

    render_HEAD = render_GET


class _SecureJson(JsonResource):
    def render_GET(self, request: Request) -> bytes:
        set_security_headers(request)
        return super().render_GET(request)

    render_HEAD = render_GET


def web_site(hub: Any, listeners: ListenerMap, files: Path | None = None) -> Site:
    """The web listener's site: the page's files, ``/config.json``, ``/stats``, ``/health``."""
    directory = files or static_dir()
    log.info("serving the browser client from {directory}", directory=str(directory))
    root = _Tree()
    for name, resource in static_files(directory, listeners).items():
        root.putChild(name, resource)
    root.putChild(b"", root.children[b"index.html"])
    root.putChild(b"config.json", ConfigResource(listeners, hub.limits, getattr(hub, "auth", None) is not None))
    root.putChild(b"stats", _SecureJson(lambda: (200, hub.stats())))
    root.putChild(b"health", _SecureJson(lambda: health(hub, "web")))
    site = Site(root)
    site.requestFactory = BoundedRequest  # no body of any size spooled to disk (twisted.web's default)
    site.noisy = False
    return site
