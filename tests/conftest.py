"""Shared fixtures: a live chatd built by ``makeService`` on ephemeral ports.

Integration tests run the server on the test's reactor (pytest-twisted) and
drive real third-party clients from a worker thread (``deferToThread``), so
blocking clients (``websockets.sync``, grpcio, subprocesses) never stall the
server they talk to.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer

from chatd import tap

REQUIRE_ALL = os.environ.get("CHATD_REQUIRE_ALL") == "1"


def require(condition: bool, reason: str) -> None:
    """Skip when a tool the test needs is missing, unless CI demands everything."""
    if condition:
        return
    if REQUIRE_ALL:
        pytest.fail(f"CHATD_REQUIRE_ALL=1 but: {reason}")
    pytest.skip(reason)


def require_tool(name: str) -> str:
    path = shutil.which(name)
    require(path is not None, f"{name} is not installed")
    return path  # type: ignore[return-value]


@dataclass
class Running:
    """A started chatd service tree and where to reach it."""

    service: Any
    options: Any
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def hub(self):
        return self.service.getServiceNamed("hub")

    def url(self, listener: str, scheme: str = "http", path: str = "") -> str:
        return f"{scheme}://127.0.0.1:{self.ports[listener]}{path}"

    @property
    def ws_url(self) -> str:
        return self.url("ws", "ws", "/ws")

    @property
    def http_url(self) -> str:
        return self.url("ws")

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"


def listener_args() -> list[str]:
    """Every endpoint listener on a free loopback port (gRPC takes host:port)."""
    args: list[str] = []
    for name in tap.LISTENERS:
        args += [f"--{name}", "tcp:0:interface=127.0.0.1"]
    return [*args, "--grpc", "127.0.0.1:0"]


async def start_chatd(*extra: str, environ: dict[str, str] | None = None) -> Running:
    """Start a chatd on this reactor with every listener on a free port."""
    from twisted.internet import reactor

    options = tap.Options(environ=environ or {})
    # Each test its own history (memory) unless it names a --data-dir.
    defaults = [] if "--data-dir" in extra else ["--data-dir", ""]
    options.parseOptions([*listener_args(), *defaults, *extra])
    service = tap.makeService(options, reactor=reactor)
    service.startService()
    running = Running(service, options)
    for svc in service:
        when = getattr(svc, "whenListening", None)
        if when is not None:
            port = await when()
            running.ports[svc.name] = getattr(port.getHost(), "port", None) if hasattr(port, "getHost") else port
    return running


@pytest_twisted.async_yield_fixture
async def chatd():
    """A chatd with default options on free ports, stopped after the test."""
    running = await start_chatd()
    yield running
    await defer.maybeDeferred(running.service.stopService)


@pytest.fixture
def start():
    """Start chatd with extra options: ``running = await start("--max-connections", "2")``."""
    started: list[Running] = []

    async def _start(*extra: str, environ: dict[str, str] | None = None) -> Running:
        running = await start_chatd(*extra, environ=environ)
        started.append(running)
        return running

    yield _start
    for running in started:
        pytest_twisted.blockon(defer.maybeDeferred(running.service.stopService))


@pytest.fixture
def redis(tmp_path):
    """A ``redis-server`` of the test's own (append-only, fsync always), stopped after it."""
    from tests.redisserver import RedisServer

    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()
