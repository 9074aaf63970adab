"""``--workers N``: N chatd processes behind the same ports, joined through Redis.

One reactor uses one core. With ``--workers N`` the process that ``twistd``
starts becomes a small supervisor: for every TCP listener (``--ws``,
``--signalr``, ``--web``) it opens N sockets on the same address with
``SO_REUSEPORT``, so the kernel spreads new connections evenly over them,
and starts N workers (``python -m twisted chatd`` with the same options),
each handed one socket of each listener. A worker is a whole chatd: its own
hub, its own gRPC server (grpcio binds the same port with ``SO_REUSEPORT``
too), and Redis (required) carries messages, order, history and presence
between them. The supervisor restarts a worker that dies, passes SIGTERM on
so every worker drains, and exits once they all have.

SignalR is the exception: a negotiated SignalR connection lives in the
process that negotiated it, and its later requests (the WebSocket, or SSE
and long polling's POSTs and polls, each a new TCP connection) must reach
that same process, which ``SO_REUSEPORT`` cannot promise. So the SignalR
listener is served by the first worker only; WebSocket, gRPC and the web
listener use every worker.

Sockets are made by the supervisor, before the workers exist, so a port in
use fails the start at once (one line, non-zero exit), as without workers.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, endpoints, error, protocol
from twisted.logger import Logger
from twisted.python import usage

from chatd import logs, sdnotify
from chatd.drain import HURRY, take_over_signals
from chatd.startup import StartupError, bind_error

log = Logger()

#: listeners only the first worker serves (see the module docstring)
FIRST_WORKER_ONLY = {"signalr"}

#: set in a worker's environment: its index, and its listening sockets' descriptors
WORKER_ENV = "CHATD_WORKER"
FDS_ENV = "CHATD_LISTEN_FDS"
#: set in a worker's environment: the supervisor's process id (see follow_supervisor)
SUPERVISOR_ENV = "CHATD_SUPERVISOR"
#: prctl(2): the signal a process gets when its parent dies
PR_SET_PDEATHSIG = 1
FIRST_FD = 3
RESTART_DELAY = 1.0


def somaxconn() -> int:
    """The kernel's largest listen backlog (what Go asks for), 4096 if unknown."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 4096


def with_backlog(description: str) -> str:
    """``description`` asking for the kernel's largest listen backlog, unless it names one.

    Twisted listens with a backlog of 50: under a reconnect storm the kernel
    drops the SYNs past it and clients wait out their 1 s and 3 s
    retransmissions. An explicit ``backlog=`` still wins.
    """
    kind = description.split(":", 1)[0].lower()
    if kind in ("tcp", "tcp6", "ssl") and "backlog=" not in description:
        return f"{description}:backlog={somaxconn()}"
    return description


def follow_supervisor(environ: Any = None) -> None:
    """Make this worker drain and exit (SIGTERM) when its supervisor dies, however it dies.

    A supervisor killed outright (SIGKILL, the OOM killer; outside systemd,
    which kills the whole cgroup anyway) would otherwise leave its workers
    serving on: ``SO_REUSEPORT`` lets the next supervisor bind beside them,
    and they would go on taking a share of new connections with the old
    code and options. Linux only (``prctl``); elsewhere the worker lives on
    as before.
    """
    expected = (environ if environ is not None else os.environ).get(SUPERVISOR_ENV, "")
    if not expected.isdigit():
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as e:
        log.warn("cannot follow the supervisor's exit ({error}): this worker outlives it", error=str(e))
        return
    if os.getppid() != int(expected):  # it died before the line above
        raise StartupError("the supervisor that started this worker is gone")


def worker_index(environ: Any = None) -> int | None:
    """This process's worker number when it is one of ``--workers``' workers."""
    value = (environ if environ is not None else os.environ).get(WORKER_ENV)
    return int(value) if value and value.isdigit() else None


def adopted_endpoints(reactor: Any, environ: Any = None) -> dict[str, Any]:
    """In a worker: the listeners handed down by the supervisor, as endpoints."""
    value = (environ if environ is not None else os.environ).get(FDS_ENV, "")
    found: dict[str, Any] = {}
    for item in filter(None, value.split(",")):
        name, _, spec = item.partition("=")
        fd, _, family = spec.partition(":")
        found[name] = endpoints.AdoptedStreamServerEndpoint(
            reactor, int(fd), socket.AF_INET6 if family == "6" else socket.AF_INET
        )
    return found


def _tcp_address(name: str, description: str) -> tuple[str, int, int, int]:
    """``(host, port, backlog, family)`` of a ``tcp:``/``tcp6:`` listener; anything else is refused."""
    endpoint = endpoints.serverFromString(None, description)
    if isinstance(endpoint, (endpoints.TCP4ServerEndpoint, endpoints.TCP6ServerEndpoint)) and not endpoint._port:
        raise usage.UsageError(f"--{name}: --workers needs a fixed port, not {description!r}")
    if isinstance(endpoint, endpoints.TCP6ServerEndpoint):
        family, default_host = socket.AF_INET6, "::"
    elif isinstance(endpoint, endpoints.TCP4ServerEndpoint):
        family, default_host = socket.AF_INET, ""
    else:
        raise usage.UsageError(
            f"--{name}: --workers shares plain tcp: listeners between processes; "
            f"{description!r} is not one (put TLS in front, or run without --workers)"
        )
    return endpoint._interface or default_host, endpoint._port, endpoint._backlog, family


def check_options(options: Any, listeners: list[str]) -> None:
    """``--workers`` needs ``--redis`` and plain TCP listeners."""
    if options["workers"] <= 1 or worker_index(options.environ) is not None:
        return
    if not options["redis"]:
        raise usage.UsageError("--workers needs --redis: the workers share rooms, order and history through it")
    for name in listeners:
        _tcp_address(name, options[name])


class WorkerPool(Service):
    """The supervisor of ``--workers``; see the module docstring."""

    name = "workers"

    def __init__(self, reactor: Any, options: Any, listeners: list[str], argv: list[str]) -> None:
        self.reactor = reactor
        self.count = options["workers"]
        self.options = options
        self.listeners = listeners
        self.argv = argv
        #: variables added to every worker's environment: secrets kept off its command line
        self.environment: dict[str, str] = {}
        #: worker index -> its sockets by listener name
        self.sockets: dict[int, dict[str, socket.socket]] = {}
        self.processes: dict[int, WorkerProcess] = {}
        self.stopping = False
        self._stopped: defer.Deferred | None = None
        #: the workers were told to end their drains (see ``_again``)
        self._hurried = False
        #: twistd builds the supervisor before its reactor runs: the process's signals are its own
        self.owns_process = not getattr(reactor, "running", True)

    def privilegedStartService(self) -> None:
        # Bound before privileges drop and before any worker runs: a port in
        # use is a start-up error here, not N crashing workers. Each worker
        # binds gRPC itself, so its port is only checked here.
        why = bind_error(self.options["grpc"])
        if why is not None:
            raise StartupError(f"--grpc: cannot listen on {self.options['grpc']}: {why}")
        for index in range(self.count):
            self.sockets[index] = {
                name: self._bind(name)
                for name in self.listeners
                if index == 0 or name not in FIRST_WORKER_ONLY
            }
        super().privilegedStartService()

    def _bind(self, name: str) -> socket.socket:
        host, port, backlog, family = _tcp_address(name, with_backlog(self.options[name]))
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            raise StartupError(f"--{name}: cannot listen on {host or '*'}:{port}: {e.strerror}") from None
        sock.listen(backlog)
        sock.set_inheritable(True)
        return sock

    def startService(self) -> None:
        if not self.sockets:
            self.privilegedStartService()
        super().startService()
        if self.owns_process:  # once the reactor runs: it installs Twisted's handlers as it starts
            self.reactor.callWhenRunning(take_over_signals, self._again)
        for index in range(self.count):
            self._spawn(index)
        log.info("{count} workers started", count=self.count)
        sdnotify.notify(f"READY=1\nSTATUS={self.count} workers")

    def _spawn(self, index: int) -> None:
        sockets = self.sockets[index]
        child_fds: dict[int, Any] = {0: "w", 1: 1, 2: 2}
        fds = []
        for offset, (name, sock) in enumerate(sockets.items()):
            child_fds[FIRST_FD + offset] = sock.fileno()
            family = "6" if sock.family == socket.AF_INET6 else "4"
            fds.append(f"{name}={FIRST_FD + offset}:{family}")
        env = dict(os.environ)
        env.update(self.environment)
        env[WORKER_ENV] = str(index)
        env[SUPERVISOR_ENV] = str(os.getpid())
        env[logs.FORMAT_ENV] = logs.FORMAT
        env[FDS_ENV] = ",".join(fds)
        # Only the supervisor talks to systemd.
        env.pop("NOTIFY_SOCKET", None)
        env.pop("WATCHDOG_USEC", None)
        process = WorkerProcess(self, index)
        self.processes[index] = process
        self.reactor.spawnProcess(
            process,
            sys.executable,
            # twistd in the foreground, logging to the standard output it shares with this process
            # (the journal) in this process's format, each line marked with the worker's number
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "--nodaemon", "--pidfile=",
             "--logger", "chatd.logs.worker_observer", "chatd", *self.argv],
            env=env,
            childFDs=child_fds,
        )

    def exited(self, index: int, reason: Any) -> None:
        self.processes.pop(index, None)
        if self.stopping:
            if not self.processes and self._stopped is not None:
                # Every worker drained: an orderly stop, exit 0 (as chatd.drain does).
                if getattr(self.reactor, "_exitSignal", None) == signal.SIGTERM:
                    self.reactor._exitSignal = None
                self._stopped.callback(None)
            return
        log.error("worker {index} exited ({why}); starting it again", index=index, why=reason.getErrorMessage())
        self.reactor.callLater(RESTART_DELAY, self._respawn, index)

    def _respawn(self, index: int) -> None:
        if not self.stopping and index not in self.processes:
            self._spawn(index)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        self.stopping = True
        sdnotify.notify("STOPPING=1")
        for sockets in self.sockets.values():
            for sock in sockets.values():
                sock.close()
        if not self.processes:
            return defer.succeed(None)
        self._stopped = defer.Deferred()
        for process in list(self.processes.values()):
            process.signal("TERM")
        # Each worker drains within --drain-timeout; then it is killed.
        kill = self.reactor.callLater(self.options["drain-timeout"] + 15, self._kill)
        self._stopped.addBoth(lambda r: kill.active() and kill.cancel() or r)
        return self._stopped

    def _again(self, number: int) -> None:
        """A second SIGTERM or SIGINT: every worker ends its drain (``chatd.drain.HURRY``), once."""
        name = signal.Signals(number).name
        if self._hurried:
            log.info("{signal} again: already stopping", signal=name)
            return
        self._hurried = True
        log.info("{signal} again: ending the workers' drains now", signal=name)
        for process in list(self.processes.values()):
            self.reactor.callFromThread(process.signal, HURRY)

    def _kill(self) -> None:
        for process in list(self.processes.values()):
            process.signal("KILL")


class WorkerProcess(protocol.ProcessProtocol):
    """One worker as the supervisor sees it."""

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index

    def signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)
        except error.ProcessExitedAlready:
            pass

    def processEnded(self, reason: Any) -> None:  # noqa: N802 (Twisted's name)
        self.pool.exited(self.index, reason)
