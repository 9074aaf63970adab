"""Graceful shutdown: stop taking clients, tell them to go, let them leave in waves.

:class:`Drain` sits in the service tree after the listeners, so it is among
the first services to stop (a ``MultiService`` stops its children in reverse
order). Its ``stopService``:

1. marks the hub as no longer accepting: ``/health`` answers 503 from now
   on, while the listeners are still up so load balancers can see it, and
   new connections are refused (WebSocket close 1013). Listeners whose
   socket outlives the process (socket activation: systemd holds it across
   a restart) stop taking connections instead: the kernel queues them on
   that socket for the next process, so a client that reconnects during a
   restart waits for it rather than being refused, and its backoff does not
   grow;
2. tells every session, whatever its protocol, that the server is going
   away (``Session.going_away``: WebSocket close 1001, SignalR close with
   reconnect allowed, gRPC ``UNAVAILABLE``), in batches spread over a
   jittered window so thousands of clients do not reconnect at one instant.
   A session with a message still waiting for the store (``in_flight``) is
   told once the store has answered it, so its sender gets ``sent`` (or
   the error) before the close: otherwise a message stored during the
   drain was never acknowledged to the client that sent it. Meanwhile it
   may send nothing more (``Session.leaving``: refused as "server shutting
   down"), or a client sending faster than the store answers would never
   be told;
3. waits for those sessions to finish their close handshakes (their pending
   writes flush first), but never longer than the drain timeout;
4. lets the rest of the tree stop: listeners close, the hub flushes.

A second SIGTERM or SIGINT during a shutdown ends the drain at once (the
sessions left are dropped) and is logged as such, even if it comes before
the drain has started (:func:`take_over_signals`); Twisted's own handler
would have called ``reactor.stop()`` again, which logs a
``ReactorNotRunning`` traceback at critical level. A worker of
``--workers`` takes more SIGTERMs as "already stopping": systemd's default
kill mode, or a terminal's Ctrl-C, reaches the supervisor and every worker
at once, and the supervisor then passes its own SIGTERM on. It ends its
drain on :data:`HURRY`, which the supervisor sends on a second signal of
its own (``chatd.workers``).

Time comes from the injected clock, so all of this is unit-tested with
``task.Clock``.
"""

from __future__ import annotations

import random
import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()

GOING_AWAY = "server shutting down, reconnect shortly"
#: what a supervisor sends its workers to end their drains at once
HURRY = signal.SIGUSR2


def take_over_signals(again: Callable[[int], None], extra: Sequence[int] = ()) -> bool:
    """This process's SIGTERM and SIGINT from now on: the first is Twisted's (``reactor.stop()``), the rest ``again``'s.

    Twisted's handler runs for every signal, and a second ``reactor.stop()``
    logs ``ReactorNotRunning`` at critical level; two SIGTERMs can come
    almost together (systemd's and a supervisor's), before any service has
    heard of the first. The ``extra`` signals always go to ``again``. Only
    where Twisted handles both (``False``: nothing was changed); main thread only.
    """
    twisted = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    if not all(callable(handler) for handler in twisted.values()):
        return False
    first: list[int] = []

    def handler(number: int, frame: Any) -> None:
        if number in twisted and not first:
            first.append(number)
            twisted[number](number, frame)  # type: ignore[operator]
            return
        again(number)

    for number in (*twisted, *extra):
        signal.signal(number, handler)
    return True


class Drain(Service):
    """Drain the hub's sessions on stop, within ``timeout`` seconds."""

    name = "drain"
    poll_interval = 0.05

    def __init__(
        self,
        hub: Any,
        clock: IReactorTime,
        timeout: float = 10.0,
        batch_size: int = 200,
        spread: float | None = None,
        rng: Callable[[], float] = random.random,
        reactor: Any = None,
        held: Sequence[Any] = (),
        worker: bool = False,
        owns_process: bool = False,
    ) -> None:
        self.hub = hub
        #: a worker of a supervisor: only :data:`HURRY` ends the drain early (see the module docstring)
        self.worker = worker
        #: the process is this chatd's (twistd's), not a test's: its signals are the drain's to handle
        self.owns_process = owns_process
        #: why the drain is to end as soon as it starts (a hurry that came before it)
        self._hurry: str | None = None
        #: listeners (``chatd.tap.Listener``) whose socket the next process inherits
        self.held = list(held)
        self.clock = clock
        self.timeout = timeout
        self.batch_size = max(1, batch_size)
        # Closes are spread over at most half the timeout, so the second
        # half is left for close handshakes and flushing.
        self.spread = timeout / 2 if spread is None else min(spread, timeout)
        self._rng = rng
        self._reactor = reactor
        self.draining = False
        self._calls: list[Any] = []
        self._poll: Any = None
        self._deadline: Any = None
        self._done: defer.Deferred | None = None
        #: sessions whose batch has come but which wait for the store's answer to a message
        self._answering: list[Any] = []

    def startService(self) -> None:
        super().startService()
        if self.owns_process:  # once the reactor runs: it installs Twisted's handlers as it starts
            self._reactor.callWhenRunning(self._take_over_signals)

    def _take_over_signals(self) -> None:
        if threading.current_thread() is threading.main_thread():
            take_over_signals(self._again, (HURRY,) if self.worker else ())

    def _again(self, number: int) -> None:
        """A signal after the first (or the supervisor's hurry): end the drain, now or as soon as it starts."""
        name = signal.Signals(number).name
        if self.worker and number != HURRY or self.draining and self._done is None:
            log.info("{signal} again: already stopping", signal=name)
            return
        why = f"{name} from the supervisor" if self.worker else f"{name} again"
        if self._done is None:  # not draining yet: the reactor has yet to stop the services
            self._hurry = why
            return
        log.info("{why}: ending the drain now", why=why)
        self._reactor.callFromThread(self._finish, True, f"drain ended by {why}")

    def schedule(self, count: int) -> list[float]:
        """When each of ``count`` batches is told to go, in seconds from now.

        Batch ``i`` goes at a random moment inside its own slice of the
        spread window: evenly paced overall, never synchronised.
        """
        if count <= 0:
            return []
        if count == 1:
            return [0.0]
        width = self.spread / count
        return [i * width + self._rng() * width for i in range(count)]

    def stopService(self) -> defer.Deferred:
        super().stopService()
        self.draining = True
        self.hub.accepting = False
        self.hub.closing = True
        self._hold()
        sessions = list(self.hub.sessions.values())
        batches = [sessions[i : i + self.batch_size] for i in range(0, len(sessions), self.batch_size)]
        log.info(
            "draining {n} sessions in {b} batches (timeout {t}s)",
            n=len(sessions),
            b=len(batches),
            t=self.timeout,
        )
        self._done = done = defer.Deferred()
        self._calls = [
            self.clock.callLater(delay, self._go, batch)
            for delay, batch in zip(self.schedule(len(batches)), batches)
        ]
        self._deadline = self.clock.callLater(self.timeout, self._finish, True)
        self._check()
        if self._hurry is not None:
            log.info("{why}: ending the drain now", why=self._hurry)
            self._finish(True, f"drain ended by {self._hurry}")
        return done

    def _hold(self) -> None:
        """Leave new connections in the inherited sockets' queues, for the next process."""
        names = []
        for listener in self.held:
            port = getattr(listener, "port", None)
            if port is not None:
                port.stopReading()
                names.append(listener.name)
        if names:
            log.info(
                "not accepting on {names}: new connections wait in the inherited sockets for the next process",
                names=", ".join(names),
            )

    def _go(self, batch: list[Any]) -> None:
        self._tell(batch)
        self._check()

    def _tell(self, batch: list[Any]) -> None:
        for session in batch:
            if session.id not in self.hub.sessions:
                continue
            if session.in_flight:
                session.leaving = True  # what it sent is answered; nothing new is taken (Hub.publish)
                self._answering.append(session)
                continue
            try:
                session.going_away(GOING_AWAY)
            except Exception:
                log.failure("telling {session} to go away failed", session=session)

    def _check(self) -> None:
        """Finish once every session is gone; otherwise look again shortly.

        Polling on the clock keeps the drain independent of how each
        protocol reports its close (the hub has no disconnect callbacks).
        """
        if self._done is None:
            return
        if self._answering:
            waiting, self._answering = self._answering, []
            self._tell(waiting)
        if not self.hub.sessions:
            self._finish(False)
        elif self._poll is None or not self._poll.active():
            self._poll = self.clock.callLater(self.poll_interval, self._check)

    def _finish(self, timed_out: bool, why: str = "drain timed out") -> None:
        done, self._done = self._done, None
        if done is None:
            return
        for call in [*self._calls, self._poll, self._deadline]:
            if call is not None and call.active():
                call.cancel()
        self._calls, self._poll, self._deadline = [], None, None
        self._answering = []
        left = list(self.hub.sessions.values())
        if timed_out and left:
            log.warn("{why}: dropping {n} sessions", why=why, n=len(left))
            for session in left:
                self.hub.disconnect(session)
        else:
            log.info("drained")
        self._clean_exit()
        done.callback(None)

    def _clean_exit(self) -> None:
        # twistd re-raises SIGTERM on itself after the reactor stops, so the
        # process "dies of" SIGTERM. A drain that ran to its end is an orderly
        # shutdown: exit 0, which every supervisor reads as success.
        reactor = self._reactor
        if reactor is not None and getattr(reactor, "_exitSignal", None) == signal.SIGTERM:
            reactor._exitSignal = None
