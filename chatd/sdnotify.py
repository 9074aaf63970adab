"""Tell systemd how the daemon is doing: readiness, watchdog pings, stopping.

The protocol is one datagram of ``KEY=VALUE`` lines written to the Unix
socket named by ``$NOTIFY_SOCKET`` (``@name`` is the abstract namespace), see
sd_notify(3). It is small enough to speak directly, which keeps libsystemd
and its bindings out of the dependencies; when ``$NOTIFY_SOCKET`` is unset
(not started by systemd) every call is a no-op.

:class:`SystemdNotifier` is the service that uses it: placed last in the
service tree it starts after every listener, sends ``READY=1`` once all of
them are bound, pings the watchdog from a reactor timer (so a wedged reactor
misses its pings and systemd restarts it) and, being last, is the first to
stop, sending ``STOPPING=1`` before the drain begins.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()


def _address(environ: Mapping[str, str]) -> str | None:
    path = environ.get("NOTIFY_SOCKET")
    if not path:
        return None
    if path.startswith("@"):
        return "\0" + path[1:]
    return path


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd; False when not under systemd.

    Errors are logged, never raised: a broken notification socket must not
    take the daemon down with it.
    """
    address = _address(os.environ if environ is None else environ)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as e:
        log.warn("could not notify systemd ({state}): {error}", state=state.split("=", 1)[0], error=e)
        return False
    return True


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings (half of ``WatchdogSec=``), or None if off.

    ``$WATCHDOG_PID``, when set, must be this process: a child that inherited
    the environment must not ping on its parent's behalf.
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 2e6


class SystemdNotifier(Service):
    """``READY=1`` when every sibling listener is up, watchdog pings, ``STOPPING=1``.

    Siblings are found generically: any service in the parent that has a
    ``whenListening()`` is waited for, whatever protocol it serves.
    """

    name = "sd-notify"

    def __init__(
        self,
        clock: IReactorTime,
        environ: Mapping[str, str] | None = None,
        send=notify,
    ) -> None:
        self.clock = clock
        self.environ = os.environ if environ is None else environ
        self._send = send
        self._watchdog: task.LoopingCall | None = None
        self.ready: defer.Deferred | None = None
        self._gathering: Any = None

    def _notify(self, state: str) -> bool:
        return self._send(state, self.environ)

    def startService(self) -> None:
        super().startService()
        # Look for listeners on the next reactor turn, once every sibling,
        # wherever it sits in the tree, has started.
        self._gathering = self.clock.callLater(0, self._gather)
        interval = watchdog_interval(self.environ)
        if interval is not None:
            self._watchdog = task.LoopingCall(self._notify, "WATCHDOG=1")
            self._watchdog.clock = self.clock
            self._watchdog.start(interval, now=True)

    def _gather(self) -> None:
        waits = [
            defer.maybeDeferred(svc.whenListening)
            for svc in (self.parent or [])
            if svc is not self and callable(getattr(svc, "whenListening", None))
        ]
        self.ready = defer.gatherResults(waits, consumeErrors=True)
        self.ready.addCallbacks(self._ready, self._failed)

    def _ready(self, ports: list[Any]) -> None:
        if not self.running:  # stopped before every listener came up
            return
        log.info("all {n} listeners are up", n=len(ports))
        self._notify(f"READY=1\nSTATUS=serving on {len(ports)} listeners\nMAINPID={os.getpid()}")

    def _failed(self, failure) -> None:
        # The failing listener already stopped the start; say why in `systemctl status`.
        self._notify("STATUS=a listener failed to start")
        log.failure("a listener failed to start", failure)

    def stopService(self):
        if self._gathering is not None and self._gathering.active():
            self._gathering.cancel()
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self._notify("STOPPING=1\nSTATUS=draining")
        return super().stopService()
