"""twisted.web's default: a request body of any size is read before a resource sees it,
spooled to a temporary file past 100,000 bytes. The ``--ws`` and ``--web`` listeners
serve only GETs, yet one unauthenticated client POSTing to ``/health`` made the
daemon write gigabytes to disk (2.5 GB in 12 s on loopback, per connection)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from tests.daemon import Daemon


def _spooled(pid: int) -> int:
    """Bytes held in regular files the daemon has open under the temp dir or deleted (request bodies)."""
    total = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
            if target.endswith("(deleted)") or target.startswith("/tmp/"):
                st = os.stat(fd)
                total += st.st_size
        except OSError:
            pass
    return total


@pytest.fixture(scope="module")
def daemon():
    with Daemon() as d:
        d.wait_healthy()
        yield d


@pytest.mark.parametrize("listener", ["ws", "web"])
def test_huge_body_is_not_spooled(daemon, listener: str) -> None:
    with socket.create_connection(("127.0.0.1", daemon.ports[listener]), timeout=10) as s:
        s.sendall(b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n")
        chunk = b"a" * (1 << 20)
        sent = 0
        try:
            while sent < 64 << 20:
                s.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # dropped (or refused): nothing more to send
        time.sleep(0.5)
        spooled = _spooled(daemon.proc.pid)
    assert spooled < 1 << 20, f"the daemon holds {spooled} bytes of a request body nobody reads"


@pytest.mark.parametrize("listener", ["ws", "web"])
def test_large_body_answered_413(daemon, listener: str) -> None:
    body = b"a" * (4 << 20)
    with socket.create_connection(("127.0.0.1", daemon.ports[listener]), timeout=10) as s:
        s.sendall(b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        answer = s.recv(200)
    assert answer.startswith(b"HTTP/1.1 413 "), answer


@pytest.mark.parametrize("listener", ["ws", "web"])
def test_get_still_served(daemon, listener: str) -> None:
    with socket.create_connection(("127.0.0.1", daemon.ports[listener]), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        answer = s.recv(200)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
