"""The epoll reactor's event loop without its legacy log context per event.

For every ready socket, Twisted's ``EPollReactor.doPoll`` calls
``log.callWithLogger(selectable, ...)``: it asks the selectable for its
log prefix, builds a context dict, pushes it on the thread's legacy log
context stack, calls the handler, and pops it. All of that serves one
thing: a line logged with the *legacy* API (``twisted.python.log.msg``/
``err``) while the handler runs is tagged with the connection's prefix
(``[ChatServerProtocol,12,127.0.0.1]``). chatd, Autobahn and twisted.web
log through ``twisted.logger`` (tagged by namespace, not by that context),
so on a chat server the wrapper is paid for on every read and write event
and read by nothing: about 4 % of the reactor thread's samples in a
reconnect storm (W5), 2-3 % under W2 (py-spy).

:class:`EventDispatch` (a service, like :class:`chatd.gctune.GcTuning`)
gives the running ``EPollReactor`` a ``doIteration`` that polls the same
way and hands each event straight to the reactor's own
``_doReadOrWrite``, which already catches and logs what a handler raises
and disconnects that selectable. What ``callWithLogger`` did besides is
kept: anything that escapes ``_doReadOrWrite`` (a ``connectionLost`` that
raised) is logged with the selectable's prefix and the loop goes on. The
one difference: a handler's exception that ``_doReadOrWrite`` logs itself
("Unhandled Error") is tagged ``[-]`` instead of with the prefix.

Any other reactor (select, poll, asyncio, a test's fake) is left alone.
"""

from __future__ import annotations

import errno
from types import MethodType
from typing import Any

from twisted.application.service import Service
from twisted.python import log

__all__ = ["EventDispatch"]


def _do_poll(reactor: Any, timeout: float | None) -> None:
    """``EPollReactor.doPoll`` less ``callWithLogger`` (see the module docstring)."""
    if timeout is None:
        timeout = -1  # wait until something happens
    selectables = reactor._selectables
    try:
        events = reactor._poller.poll(timeout, len(selectables))
    except OSError as e:
        if e.errno == errno.EINTR:
            return
        raise
    handle = reactor._doReadOrWrite
    for fd, event in events:
        selectable = selectables.get(fd)
        if selectable is None:
            continue
        try:
            handle(selectable, fd, event)
        except KeyboardInterrupt:
            raise
        except BaseException:
            try:
                prefix = selectable.logPrefix()
            except BaseException:
                prefix = "(buggy logPrefix method)"
            log.err(system=prefix)


class EventDispatch(Service):
    """Install :func:`_do_poll` on an ``EPollReactor`` at start; put the original back at stop."""

    name = "event-dispatch"

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.installed = False

    def startService(self) -> None:
        super().startService()
        from twisted.internet.epollreactor import EPollReactor

        reactor = self.reactor
        # Only a real epoll reactor, and only if nobody changed its loop already.
        if isinstance(reactor, EPollReactor) and "doIteration" not in vars(reactor):
            reactor.doIteration = MethodType(_do_poll, reactor)
            self.installed = True

    def stopService(self):  # type: ignore[no-untyped-def]
        if self.installed:
            vars(self.reactor).pop("doIteration", None)
            self.installed = False
        return super().stopService()
