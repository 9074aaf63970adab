"""A real ``redis-server`` for the tests, on a free loopback port."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from tests.conftest import require_tool
from tests.daemon import free_port


class PortTaken(Exception):
    """redis-server could not bind its port."""


class RedisServer:
    """A ``redis-server`` on a free loopback port, in its own directory; restartable."""

    def __init__(self, directory: Path, tls: tuple[Path, Path] | None = None) -> None:
        self.binary = require_tool("redis-server")
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        #: (key, certificate): serve TLS only, on ``tls_port``, on 127.0.0.1 and 127.0.0.2
        self.tls = tls
        self.tls_port = None
        while tls and self.tls_port in (None, self.port):  # two free ports, not the same one twice
            self.tls_port = free_port()
        self.proc: subprocess.Popen | None = None
        for _ in range(5):
            try:
                self.start()
                return
            except PortTaken:
                # Another process took a "free" port between our check and
                # Redis's bind (the suite runs many servers): pick others.
                self.port = free_port()
                while tls and self.tls_port in (None, self.port):
                    self.tls_port = free_port()
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        tls: list[str] = []
        if self.tls:
            key, cert = self.tls
            tls = ["--tls-port", str(self.tls_port), "--tls-key-file", str(key), "--tls-cert-file", str(cert),
                   "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no", "--bind", "127.0.0.1 127.0.0.2"]
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.dir),
             "--protected-mode", "no", *tls],
            stdout=open(self.dir / "redis.log", "ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                if "Address already in use" in log:
                    (self.dir / "redis.log").unlink()
                    raise PortTaken(log)
                raise AssertionError(f"redis-server exited with {self.proc.returncode}:\n{log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def command(self, *args: str) -> bytes:
        """One command in Redis's inline form; the raw reply."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall((" ".join(args) + "\r\n").encode())
            return s.recv(65536)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


