"""Fixtures that run a test once on each gRPC server (``--grpc-server threaded|aio``).

A gRPC test module imports ``chatd``, ``start`` and ``grpc_server`` from
here; they replace conftest's fixtures of the same names, so every test of
the module runs against both servers with nothing else changed.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer

from chatd.grpc.service import SERVERS
from tests.conftest import Running, start_chatd


@pytest.fixture(params=SERVERS)
def grpc_server(request: Any) -> str:
    """The ``--grpc-server`` this run of the test uses."""
    return request.param


async def start_with(grpc_server: str, *extra: str, environ: dict[str, str] | None = None) -> Running:
    """``start_chatd`` on the given gRPC server."""
    return await start_chatd("--grpc-server", grpc_server, *extra, environ=environ)


@pytest_twisted.async_yield_fixture
async def chatd(grpc_server: str):
    """conftest's ``chatd``, on each gRPC server."""
    running = await start_with(grpc_server)
    yield running
    await defer.maybeDeferred(running.service.stopService)


@pytest.fixture
def start(grpc_server: str):
    """conftest's ``start``, on each gRPC server."""
    started: list[Running] = []

    async def _start(*extra: str, environ: dict[str, str] | None = None) -> Running:
        running = await start_with(grpc_server, *extra, environ=environ)
        started.append(running)
        return running

    yield _start
    for running in started:
        pytest_twisted.blockon(defer.maybeDeferred(running.service.stopService))
