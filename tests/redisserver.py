"""A real ``redis-server`` for the tests, on a free loopback port."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from tests.conftest import require_tool
from tests.daemon import free_port


class RedisServer:
    """A ``redis-server`` on a free loopback port, in its own directory; restartable."""

    def __init__(self, directory: Path, tls: tuple[Path, Path] | None = None) -> None:
        self.binary = require_tool("redis-server")
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        #: (key, certificate): serve TLS only, on ``tls_port``, on 127.0.0.1 and 127.0.0.2
        self.tls = tls
        self.tls_port = free_port() if tls else None
        self.proc: subprocess.Popen | None = None
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
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
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


