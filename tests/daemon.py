"""Run chatd the way users do: ``twistd -n chatd`` in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
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


class Daemon:
    """A ``twistd -n chatd`` process on free loopback ports, using this source tree."""

    def __init__(self, *extra: str, env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        self.ports = {name: free_port() for name in tap.LISTENERS}
        args = []
        for name, port in self.ports.items():
            args += [f"--{name}", f"tcp:{port}:interface=127.0.0.1"]
        if any(o[0] == "grpc" for o in tap.Options.optParameters):
            self.ports["grpc"] = free_port()
            args += ["--grpc", f"127.0.0.1:{self.ports['grpc']}"]
        environ = {k: v for k, v in os.environ.items() if k not in _CHATD_ENV}
        environ["PYTHONPATH"] = str(ROOT)
        environ.update(env or {})
        self.argv = [str(TWISTD), "--nodaemon", "--pidfile=", "chatd", *args, *extra]
        self.proc = subprocess.Popen(
            self.argv,
            cwd=cwd or str(ROOT),
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output = ""

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
        if self.proc.stdout and self.proc.poll() is not None:
            self.output += self.proc.stdout.read()
        return self.output

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> str:
        """Signal the daemon, wait for it to exit, return everything it logged."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self.output += out or ""
        return self.output

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_CHATD_ENV = {"WS_PORT", "SIGNALR_PORT", "GRPC_PORT", "WEB_PORT", "MAX_CONNECTIONS", "MANHOLE"}
