"""The gRPC server as a Twisted service, and its command-line options.

grpcio's server is not a Twisted endpoint: it takes ``host:port`` and runs
its own threads. :class:`GrpcService` binds it in ``privilegedStartService``
(so ports below 1024 and root-only key files work under ``twistd``), starts
it with the tree, and stops it on shutdown without blocking the reactor.
"""

from __future__ import annotations

import os
import queue
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from twisted.application.service import Service
from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from chatd.grpc.bridge import PROTOCOL, SERVICE_NAME, ChatServicer, GrpcSession, TokenCheck, method_handlers
from chatd.grpc.streams import StreamLimit
from chatd.hub import Hub
from chatd.startup import StartupError, bind_error, check_key_pair

log = Logger()

DEFAULT_ADDRESS = "[::]:50051"
SHUTDOWN_REASON = "server shutting down, reconnect later"
PENDING_CALLS = 10_000  # the least of GrpcService.pending_calls
#: the metadata a call may carry, all of it taken (twisted.web's bound on an HTTP request's
#: headers). grpc's default refuses at random between 8 KiB and 16 KiB (RESOURCE_EXHAUSTED
#: "received metadata size exceeds soft limit"): a token chatd accepts (up to
#: chatd.auth.MAX_TOKEN_LENGTH, 8,192 characters) with the call's other headers passed 8 KiB,
#: and about one call in twenty failed. Soft limit = hard limit: past it, every call is refused.
MAX_METADATA_SIZE = 16_384

#: ``--grpc-server``: ``grpc.aio`` on a loop of its own (the default: a stream costs a coroutine,
#: not a thread, and a delivery 4-6x less CPU, see bench/grpc_streams.py), or grpcio's thread-per-call server
SERVERS = ("aio", "threaded")

_ENDPOINT_TYPES = {"tcp", "tcp6", "ssl", "unix", "systemd", "tls"}
_ADDRESS_RE = re.compile(r"(\[[0-9A-Fa-f:.%\w]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})")


def grpc_address(value: Any) -> str:
    """Normalise ``--grpc``: ``host:port`` or ``[v6]:port``; a bare number means ``[::]:N``."""
    text = str(value).strip()
    if text.isdigit():
        text = f"[::]:{text}"
    if text.split(":", 1)[0] in _ENDPOINT_TYPES:
        raise usage.UsageError(f"--grpc: expected host:port, not an endpoint string like {text!r}")
    match = _ADDRESS_RE.fullmatch(text)
    if match is None or int(match.group(2)) > 65535:
        raise usage.UsageError(f"--grpc: expected host:port (or a port number), not {text!r}")
    return text


def check_options(options: Any) -> None:
    """Validate the gRPC options once parsed (raises a one-line ``UsageError``)."""
    options["grpc"] = grpc_address(options["grpc"])
    cert, key = options["grpc-tls-cert"], options["grpc-tls-key"]
    if bool(cert) != bool(key):
        raise usage.UsageError("--grpc-tls-cert and --grpc-tls-key go together: give both or neither")
    for name, path in (("grpc-tls-cert", cert), ("grpc-tls-key", key)):
        if path and not os.path.isfile(path):
            raise usage.UsageError(f"--{name}: no such file {path!r}")
    if cert:
        # grpcio only says "Failed to bind" for a bad certificate: check it here, in words.
        check_key_pair("grpc-tls-cert", cert, "grpc-tls-key", key)
    if options.get("grpc-server", "aio") not in SERVERS:
        raise usage.UsageError(f"--grpc-server: expected one of {', '.join(SERVERS)}, not {options['grpc-server']!r}")
    if options.get("grpc-server", "aio") == "threaded" and options["grpc-max-streams"] >= options["grpc-workers"]:
        raise usage.UsageError(
            "--grpc-max-streams must be less than --grpc-workers: each stream holds a worker "
            "and unary calls need some left"
        )


def from_options(hub: Hub, options: Any, reactor: Any) -> GrpcService:
    """The gRPC service as ``twistd chatd``'s options describe it."""
    kind = options.get("grpc-server", "aio")
    if kind == "aio":
        from chatd.grpc.aio import AioGrpcService

        cls: type[GrpcService] = AioGrpcService
    else:
        cls = GrpcService
    return cls(
        hub,
        reactor,
        options["grpc"],
        workers=options["grpc-workers"],
        # --workers: every worker serves the same port (the supervisor checked it is free).
        reuse_port=options.get("worker-index") is not None,
        max_streams=options["grpc-max-streams"],
        queue_size=options["grpc-stream-queue"],
        max_message_size=options["read-buffer-size"],
        tls_cert=options["grpc-tls-cert"] or None,
        tls_key=options["grpc-tls-key"] or None,
        max_connections=options["max-connections"],
        handshake_timeout=options["handshake-timeout"],
    )


class _OneThread:
    """Runs calls in order on one daemon thread of its own, for work that may block.

    grpcio's health servicer takes a lock in every change, and its
    callback-style ``Watch`` (no longer used, see ``_new_health``) sent each
    change from inside it, waiting until a client that did not read took it.
    So health changes never run on the reactor; one thread keeps them in order.
    A daemon thread cannot hold up the process's exit. Each call's outcome
    comes back to the reactor as a Deferred.
    """

    def __init__(self, reactor: Any, name: str) -> None:
        self._reactor = reactor
        self._name = name
        self._calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple, defer.Deferred] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def run(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        """Queue ``f(*args)``; the Deferred fires on the reactor once it has run."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
            self._thread.start()
        d: defer.Deferred = defer.Deferred()
        self._calls.put((f, args, d))
        return d

    def close(self) -> None:
        """Let the thread end once the calls queued so far have run."""
        if self._thread is not None:
            self._calls.put(None)
            self._thread = None

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            f, args, d = call
            try:
                result = f(*args)
            except BaseException:
                self._reactor.callFromThread(d.errback, Failure())
            else:
                self._reactor.callFromThread(d.callback, result)


def _log_failure(failure: Failure, what: str) -> None:
    log.failure("gRPC {what} failed", failure, what=what)


class GrpcService(Service):
    """Runs ``chat.ChatService``, health and reflection on one grpcio server.

    ``whenListening()`` fires with the bound port number (``host:0`` picks a
    free one). Health says SERVING while this service runs and NOT_SERVING
    from the moment shutdown starts; streams then end with ``UNAVAILABLE``.
    """

    name = "grpc"
    kind = "threaded"
    health_interval = 0.5  # how often health follows the hub (the hub has no change callbacks)
    #: the shortest gap between a client's keep-alive pings the server takes, with or without a
    #: call open. grpc's default (5 minutes while no data flows) ends a quiet stream of a client
    #: that pings every 10-30 s, as chat clients behind NATs and load balancers do, with
    #: GOAWAY "too_many_pings" at the third ping; faster than this, that still happens.
    min_ping_interval_ms = 10_000
    #: a connection with no call open this long is sent GOAWAY (grpc's default: never). A client
    #: connects again on its next call; an address holding connections it does not use lets go.
    idle_connection_ms = 300_000

    def __init__(
        self,
        hub: Hub,
        reactor: Any,
        address: str = DEFAULT_ADDRESS,
        *,
        workers: int = 1100,
        max_streams: int = 1000,
        queue_size: int = 1000,
        max_message_size: int = 65536,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        grace: float = 5.0,
        reuse_port: bool = False,
        max_connections: int = 0,
        handshake_timeout: float = 15.0,
    ) -> None:
        self.hub = hub
        self.reactor = reactor
        self.address = address
        self.workers = workers
        self.max_message_size = max_message_size
        self.tls = (tls_cert, tls_key) if tls_cert and tls_key else None
        self.grace = grace
        self.reuse_port = reuse_port
        #: HTTP/2 connections open at once (0: no bound); grpc's default has none, and a
        #: connection that opens no call is no client of the hub, so no other limit counts it
        self.max_connections = max_connections
        #: seconds a new connection has to finish TLS and the HTTP/2 preface (grpc's default: 120)
        self.handshake_timeout = handshake_timeout
        self.servicer = self._new_servicer(queue_size)
        # Every streaming call of every service counts (hub.metrics is thread-safe).
        self.streams = self.stream_limit(
            max_streams,
            on_refused=lambda: hub.metrics.error("server_full", PROTOCOL),
            per_address=hub.addresses.limit,
        )
        self.health = self._new_health()
        #: calls grpc's core has read but the server has not yet picked up. grpc's
        #: defaults (1,000, then random bare ``CANCELLED``s up to 3,000) let grpc,
        #: not ``--grpc-max-streams``, decide a reconnect storm: a burst of every
        #: stream re-opening, each with a unary call, must reach the stream limit,
        #: which refuses with a reason. Past this, grpc still cancels (memory bound).
        self.pending_calls = max(PENDING_CALLS, 2 * max_streams)
        self.port: int | None = None
        self._server: Any = None
        self._health_loop: task.LoopingCall | None = None
        self._serving: bool | None = None
        self._health_calls = _OneThread(reactor, "grpc-health")

    # -- what differs between the threaded and the aio server (see chatd.grpc.aio) --

    stream_limit: type[StreamLimit] = StreamLimit
    token_check: type[TokenCheck] = TokenCheck

    def _new_servicer(self, queue_size: int) -> ChatServicer:
        return ChatServicer(self.hub, self.reactor, queue_size=queue_size)

    def _new_health(self) -> Any:
        """grpcio's health servicer, its ``Watch`` a blocking stream (a worker each, counted as a stream).

        The callback-style ``Watch`` (grpcio's default) sends a change to each
        watcher from inside ``set``, holding the servicer's lock until the
        message is sent: one client that opens a ``Watch`` and grants no
        flow-control window (HTTP/2 ``INITIAL_WINDOW_SIZE`` 0, health needs no
        token) held it for good, every ``Check`` then waited on the lock and
        timed out (each holding a worker), and health never changed again. A
        blocking ``Watch`` hands each change to its own worker's queue without
        waiting, so a client that does not read holds only its own worker.
        """
        return health.HealthServicer(experimental_non_blocking=False)

    def _new_server(self, interceptors: tuple[Any, ...], options: list[tuple[str, int]]) -> Any:
        return grpc.server(
            ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="grpc"),
            # Past the pool, calls would wait for a thread forever: refuse them.
            maximum_concurrent_rpcs=self.workers,
            # Streams may hold at most max_streams workers; the rest serve unary calls.
            interceptors=interceptors,
            options=options,
        )

    def _start_server(self, server: Any) -> None:
        server.start()

    # -- shared ------------------------------------------------------------------

    def _build(self) -> None:
        # A token is checked first (when required): a refused call takes no stream slot.
        interceptors: tuple[Any, ...] = (self.streams,)
        auth = getattr(self.hub, "auth", None)
        if auth is not None:
            interceptors = (self.token_check(auth, self.hub), *interceptors)
        server = self._new_server(
            interceptors,
            [
                ("grpc.max_receive_message_length", self.max_message_size),
                ("grpc.max_metadata_size", MAX_METADATA_SIZE),
                ("grpc.absolute_max_metadata_size", MAX_METADATA_SIZE),
                # Linux gRPC shares ports by default; a busy port must fail loudly.
                ("grpc.so_reuseport", int(self.reuse_port)),
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.keepalive_timeout_ms", 20_000),
                ("grpc.http2.min_ping_interval_without_data_ms", self.min_ping_interval_ms),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.max_connection_idle_ms", self.idle_connection_ms),
                ("grpc.server_handshake_timeout_ms", int(self.handshake_timeout * 1000)),
                *([("grpc.max_allowed_incoming_connections", self.max_connections)] if self.max_connections else []),
                # No random early cancels: see pending_calls.
                ("grpc.server.max_pending_requests", self.pending_calls),
                ("grpc.server.max_pending_requests_hard_limit", self.pending_calls),
            ],
        )
        handlers = method_handlers(self.servicer)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        server.add_registered_method_handlers(SERVICE_NAME, handlers)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        # Asked first: grpcio logs its own multi-line complaint on a busy port.
        # (--workers share the port through SO_REUSEPORT: the supervisor checked it.)
        why = None if self.reuse_port else bind_error(self.address)
        if why is not None:
            raise StartupError(f"--grpc: cannot listen on {self.address}: {why}")
        try:
            if self.tls:
                cert, key = (open(path, "rb").read() for path in self.tls)
                creds = grpc.ssl_server_credentials([(key, cert)])
                port = server.add_secure_port(self.address, creds)
            else:
                port = server.add_insecure_port(self.address)
        except OSError as e:
            raise StartupError(f"--grpc-tls-cert: cannot read {e.filename!r}: {e.strerror}") from None
        except RuntimeError:
            port = 0
        if not port:
            # grpcio's own message says only "Failed to bind": ask the OS why.
            why = bind_error(self.address) or "grpcio could not bind it (GRPC_VERBOSITY=debug tells more)"
            raise StartupError(f"--grpc: cannot listen on {self.address}: {why}")
        self._server = server
        self.port = port

    def privilegedStartService(self) -> None:
        self._build()
        super().privilegedStartService()

    def startService(self) -> None:
        if self._server is None:
            self._build()
        super().startService()
        assert self._server is not None
        self._start_server(self._server)
        self._health_loop = task.LoopingCall(self._follow_hub)
        self._health_loop.clock = self.reactor
        self._health_loop.start(self.health_interval, now=True)
        log.info(
            "gRPC listening on {address} (port {port}, {tls}, {kind} server)",
            address=self.address,
            port=self.port,
            tls="TLS" if self.tls else "plaintext",
            kind=self.kind,
        )

    def _follow_hub(self) -> None:
        """SERVING while the hub takes clients; NOT_SERVING from the start of a drain."""
        serving = self.hub.healthy
        if serving == self._serving:
            return
        self._serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self._set_status(status)

    def _set_status(self, status: int) -> None:
        done = self._health_calls.run(self._set_health, self.health, status)
        done.addErrback(_log_failure, "health update")

    @staticmethod
    def _set_health(servicer: health.HealthServicer, status: int) -> None:
        """On the health thread: may block while a ``Watch`` client does not read."""
        for name in ("", SERVICE_NAME):
            servicer.set(name, status)

    def whenListening(self) -> defer.Deferred:
        """A Deferred firing with the bound port number."""
        if self.port is None:
            return defer.fail(RuntimeError("the gRPC service is not started"))
        return defer.succeed(self.port)

    def stopService(self) -> defer.Deferred | None:
        super().stopService()
        server, self._server = self._server, None
        if server is None:
            return None
        if self._health_loop is not None and self._health_loop.running:
            self._health_loop.stop()
        self._enter_shutdown()
        # Should the service start again, it serves a fresh health servicer: the one
        # shut down ignores every later status, so health said NOT_SERVING for good.
        self._serving = None
        self.health = self._new_health()
        for session in list(self.hub.sessions.values()):
            if isinstance(session, GrpcSession):
                session.going_away(SHUTDOWN_REASON)
        return self._stop(server)

    def _enter_shutdown(self) -> None:
        """Health says NOT_SERVING for good."""
        # NOT_SERVING goes out on the health thread, after any update still
        # queued; the stop below does not wait for it: a stuck Watch client is
        # released when the server cancels the calls left after ``grace``.
        self._health_calls.run(self.health.enter_graceful_shutdown).addErrback(_log_failure, "health shutdown")
        self._health_calls.close()
        self._health_calls = _OneThread(self.reactor, "grpc-health")  # should the service start again

    def _stop(self, server: Any) -> defer.Deferred:
        """Stop the server; the Deferred fires once the last call is done (or ``grace`` has passed)."""
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self._stop_server, server)

    def _stop_server(self, server: grpc.Server) -> None:
        """In a pool thread: stop and wait until the last call is done (or ``grace`` has passed).

        ``Server.stop`` takes grpcio's server lock, so even it stays off the reactor.
        """
        server.stop(self.grace).wait()
