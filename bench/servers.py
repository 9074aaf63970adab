"""The servers under test: chatd as users start it, a peer's command, or a URL.

A server is started fresh for every workload (so memory figures are its
own), pinned with ``taskset`` when asked, and stopped by its own PID (SIGTERM,
then SIGKILL). CPU and RSS come from /proc and are summed over the process
and all its descendants, so ``--workers N`` is counted whole.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TWISTD = Path(sys.executable).with_name("twistd")
CLK_TCK = os.sysconf("SC_CLK_TCK")
KIT = Path(os.environ.get("BENCH_KIT", "/tmp/bench"))
KIT_VENV = Path(os.environ.get("BENCH_VENV", "/tmp/benchvenv"))

LOAD_OPTIONS = [
    "--max-message-rate", "0",
    "--max-connection-rate", "0",
    "--max-connections-per-ip", "0",
    "--max-connections", "20000",
]  # fmt: skip
"""chatd's limits off: every client comes from 127.0.0.1 and senders exceed a person's rate."""

PEERS = {
    "go-gorilla": "{kit}/peers/go-gorilla/go-gorilla -addr 127.0.0.1:{PORT}",
    "py-autobahn-prepared": "{venv}/bin/python {kit}/peers/py-autobahn-twisted/server.py --port {PORT} --mode prepared",
    "py-autobahn-naive": "{venv}/bin/python {kit}/peers/py-autobahn-twisted/server.py --port {PORT} --mode naive",
    "node-ws-once": "node {kit}/peers/node-ws/server.js --port {PORT} --mode once",
    "py-twisted-floor": "{python} {root}/bench/floor.py {PORT}",
    "py-twisted-floor-presence": "{python} {root}/bench/floor.py {PORT} --presence",
}
"""The kit's peers by name (``BENCH_KIT``, ``BENCH_VENV`` say where it is built), and this
bench's own floor (:mod:`bench.floor`, run by the bench's own Python)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def process_tree(pid: int) -> list[int]:
    """The PID and every live descendant (worker processes, helpers)."""
    tree = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(tree.get(p, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (all their threads)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def memory_kb(pids: list[int]) -> tuple[int, int]:
    """(VmRSS, VmHWM) summed over these processes."""
    rss = hwm = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm += int(line.split()[1])
        except OSError:
            continue
    return rss, hwm


def machine_busy() -> tuple[float, float]:
    """CPU seconds of the whole machine: (busy in processes, steal included; softirq).

    Softirq is kept apart: loopback TCP is processed there and most of it is
    the benchmark's own traffic, not charged to any process.
    """
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + steal) / CLK_TCK, softirq / CLK_TCK


def thread_count(pids: list[int]) -> int:
    n = 0
    for pid in pids:
        try:
            n += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            pass
    return n


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Redis:
    """A fresh ``redis-server`` on a free loopback port for ``--redis-server``: the backplane of ``--workers``.

    Append-only file with ``everysec`` fsync in its own temporary directory, as
    a production backplane would run; its CPU is reported beside the server's.
    """

    def __init__(self, cpu: str | None = None) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="bench-redis-")
        self.port = free_port()
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes", "--appendfsync", "everysec", "--dir", self.dir.name, "--protected-mode", "no"]
        if cpu is not None:
            argv = ["taskset", "-c", cpu, *argv]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not _listening(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cpu(self) -> float:
        return cpu_seconds([self.proc.pid])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.dir.cleanup()


class Server:
    """One server under test. ``spec`` is ``chatd``, a kit peer's name, ``NAME=COMMAND`` or ``NAME=ws://…``."""

    def __init__(self, spec: str, server_cpu: str | None = None, chatd_args: list[str] | None = None,
                 logdir: Path | None = None, redis: bool = False) -> None:
        self.name, _, target = spec.partition("=")
        self.want_redis = redis
        self.redis: Redis | None = None
        self.server_cpu = server_cpu
        self.chatd_args = chatd_args or []
        self.logdir = logdir or Path(tempfile.mkdtemp(prefix="bench-logs-"))
        self.proc: subprocess.Popen | None = None
        self.external_pid = 0
        self.urls: dict[str, str] = {}
        self._tree: list[int] = []
        self._tree_at = 0.0
        self.is_chatd = self.name == "chatd" and not target
        if target.startswith("ws://"):
            self.command = None
            self.urls = {"ws": target}
        elif target:
            self.command = target
        elif self.name in PEERS:
            self.command = PEERS[self.name].format(
                kit=KIT, venv=KIT_VENV, python=sys.executable, root=ROOT, PORT="{PORT}"
            )
        elif self.is_chatd:
            self.command = None
        else:
            raise ValueError(f"unknown server {spec!r}: chatd, {', '.join(PEERS)}, NAME=COMMAND or NAME=ws://…")

    @property
    def external(self) -> bool:
        return not self.is_chatd and self.command is None

    def argv(self) -> list[str]:
        if self.is_chatd:
            self._data = tempfile.TemporaryDirectory(prefix="bench-chatd-data-")
            p = self.ports
            argv = [
                str(TWISTD), "--nodaemon", "--pidfile=", "--logfile", str(self.logdir / "chatd.log"), "chatd",
                "--ws", f"tcp:{p['ws']}:interface=127.0.0.1",
                "--signalr", f"tcp:{p['signalr']}:interface=127.0.0.1",
                "--web", f"tcp:{p['web']}:interface=127.0.0.1",
                "--grpc", f"127.0.0.1:{p['grpc']}",
                "--data-dir", self._data.name,
                *LOAD_OPTIONS, "--drain-timeout", "2",
                *(a.replace("{REDIS}", self.redis.url) if self.redis else a for a in self.chatd_args),
            ]  # fmt: skip
        else:
            cmd = self.command.replace("{PORT}", str(self.ports["ws"]))  # type: ignore[union-attr]
            argv = shlex.split(cmd)
        if self.server_cpu is not None:
            argv = ["taskset", "-c", self.server_cpu, *argv]
        return argv

    def start(self, timeout: float = 60) -> None:
        if self.external:
            return
        self.ports = {"ws": free_port()}
        if self.is_chatd:
            for name in ("signalr", "web", "grpc"):
                port = free_port()
                while port in self.ports.values():
                    port = free_port()
                self.ports[name] = port
        self.urls = {"ws": f"ws://127.0.0.1:{self.ports['ws']}/ws"}
        if self.want_redis and self.redis is None:
            self.redis = Redis(self.server_cpu)
        if self.is_chatd:
            self.urls["signalr"] = f"ws://127.0.0.1:{self.ports['signalr']}/signalr"
            self.urls["grpc"] = f"127.0.0.1:{self.ports['grpc']}"
        env = {**os.environ, "PORT": str(self.ports["ws"])}
        if self.is_chatd:
            env["PYTHONPATH"] = str(ROOT)
            for key in ("WS_PORT", "SIGNALR_PORT", "GRPC_PORT", "WEB_PORT", "DATA_DIR", "REDIS_URL", "WORKERS"):
                env.pop(key, None)
        log = open(self.logdir / f"{self.name}.out", "ab")
        self.proc = subprocess.Popen(self.argv(), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.logdir}")
            if self._ready():
                time.sleep(0.3)
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not listen within {timeout:.0f} s; see {self.logdir}")

    def _ready(self) -> bool:
        if not self.is_chatd:
            return _listening(self.ports["ws"])
        if not all(_listening(p) for p in self.ports.values()):
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['ws']}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else self.external_pid

    def pids(self) -> list[int]:
        """The server's processes, re-read at most once a second (workers may start late)."""
        if not self.pid:
            return []
        now = time.monotonic()
        if now - self._tree_at > 1.0:
            self._tree, self._tree_at = process_tree(self.pid), now
        return self._tree

    def cpu(self) -> float:
        return cpu_seconds(self.pids()) if self.pid else float("nan")

    def redis_cpu(self) -> float | None:
        return self.redis.cpu() if self.redis else None

    def memory(self) -> tuple[int, int]:
        return memory_kb(self.pids()) if self.pid else (0, 0)

    def threads(self) -> int:
        return thread_count(self.pids())

    def alive(self) -> bool:
        return self.external or (self.proc is not None and self.proc.poll() is None)

    def stop(self) -> None:
        """SIGTERM to our process, SIGKILL after 15 s (chatd drains first); never anything we did not start."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self._tree = []
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
