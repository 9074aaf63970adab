"""Run chatd the way users do: ``twistd -n chatd`` in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from chatd import tap

ROOT = Path(__file__).resolve().parent.parent
TWISTD = Path(sys.executable).with_name("twistd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports() -> dict[str, int]:
    """A free loopback port for every listener chatd has, gRPC included."""
    names = list(tap.LISTENERS)
    if any(o[0] == "grpc" for o in tap.Options.optParameters):
        names.append("grpc")
    ports: dict[str, int] = {}
    for name in names:
        port = free_port()
        while port in ports.values():  # the kernel may hand the same free port out twice
            port = free_port()
        ports[name] = port
    return ports


def listener_args(ports: dict[str, int]) -> list[str]:
    args: list[str] = []
    for name, port in ports.items():
        if name == "grpc":
            args += ["--grpc", f"127.0.0.1:{port}"]
        else:
            args += [f"--{name}", f"tcp:{port}:interface=127.0.0.1"]
    return args


def source_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a chatd subprocess running this source tree, defaults cleared."""
    environ = {k: v for k, v in os.environ.items() if k not in _CHATD_ENV}
    environ["PYTHONPATH"] = str(ROOT)
    environ.update(extra or {})
    return environ


def run_python(source: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``source`` run by a fresh Python on this tree: a crash or a wedge there fails a test, not pytest."""
    return subprocess.run(
        [sys.executable, "-c", source, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(ROOT),
        env=source_env(),
    )


class Daemon:
    """A ``twistd -n chatd`` process on free loopback ports, using this source tree."""

    def __init__(self, *extra: str, env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        self.ports = free_ports()
        if "--data-dir" not in extra and "DATA_DIR" not in (env or {}):
            # Each daemon its own history, never the checkout's ./data.
            self._data = tempfile.TemporaryDirectory(prefix="chatd-data-")
            extra = ("--data-dir", self._data.name, *extra)
        self.argv = [str(TWISTD), "--nodaemon", "--pidfile=", "chatd", *listener_args(self.ports), *extra]
        environ = source_env(env)
        # The log goes to a file, not a pipe: nobody reads a pipe while the
        # test runs, and a full one would block the daemon mid-write.
        self._log = tempfile.TemporaryFile(mode="w+", prefix="chatd-log-")
        self.proc = subprocess.Popen(
            self.argv,
            cwd=cwd or str(ROOT),
            env=environ,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def url(self, listener: str = "ws", scheme: str = "http", path: str = "") -> str:
        return f"{scheme}://127.0.0.1:{self.ports[listener]}{path}"

    @property
    def ws_url(self) -> str:
        return self.url("ws", "ws", "/ws")

    def wait_healthy(self, timeout: float = 30) -> dict:
        """Poll ``/health`` until it answers (bounded); fail with the log if the process dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"chatd exited with {self.proc.returncode}:\n{self.read_output()}")
            try:
                with urllib.request.urlopen(self.url(path="/health"), timeout=2) as r:
                    return json.loads(r.read())
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"chatd never became healthy:\n{self.stop()}")

    def read_output(self) -> str:
        """Everything the daemon has logged so far."""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()

    @property
    def output(self) -> str:
        return self.read_output()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> str:
        """Signal the daemon, wait for it to exit, return everything it logged."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.read_output()

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_CHATD_ENV = {
    "WS_PORT",
    "SIGNALR_PORT",
    "GRPC_PORT",
    "WEB_PORT",
    "MAX_CONNECTIONS",
    "MANHOLE",
    "DATA_DIR",
    "REDIS_URL",
}
