"""The operational services every chatd runs besides its listeners.

Kept apart from ``chatd.tap`` so the tap only says *that* they exist:
:func:`add_operations` is called last in ``makeService`` and appends, in
order, the manhole (if configured), the :class:`~chatd.drain.Drain` and the
:class:`~chatd.sdnotify.SystemdNotifier`. The tree's top is a
:class:`ServiceTree`, which stops its children in reverse, one after the
other: at shutdown systemd hears ``STOPPING=1`` first, then the drain runs
while every listener still answers ``/health`` with 503, then the listeners
close and the hub stops last.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import defer, endpoints
from twisted.logger import Logger
from twisted.web.resource import Resource

from chatd.auth import check_metrics_token
from chatd.drain import Drain
from chatd.logs import redact_access_logs
from chatd.metrics import MetricsResource
from chatd.sdnotify import SystemdNotifier

log = Logger()


class ServiceTree(MultiService):
    """The top of chatd's service tree: children stop one at a time, last first.

    A plain ``MultiService`` stops every child at once, so the listeners
    would close (and ``/health`` vanish) while the drain was still telling
    clients to go, and the hub would flush while sessions were still
    writing. Here each child's stop completes before the previous one
    begins: notifier, drain, manhole, listeners, then the hub. At start it
    gives every web site in the tree an access log without query strings
    (:func:`chatd.logs.redact_access_logs`).
    """

    def startService(self) -> None:
        redact_access_logs(self)
        super().startService()

    def stopService(self) -> defer.Deferred:
        Service.stopService(self)
        return defer.Deferred.fromCoroutine(self._stop_in_order())

    async def _stop_in_order(self) -> None:
        for svc in reversed(list(self)):
            try:
                await defer.maybeDeferred(svc.stopService)
            except Exception:
                log.failure("stopping {name} failed", name=svc.name)


def check_options(options: Any) -> None:
    """Called from ``Options.postOptions``: refuse unsafe or incomplete settings."""
    if options["manhole"]:
        # Imported only when used: SSH support is not loaded by a daemon without a console.
        from chatd import manhole

        manhole.check_options(options, options.environ)


def metrics_resource(hub: Any, token: str = "") -> Resource:
    """``/metrics``: the hub's own Prometheus registry in text format, rendered on the reactor thread.

    With ``token`` (``--metrics-token``) a scrape must carry ``Authorization:
    Bearer <token>``, or it gets 401: the figures (room and user counts,
    error rates) are for the operator, while ``/health`` stays open for
    load balancers.
    """
    resource = MetricsResource(hub.metrics.registry)
    return _TokenRequired(resource, token) if token else resource


class _TokenRequired(Resource):
    """A leaf resource that answers 401 unless the request has the bearer token."""

    isLeaf = True

    def __init__(self, inner: Resource, token: str) -> None:
        super().__init__()
        self._inner = inner
        self._token = token

    def render(self, request: Any) -> bytes:
        if not check_metrics_token(self._token, request.getHeader(b"authorization")):
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Bearer realm="metrics"')
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"a bearer token is required (--metrics-token)\n"
        return self._inner.render(request)


#: seconds over which a process without --redis tells its clients to go (see chatd.drain)
SOLO_SPREAD = 1.0


def inherited_listeners(top: MultiService, options: Any) -> list[Any]:
    """The listeners on sockets systemd passed in (``systemd:`` endpoints).

    systemd keeps such a socket open across a restart, so connections that
    arrive while this process drains can wait in its queue for the next one
    (see :class:`chatd.drain.Drain`). A socket this process bound itself, or
    one a ``--workers`` supervisor handed it, closes with its owner: those
    keep answering (and refusing) until the end.
    """
    from chatd.tap import Listener

    return [
        service
        for service in top
        if isinstance(service, Listener) and str(options.get(service.name) or "").startswith("systemd:")
    ]


def add_operations(top: MultiService, hub: Any, options: Any, reactor: Any) -> None:
    """Append the manhole, the drain and the systemd notifier to ``top`` (keep this call last)."""
    if options["manhole"]:
        from chatd import manhole
        from chatd.tap import Listener

        factory = manhole.ssh_factory(
            manhole.namespace(hub, top, reactor), options["manhole-keys"], options["manhole-host-key"]
        )
        from chatd.workers import with_backlog

        console = Listener(endpoints.serverFromString(reactor, with_backlog(options["manhole"])), factory)
        console.setName("manhole")
        console.setServiceParent(top)

    drain = Drain(
        hub,
        reactor,
        timeout=options["drain-timeout"],
        # Alone (no Redis), nothing else takes the clients while this process
        # drains: spreading the goodbyes only keeps them refused for longer.
        spread=None if options.get("redis") else SOLO_SPREAD,
        reactor=reactor,
        held=inherited_listeners(top, options),
        worker=options.get("worker-index") is not None,
        # twistd builds the service before its reactor runs; a test builds it in a running one
        owns_process=not getattr(reactor, "running", True),
    )
    drain.setServiceParent(top)
    SystemdNotifier(reactor).setServiceParent(top)
