"""The operational services every chatd runs besides its listeners.

Kept apart from ``chatd.tap`` so the tap only says *that* they exist:
:func:`add_operations` is called last in ``makeService`` and appends, in
order, the manhole (if configured), the :class:`~chatd.drain.Drain` and the
:class:`~chatd.sdnotify.SystemdNotifier`. A ``MultiService`` stops its
children in reverse, so at shutdown systemd hears ``STOPPING=1`` first, then
the drain runs while every listener still answers ``/health`` with 503,
then the listeners close and the hub stops last.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet import endpoints
from twisted.web.resource import Resource

from chatd.drain import Drain
from chatd.metrics import MetricsResource
from chatd.sdnotify import SystemdNotifier


def check_options(options: Any) -> None:
    """Called from ``Options.postOptions``: refuse unsafe or incomplete settings."""
    if options["manhole"]:
        # Imported only when used: SSH support is not loaded by a daemon without a console.
        from chatd import manhole

        manhole.check_options(options, options.environ)


def metrics_resource(hub: Any) -> Resource:
    """``/metrics``: the hub's own Prometheus registry in text format."""
    return MetricsResource(hub.metrics.registry)


def add_operations(top: MultiService, hub: Any, options: Any, reactor: Any) -> None:
    """Append the manhole, the drain and the systemd notifier to ``top`` (keep this call last)."""
    if options["manhole"]:
        from chatd import manhole
        from chatd.tap import Listener

        factory = manhole.ssh_factory(
            manhole.namespace(hub, top, reactor), options["manhole-keys"], options["manhole-host-key"]
        )
        console = Listener(endpoints.serverFromString(reactor, options["manhole"]), factory)
        console.setName("manhole")
        console.setServiceParent(top)

    drain = Drain(hub, reactor, timeout=options["drain-timeout"], reactor=reactor)
    drain.setServiceParent(top)
    SystemdNotifier(reactor).setServiceParent(top)
