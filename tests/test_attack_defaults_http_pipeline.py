"""A client that pipelines requests and never reads the answers is stopped, not served into memory.

twisted.web stops reading a connection whose answers pile up unsent
(twisted ticket 8868), but only if the transport says so between two
requests: the transport says it once, while a request is being answered
(its answer is what fills the buffer), and then twisted.web only notes it;
the connection was read on, every answer buffered. One client sending
``GET /health`` pipelined on one connection, reading nothing, grew the
daemon by about 45 MB a second, without end (2 GB in 40 s), on every HTTP
listener, no token needed.
"""

from __future__ import annotations

import socket
import time

import pytest

from tests.daemon import Daemon

PATHS = {"ws": "/health", "web": "/health", "signalr": "/signalr/health"}


def rss_mb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("listener", sorted(PATHS))
def test_pipelining_client_that_never_reads_is_not_buffered(listener: str) -> None:
    with Daemon() as d:
        d.wait_healthy()
        before = rss_mb(d.proc.pid)
        requests = f"GET {PATHS[listener]} HTTP/1.1\r\nHost: x\r\n\r\n".encode() * 1000
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", d.ports[listener]))
            s.settimeout(2)
            deadline = time.monotonic() + 12
            try:
                while time.monotonic() < deadline:
                    s.sendall(requests)
            except OSError:
                pass  # the server stopped reading (or dropped us): what should happen
            grown = rss_mb(d.proc.pid) - before
        assert d.proc.poll() is None
    assert grown < 100, f"the daemon grew by {grown} MB answering a client that reads nothing"


def test_pipelining_client_that_reads_gets_every_answer() -> None:
    """Paused while its answers wait, a connection is read again once they are taken."""
    count = 3000
    with Daemon() as d:
        d.wait_healthy()
        with socket.create_connection(("127.0.0.1", d.ports["ws"]), timeout=10) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * count)
            got = b""
            while got.count(b"HTTP/1.1 200 ") < count:
                chunk = s.recv(1 << 16)
                assert chunk, f"closed after {got.count(b'HTTP/1.1 200 ')} answers"
                got += chunk
