"""The reactor's event loop without the legacy log context (``chatd.fastpoll``), on the test's own reactor."""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, threads
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from chatd.fastpoll import EventDispatch
from tests.wsclient import Client

needs_epoll = pytest.mark.skipif(not isinstance(reactor, EPollReactor), reason="the tests' reactor is not epoll")


class _Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        if data == b"break":
            self.factory.broken.append(self)
            self.transport.loseConnection()
            return
        self.transport.write(data)

    def connectionLost(self, reason) -> None:
        if self in self.factory.broken:
            self.factory.lost.callback(None)
            raise RuntimeError("a connectionLost that raises")


def _echo_once(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        return s.recv(100)


@needs_epoll
@pytest_twisted.ensureDeferred
async def test_the_loop_is_replaced_while_the_service_runs_and_put_back_after() -> None:
    dispatch = EventDispatch(reactor)
    dispatch.startService()
    try:
        assert dispatch.installed and "doIteration" in vars(reactor)
        # A second one (two chatds on one reactor) leaves the first's in place.
        other = EventDispatch(reactor)
        other.startService()
        assert not other.installed
        other.stopService()
        assert "doIteration" in vars(reactor)
    finally:
        dispatch.stopService()
    assert "doIteration" not in vars(reactor)


def test_any_other_reactor_is_left_alone() -> None:
    clock = Clock()
    dispatch = EventDispatch(clock)
    dispatch.startService()
    assert not dispatch.installed and "doIteration" not in vars(clock)


@needs_epoll
@pytest_twisted.ensureDeferred
async def test_events_are_handled_and_an_error_that_escapes_a_handler_is_logged_with_its_prefix() -> None:
    factory = protocol.ServerFactory()
    factory.protocol = _Echo
    factory.broken, factory.lost = [], defer.Deferred()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    dispatch = EventDispatch(reactor)
    dispatch.startService()
    try:
        number = port.getHost().port
        assert await threads.deferToThread(_echo_once, number, b"hello") == b"hello"
        # connectionLost raises: logged, with the connection's prefix, and the loop goes on
        broken = socket.create_connection(("127.0.0.1", number), timeout=10)
        broken.sendall(b"break")
        await factory.lost
        assert await threads.deferToThread(_echo_once, number, b"still here") == b"still here"
        # a legacy log.err event: the failure under "failure", the connection's prefix as its system
        failures = [(e["failure"], e.get("log_system", "")) for e in seen if e.get("failure") is not None]
        assert any(
            "a connectionLost that raises" in str(failure.value) and system.startswith("_Echo,")
            for failure, system in failures
        ), failures
        broken.close()
    finally:
        globalLogPublisher.removeObserver(seen.append)
        dispatch.stopService()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_chatd_runs_with_it(chatd) -> None:
    # The started chatd installed it (on an epoll reactor); a whole chat goes through.
    services = {getattr(s, "name", None): s for s in chatd.service}
    assert "event-dispatch" in services
    assert services["event-dispatch"].installed == isinstance(reactor, EPollReactor)

    def scenario():
        with Client(chatd.ws_url) as alice, Client(chatd.ws_url) as bob:
            alice.join("r", "alice")
            bob.join("r", "bob")
            alice.send(type="message", room="r", message="hi")
            assert bob.recv_type("message")["message"] == "hi"

    await threads.deferToThread(scenario)
