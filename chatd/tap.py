"""``twistd chatd``: command-line options and the service tree.

Every listener is a Twisted endpoint string, so ``tcp:``, ``ssl:``, ``unix:``
and ``systemd:`` all work the same way. Each option falls back to an
environment variable, then to a default; a flag on the command line wins.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet import defer, endpoints
from twisted.python import usage
from twisted.web.resource import Resource
from twisted.web.server import Site

from chatd import auth, signalr, store, validate, webclient, websocket, workers
from chatd.fastpoll import EventDispatch
from chatd.gctune import GcTuning
from chatd.grpc import service as grpc_service
from chatd.http import BoundedRequest, InfoPage, JsonResource, OriginPolicy, health, with_deadline
from chatd.hub import Hub
from chatd.ops import ServiceTree, add_operations, check_options, metrics_resource
from chatd.startup import StartupError, check_endpoint_tls, check_pem, listen_error
from chatd.validate import Limits

# option -> (environment variable, default, help). A bare number means tcp:N.
LISTENERS: dict[str, tuple[str, str, str]] = {
    "ws": ("WS_PORT", "tcp:8080", "WebSocket (/ws) and HTTP (/health, /stats) listener"),
    "signalr": ("SIGNALR_PORT", "tcp:8081", "ASP.NET Core SignalR listener (/signalr, /signalr/health)"),
    "web": ("WEB_PORT", "tcp:3000", "browser client: the chat page, /config.json and /stats"),
}

# option -> (environment variable, default, help); whole numbers, at least 1 (0 allowed where it means off).
INTEGERS: dict[str, tuple[str, int, str]] = {
    "max-connections": ("MAX_CONNECTIONS", 10000, "most client connections open at once, all protocols together"),
    "read-buffer-size": ("READ_BUFFER_SIZE", 65536, "largest inbound message (WebSocket, SignalR, gRPC), in bytes"),
    "write-buffer-size": (
        "WRITE_BUFFER_SIZE",
        "the larger of 1048576 and a full room's history",
        "bytes that may wait for a slow client before it is disconnected; a full room's history is "
        "--history-limit x (6 x --max-message-length + 512) bytes at most, and a client that reads must be able "
        "to take one (a history reply, a resume)",
    ),
    "history-limit": ("HISTORY_LIMIT", 100, "messages kept per room for history and resume"),
    "history-max-age": (
        "HISTORY_MAX_AGE",
        7 * 24 * 3600,
        "seconds a message is kept for history and resume; 0 keeps messages until --history-limit pushes them out",
    ),
    "history-memory": (
        "HISTORY_MEMORY",
        64 * 1024 * 1024,
        "bytes the in-memory history windows of all rooms may take (approximate); the least recently used "
        "go back to the store (with --data-dir '': are forgotten)",
    ),
    "max-message-length": ("MAX_MESSAGE_LENGTH", 4096, "longest chat message, in characters"),
    "max-message-rate": (
        "MAX_MESSAGE_RATE",
        20,
        "messages a second one user may send on average, over all protocols; 0 turns the limit off",
    ),
    "message-burst": ("MESSAGE_BURST", 50, "messages one user may send at once before the rate limit applies"),
    "max-connection-rate": (
        "MAX_CONNECTION_RATE",
        "2 x --max-message-rate",
        "messages a second one connection may send on average whatever user names it uses "
        "(gRPC SendMessage: per client address); 0 turns the limit off",
    ),
    "connection-burst": (
        "CONNECTION_BURST",
        "2 x --message-burst",
        "messages one connection may send at once before its rate limit applies",
    ),
    "max-connections-per-ip": (
        "MAX_CONNECTIONS_PER_IP",
        256,
        "connections open at once from one client address, all protocols together "
        "(SignalR from negotiate on, gRPC streams); 0 turns the limit off",
    ),
    "max-rooms-per-connection": (
        "MAX_ROOMS_PER_CONNECTION",
        100,
        "rooms one connection may be in at once; 0 turns the limit off",
    ),
    "handshake-timeout": (
        "HANDSHAKE_TIMEOUT",
        15,
        "seconds a client has to send a whole HTTP request, and to finish a WebSocket opening handshake",
    ),
    "idle-timeout": (
        "IDLE_TIMEOUT",
        0,
        "seconds a WebSocket (/ws) client may send no message and no ping before it is closed "
        "(4008); 0 never closes an idle client",
    ),
    "ws-keep-alive": (
        "WS_KEEP_ALIVE",
        30,
        "seconds a WebSocket (/ws) client may send nothing before the server pings it; a ping "
        "unanswered as long closes the connection; 0 never pings",
    ),
    "workers": (
        "WORKERS",
        1,
        "processes serving the same ports, each with its own core, joined through --redis (required past 1)",
    ),
    "drain-timeout": ("DRAIN_TIMEOUT", 10, "seconds a shutdown waits for clients to leave before closing the rest"),
    "grpc-workers": ("GRPC_WORKERS", 1100, "gRPC worker threads of the threaded server (each open stream holds one); unused by aio"),
    "grpc-max-streams": ("GRPC_MAX_STREAMS", 1000, "most gRPC streams open at once (threaded: below --grpc-workers)"),
    "grpc-stream-queue": (
        "GRPC_STREAM_QUEUE",
        "the larger of 1000 and 2 x --history-limit",
        "events a gRPC stream may have waiting before it is ended (a resume's replay, a full room's history, "
        "is queued at once)",
    ),
    "signalr-keep-alive": ("SIGNALR_KEEP_ALIVE", 15, "seconds of silence after which the server pings a SignalR client"),
    "signalr-client-timeout": (
        "SIGNALR_CLIENT_TIMEOUT",
        30,
        "seconds without a message after which a SignalR client is disconnected",
    ),
    "signalr-handshake-timeout": (
        "SIGNALR_HANDSHAKE_TIMEOUT",
        15,
        "seconds a SignalR client has, once its transport is open, to send the SignalR handshake",
    ),
    "signalr-max-post": (
        "SIGNALR_MAX_POST",
        "16 x --read-buffer-size",
        "largest body of a SignalR POST (long polling and SSE send records by POST), in bytes; "
        "larger ones get 413",
    ),
}

_ZERO_MEANS_OFF = {
    "max-message-rate",
    "history-max-age",
    "max-connection-rate",
    "max-connections-per-ip",
    "max-rooms-per-connection",
    "idle-timeout",
    "ws-keep-alive",
}

# Options whose default follows from others (their INTEGERS default is the rule, for --help).
_DERIVED: dict[str, Any] = {
    "max-connection-rate": lambda o: 2 * o["max-message-rate"],
    "connection-burst": lambda o: 2 * o["message-burst"],
    "signalr-max-post": lambda o: 16 * o["read-buffer-size"],
    "write-buffer-size": lambda o: max(1 << 20, validate.history_bytes(o["history-limit"], o["max-message-length"])),
    "grpc-stream-queue": lambda o: max(1000, 2 * o["history-limit"]),
}

# option -> (environment variable, default, help); free text.
STRINGS: dict[str, tuple[str, str, str]] = {
    "web-ws-url": (
        "WEB_WS_URL",
        "",
        "where the browser client connects for WebSocket, behind a reverse proxy: a path on the page's "
        "own origin (/ws) or a ws(s):// URL; empty derives it from the page's host and --ws",
    ),
    "web-signalr-url": (
        "WEB_SIGNALR_URL",
        "",
        "the same for SignalR: a path (/signalr) or an http(s):// URL; empty derives it from --signalr",
    ),
    "allowed-origins": (
        "ALLOWED_ORIGINS",
        "",
        "comma-separated browser origins allowed to connect, or *; "
        "empty allows pages from the same host on any port",
    ),
    "manhole": (
        "MANHOLE",
        "",
        "endpoint of the SSH console into the live process (a bare port binds loopback only); off when empty",
    ),
    "manhole-keys": ("MANHOLE_KEYS", "", "authorized_keys file of the public keys allowed into the manhole"),
    "manhole-host-key": (
        "MANHOLE_HOST_KEY",
        "",
        "the manhole's SSH host key, created if missing (default $STATE_DIRECTORY/manhole_host_key)",
    ),
    "data-dir": (
        "DATA_DIR",
        "./data",
        "directory of the history file (chatd.sqlite3), created if missing; "
        "empty keeps history in memory only (lost on restart)",
    ),
    "redis": (
        "REDIS_URL",
        "",
        "redis://host:port/db (rediss:// for TLS): keep history, order and presence in Redis, "
        "shared by every chatd process using it; empty uses --data-dir",
    ),
    "redis-ca": (
        "REDIS_CA",
        "",
        "PEM file of the CA that signed the Redis server's certificate (rediss://); empty trusts the system's CAs",
    ),
    "grpc": ("GRPC_PORT", "[::]:50051", "gRPC listener as host:port (not an endpoint); a bare number means [::]:N"),
    "grpc-server": ("GRPC_SERVER", "aio", "gRPC server: aio (one asyncio loop) or threaded (a worker thread per call)"),
    "grpc-tls-cert": ("GRPC_TLS_CERT", "", "PEM certificate chain for gRPC over TLS (with --grpc-tls-key)"),
    "grpc-tls-key": ("GRPC_TLS_KEY", "", "PEM private key for gRPC over TLS"),
    **{name: (env, "", text) for name, (env, text) in auth.OPTIONS.items()},
}


def _doc(env: str, default: Any, text: str) -> str:
    return f"{text} [env {env}; default {default or 'none'}]"


class Options(usage.Options):
    """Options of ``twistd chatd``; see ``twistd chatd --help``."""

    synopsis = "[options]"
    longdesc = (
        "Run the chatd chat daemon. Listeners are Twisted endpoint strings "
        "(tcp:8080, ssl:8443:privateKey=key.pem:certKey=cert.pem, unix:/run/chatd.sock, "
        "systemd:domain=INET:index=0); a bare number means tcp:N. Each option falls back "
        "to its environment variable; a flag wins over the environment."
    )
    optParameters = (
        [[name, None, None, _doc(*spec)] for name, spec in LISTENERS.items()]
        + [[name, None, None, _doc(*spec)] for name, spec in INTEGERS.items()]
        + [[name, None, None, _doc(*spec)] for name, spec in STRINGS.items()]
    )

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        super().__init__()
        self.environ = os.environ if environ is None else environ

    def parseOptions(self, options: list[str] | None = None) -> None:
        """Parse; under twistd a bad value stops the start with one line (see :mod:`chatd.startup`).

        twistd prints its whole help text before a ``UsageError``'s line,
        burying it; as a subcommand (``parent`` set) the error becomes a
        :class:`~chatd.startup.StartupError` instead. ``--help`` is unchanged.
        """
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if self.parent is None:
                raise
            raise StartupError(str(e)) from None

    def _value(self, name: str, env: str, default: Any) -> Any:
        if self[name] is not None:
            return self[name]
        return self.environ.get(env, default)

    def postOptions(self) -> None:
        for name, (env, default, _) in LISTENERS.items():
            self[name] = endpoint_description(name, self._value(name, env, default))
        derived = []
        for name, (env, default, _) in INTEGERS.items():
            raw = self._value(name, env, default)
            if name in _DERIVED and raw == default:
                derived.append(name)
                continue
            try:
                value = int(raw)
            except (TypeError, ValueError):
                raise usage.UsageError(f"--{name} must be a whole number, not {raw!r}") from None
            least = 0 if name in _ZERO_MEANS_OFF else 1
            if value < least:
                raise usage.UsageError(f"--{name} must be at least {least}, not {value}")
            self[name] = value
        for name in derived:
            self[name] = _DERIVED[name](self)
        if self["signalr-max-post"] < self["read-buffer-size"]:
            raise usage.UsageError(
                "--signalr-max-post must be at least --read-buffer-size: a POST must hold the largest record"
            )
        self["auth-secret-given"] = self["auth-secret"] is not None
        for name, (env, default, _) in STRINGS.items():
            self[name] = str(self._value(name, env, default))
        if self["redis"]:
            from chatd.redis import parse_url

            parse_url(self["redis"])
        if self["redis-ca"]:
            if not os.path.isfile(self["redis-ca"]):
                raise usage.UsageError(f"--redis-ca: no such file {self['redis-ca']!r}")
            check_pem("redis-ca", self["redis-ca"], "certificate")
        data_dir = self["data-dir"]
        if data_dir and os.path.exists(data_dir) and not os.path.isdir(data_dir):
            raise usage.UsageError(f"--data-dir: {data_dir!r} is not a directory")
        self["worker-index"] = workers.worker_index(self.environ)
        if self["worker-index"]:
            self["manhole"] = ""  # one console, in worker 0: the others would fight for its port
        workers.check_options(self, list(LISTENERS))
        check_options(self)
        auth.check_options(self)
        webclient.check_options(self)
        grpc_service.check_options(self)


def endpoint_description(name: str, value: str) -> str:
    """Normalise and check a listener: a bare port number becomes ``tcp:N``."""
    value = str(value).strip()
    if value.isdigit():
        value = f"tcp:{value}"
    check_endpoint_tls(name, value)
    try:
        # Parsing does not listen; a throwaway reactor of None is enough to
        # catch unknown endpoint types and malformed arguments at start.
        endpoints.serverFromString(None, value)
    except Exception as e:
        raise usage.UsageError(f"--{name}: bad endpoint {value!r}: {e}") from None
    return value


class Listener(StreamServerEndpointService):
    """An endpoint listener that fails loudly and tells when it is listening.

    A listener that cannot bind stops the start (twistd exits non-zero)
    instead of logging and running deaf. ``whenListening()`` lets tests and
    the readiness notification wait until the socket is bound (``tcp:0``
    picks a free port).
    """

    def __init__(self, endpoint: Any, factory: Any) -> None:
        super().__init__(endpoint, factory)
        self._raiseSynchronously = True
        self.port: Any = None
        self._waiters: list[defer.Deferred] = []

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except Exception as e:
            # A port in use is the operator's to fix: one line, not a traceback.
            raise listen_error(self.name, e) from None
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port: Any) -> Any:
        self.port = port
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if port is None:
                d.errback(RuntimeError(f"listener {self.name} failed to start"))
            else:
                d.callback(port)
        return port

    def whenListening(self) -> defer.Deferred:
        """A Deferred firing with the listening port (``IListeningPort``)."""
        if self.port is not None:
            return defer.succeed(self.port)
        d: defer.Deferred = defer.Deferred()
        self._waiters.append(d)
        return d


def worker_argv(options: Options) -> list[str]:
    """The options of a ``--workers`` worker: every resolved value, spelled out, except ``--workers``.

    Secrets (``chatd.auth.SECRET_OPTIONS``) are not: a command line is
    readable by every local user; they go in the worker's environment.
    """
    argv: list[str] = []
    for name in (*LISTENERS, *INTEGERS, *STRINGS):
        if name == "workers" or name in auth.SECRET_OPTIONS:
            continue
        argv += [f"--{name}", str(options[name])]
    return argv


def _origins(options: Options) -> OriginPolicy:
    return OriginPolicy(o for o in options["allowed-origins"].split(","))


def ws_site(hub: Hub, factory: websocket.ChatWebSocketFactory, metrics_token: str = "") -> Site:
    """The WebSocket listener's site: ``/ws``, ``/health``, ``/stats``, ``/metrics`` and ``/``."""
    root = Resource()
    root.putChild(b"", InfoPage(hub))
    root.putChild(b"ws", websocket.resource(factory))
    root.putChild(b"health", JsonResource(lambda: health(hub, "websocket")))
    root.putChild(b"stats", JsonResource(lambda: (200, hub.stats())))
    root.putChild(b"metrics", metrics_resource(hub, metrics_token))
    site = Site(root)
    site.requestFactory = BoundedRequest  # no body of any size spooled to disk (twisted.web's default)
    site.noisy = False
    return websocket.serve_upgrades(site, factory)


def _timed(site: Site, options: Options, hub: Hub | None = None, protocol: str = "none") -> Site:
    """Give ``site`` ``--handshake-timeout``: how long a connection may take to send a whole HTTP request.

    twisted.web's own default is 12 hours, and its timer is an idle one that
    every byte resets, so a client trickling half a request held its socket
    for ever. :func:`chatd.http.with_deadline` bounds each request from the
    moment the server waits for it; the idle timer stays as well. The clock
    stops while a request is being answered (a long poll, an event stream, a
    WebSocket after its upgrade).
    """
    site.timeOut = options["handshake-timeout"]
    expired = (lambda: hub.metrics.limited("handshake_timeout", protocol)) if hub is not None else None
    return with_deadline(site, options["handshake-timeout"], expired)


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """Build the service tree: the hub first (it starts first, stops last), then listeners."""
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    top = ServiceTree()
    top.setName("chatd")
    if options["workers"] > 1 and options["worker-index"] is None:
        pool = workers.WorkerPool(reactor, options, list(LISTENERS), worker_argv(options))
        pool.environment = auth.secret_environment(options)
        pool.setServiceParent(top)
        return top
    adopted = workers.adopted_endpoints(reactor, options.environ)
    in_pool = options["worker-index"] is not None
    if in_pool:
        workers.follow_supervisor(options.environ)

    def endpoint(name: str) -> Any:
        return adopted.get(name) or endpoints.serverFromString(reactor, workers.with_backlog(options[name]))

    def serves(name: str) -> bool:
        """A worker serves the listeners the supervisor handed it (SignalR: the first only)."""
        return not in_pool or name in adopted

    limits = Limits(
        max_message_length=options["max-message-length"],
        history_limit=options["history-limit"],
        message_rate=options["max-message-rate"],
        message_burst=options["message-burst"],
        connection_rate=options["max-connection-rate"],
        connection_burst=options["connection-burst"],
        rooms_per_connection=options["max-rooms-per-connection"],
    )
    GcTuning(reactor).setServiceParent(top)
    EventDispatch(reactor).setServiceParent(top)
    if options["redis"]:
        from chatd.redis import RedisBackplane

        backplane = RedisBackplane(
            reactor,
            options["redis"],
            options["history-limit"],
            float(options["history-max-age"]),
            ca=options["redis-ca"] or None,
            budget=options["history-memory"],
        )
        hub = Hub(
            reactor,
            limits=limits,
            max_connections=options["max-connections"],
            store=backplane,
            auth=auth.from_options(options, reactor),
            max_connections_per_ip=options["max-connections-per-ip"],
        )
        backplane.attach(hub)
    else:
        hub = Hub(
            reactor,
            limits=limits,
            max_connections=options["max-connections"],
            store=store.from_options(reactor, options),
            auth=auth.from_options(options, reactor),
            max_connections_per_ip=options["max-connections-per-ip"],
        )
    hub.setServiceParent(top)

    origins = _origins(options)
    ws_factory = websocket.ChatWebSocketFactory(
        hub,
        origins,
        read_limit=options["read-buffer-size"],
        write_limit=options["write-buffer-size"],
        idle_timeout=options["idle-timeout"],
        handshake_timeout=options["handshake-timeout"],
        keep_alive=options["ws-keep-alive"],
    )
    ws_factory.closes.setServiceParent(top)  # after the hub: stops once the listeners and the drain have
    ws = Listener(endpoint("ws"), _timed(ws_site(hub, ws_factory, options["metrics-token"]), options, hub, "websocket"))
    ws.setName("ws")
    ws.setServiceParent(top)

    signalr_site = signalr.site(
        hub, reactor, origins, read_limit=options["read-buffer-size"],
        options=signalr.Options(
            write_limit=options["write-buffer-size"],
            keep_alive=options["signalr-keep-alive"],
            client_timeout=options["signalr-client-timeout"],
            handshake_timeout=options["signalr-handshake-timeout"],
        ),
        max_post=options["signalr-max-post"],
        handshake_timeout=options["handshake-timeout"],
    )
    _timed(signalr_site, options, hub, "signalr")
    if serves("signalr"):
        sr = Listener(endpoint("signalr"), signalr_site)
        sr.setName("signalr")
        sr.setServiceParent(top)

    web = Listener(
        endpoint("web"), _timed(webclient.web_site(hub, webclient.ListenerMap(top, options.get)), options, hub, "web")
    )
    web.setName("web")
    web.setServiceParent(top)
    grpc_service.from_options(hub, options, reactor).setServiceParent(top)
    add_operations(top, hub, options, reactor)  # keep last: see chatd.ops
    return top
