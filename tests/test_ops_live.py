"""Operations against a live in-process chatd and real clients: TLS on every
listener, the /metrics scrape, and the drain seen from the outside."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest
import pytest_twisted
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.python import threadable
from websockets.exceptions import ConnectionClosed

from chatd import tap
from tests.tlscert import client_context, make_certificate, threaded_client_context
from tests.wsclient import Client


def fetch(url: str, context=None, data: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10, context=context, data=data) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest_twisted.ensureDeferred
async def test_every_listener_serves_tls_through_an_ssl_endpoint(start, tmp_path) -> None:
    key, cert = make_certificate(tmp_path)
    ssl_args: list[str] = []
    for name in tap.LISTENERS:
        ssl_args += [f"--{name}", f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"]
    running = await start(*ssl_args)
    ctx = client_context(cert)

    def scenario():
        url = f"wss://localhost:{running.ports['ws']}/ws"
        with Client(url, ssl=threaded_client_context(cert)) as a, Client(url, ssl=threaded_client_context(cert)) as b:
            a.join("secure", "alice")
            b.join("secure", "bob")
            a.send(type="message", room="secure", message="over tls")
            assert b.recv_type("message")["message"] == "over tls"
        # Every other HTTP listener answers over TLS with a verified certificate.
        for name in tap.LISTENERS:
            status, _, _ = fetch(f"https://localhost:{running.ports[name]}/", ctx)
            assert status < 500, name
        status, _, body = fetch(f"https://localhost:{running.ports['ws']}/health", ctx)
        assert status == 200 and json.loads(body)["status"] == "healthy"
        if "signalr" in tap.LISTENERS:
            status, _, body = fetch(
                f"https://localhost:{running.ports['signalr']}/signalr/negotiate?negotiateVersion=1", ctx, b""
            )
            assert status == 200, body
            assert {t["transport"] for t in json.loads(body)["availableTransports"]} >= {"WebSockets"}
        # A plain-text client gets nowhere on a TLS port.
        with pytest.raises(Exception):  # noqa: B017 - reset or bad status line, depending on timing
            fetch(f"http://127.0.0.1:{running.ports['ws']}/health")

    await deferToThread(scenario)


def _metrics(url: str) -> dict[tuple[str, tuple], float]:
    status, headers, body = fetch(url)
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


@pytest_twisted.ensureDeferred
async def test_metrics_name_filter_returns_every_family_asked_for(chatd) -> None:
    """``/metrics?name[]=…`` (prometheus_client's filter) serves chatd's own families too, not only its Counters."""
    names = ["chatd_messages_received_total", "chatd_events_out_total", "chatd_publish_to_deliver_seconds_count",
             "chatd_connections", "chatd_deliveries_total", "chatd_uptime_seconds", "chatd_errors_total"]  # fmt: skip

    def scenario():
        with Client(chatd.ws_url) as a:
            a.join("m", "alice")
            a.send(type="message", room="m", message="one")
            a.recv_type("message")
            a.send(type="bogus")
            a.recv_type("error")
            query = "&".join(f"name[]={n}" for n in names)
            return _metrics(chatd.url("ws", path=f"/metrics?{query}"))

    m = await deferToThread(scenario)
    assert {name for name, _ in m} == set(names)
    assert m[("chatd_messages_received_total", (("protocol", "websocket"),))] == 1
    assert m[("chatd_publish_to_deliver_seconds_count", ())] == 1


@pytest_twisted.ensureDeferred
async def test_metrics_endpoint_counts_a_real_chat(chatd) -> None:
    def scenario():
        before = _metrics(chatd.url("ws", path="/metrics"))
        with Client(chatd.ws_url) as a, Client(chatd.ws_url) as b:
            a.join("m", "alice")
            b.join("m", "bob")
            for i in range(5):
                a.send(type="message", room="m", message=f"n{i}")
            for _ in range(5):
                b.recv_type("message")
            a.send(type="bogus")
            a.recv_type("error")
            m = _metrics(chatd.url("ws", path="/metrics"))
        ws = (("protocol", "websocket"),)
        assert m[("chatd_connections", ws)] == 2
        assert m[("chatd_rooms", ())] == 1
        assert m[("chatd_messages_received_total", ws)] - before[("chatd_messages_received_total", ws)] == 5
        assert m[("chatd_deliveries_total", ())] - before[("chatd_deliveries_total", ())] == 10
        assert m[("chatd_publish_to_deliver_seconds_count", ())] == 5
        assert m[("chatd_errors_total", (("kind", "bad_request"), ("protocol", "websocket")))] == 1
        assert m[("chatd_accepting", ())] == 1

    await deferToThread(scenario)


@pytest_twisted.ensureDeferred
async def test_draining_shows_503_then_tells_clients_1001_and_refuses_newcomers(start) -> None:
    running = await start()
    drain = running.service.getServiceNamed("drain")
    clock = drain.clock = Clock()  # the drain waits on this clock; the listeners run for real

    def connect():
        a, b = Client(running.ws_url), Client(running.ws_url)
        a.join("d", "alice")
        b.join("d", "bob")
        return a, b

    a, b = await deferToThread(connect)
    stopped = running.service.stopService()

    def while_draining():
        status, _, body = fetch(running.url("ws", path="/health"))
        assert status == 503 and json.loads(body)["status"] == "unhealthy"
        late = Client(running.ws_url)
        with pytest.raises(ConnectionClosed) as closed:
            late.recv()
        assert closed.value.rcvd.code == 1013
        # The existing clients have not been told yet: they still chat.
        a.send(type="ping")
        assert a.recv_type("pong")

    await deferToThread(while_draining)
    assert not stopped.called
    clock.advance(0)  # the one batch goes

    def told():
        for client in (a, b):
            with pytest.raises(ConnectionClosed) as closed:
                client.recv_type("never")
            assert closed.value.rcvd.code == 1001

    await deferToThread(told)
    while not stopped.called:
        clock.advance(drain.poll_interval)
        await deferToThread(lambda: None)  # let the reactor see the closes
    await stopped
    assert not running.hub.sessions


@pytest_twisted.ensureDeferred
async def test_draining_answers_a_message_waiting_for_the_store_before_telling_its_sender_to_go(
    start, tmp_path
) -> None:
    """A message accepted before the drain gets its ``sent`` before the 1001, even if the store is slow.

    The drain told every session to go at its batch's time, whatever it had
    in flight: a message waiting for the history file (here, locked by
    another process) was stored, but its sender had been closed with 1001
    first and never got its ``sent``, so it could not know.
    """
    import sqlite3

    running = await start("--data-dir", str(tmp_path))
    drain = running.service.getServiceNamed("drain")
    clock = drain.clock = Clock()
    a = await deferToThread(lambda: Client(running.ws_url))
    await deferToThread(a.join, "d", "alice")
    other = sqlite3.connect(str(tmp_path / "chatd.sqlite3"), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        await deferToThread(a.send, type="message", room="d", message="in flight", ref="m1")
        for _ in range(20):  # the message reaches the store, which waits for the lock
            await deferToThread(time.sleep, 0.01)
        stopped = running.service.stopService()
        clock.advance(0)  # the one batch's time
        await deferToThread(time.sleep, 0.3)
    finally:
        other.execute("ROLLBACK")
        other.close()
    for _ in range(100):  # the drain looks again every poll_interval
        clock.advance(drain.poll_interval)
        await deferToThread(time.sleep, 0.02)
        if stopped.called:
            break

    def frames():
        seen = []
        try:
            while True:
                seen.append(a.recv(timeout=5)["type"])
        except ConnectionClosed as closed:
            return seen, closed.rcvd.code

    seen, code = await deferToThread(frames)
    assert "sent" in seen, seen
    assert code == 1001
    await stopped


@pytest_twisted.ensureDeferred
async def test_metrics_count_refused_requests_of_every_protocol(chatd) -> None:
    import grpc

    from chatd.grpc.generated import chat_pb2 as pb
    from chatd.grpc.generated.chat_pb2_grpc import ChatServiceStub
    from chatd.signalr import protocol as sr

    def scenario():
        with grpc.insecure_channel(chatd.grpc_target) as channel:
            with pytest.raises(grpc.RpcError) as info:
                ChatServiceStub(channel).SendMessage(
                    pb.MessageRequest(user="u", message="", room="r"), timeout=10
                )
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # SignalR over a raw WebSocket: handshake, then a hub call with a bad room.
        from websockets.sync.client import connect

        with connect(chatd.url("signalr", "ws", "/signalr?user=sam")) as ws:
            ws.send(b'{"protocol":"json","version":1}\x1e'.decode())
            assert ws.recv(timeout=10).startswith("{}")
            call = {"type": 1, "invocationId": "1", "target": "JoinRoom", "arguments": ["bad room!"]}
            ws.send(json.dumps(call) + sr.RECORD_SEPARATOR.decode())
            while True:
                records = [json.loads(r) for r in ws.recv(timeout=10).split("\x1e") if r]
                done = [r for r in records if r.get("type") == 3]
                if done:
                    assert "invalid room name" in done[0]["error"]
                    break
        return _metrics(chatd.url("ws", path="/metrics"))

    m = await deferToThread(scenario)
    assert m[("chatd_errors_total", (("kind", "bad_request"), ("protocol", "grpc")))] == 1
    assert m[("chatd_errors_total", (("kind", "bad_request"), ("protocol", "signalr")))] == 1


class _ThreadRecorder(Collector):
    """A collector that notes whether each scrape collected on the reactor thread."""

    def __init__(self) -> None:
        self.on_reactor: list[bool] = []

    def collect(self):
        self.on_reactor.append(threadable.isInIOThread())
        yield GaugeMetricFamily("chatd_test_probe", "which thread collected", value=1)


@pytest_twisted.ensureDeferred
async def test_metrics_are_collected_on_the_reactor_thread_only(chatd) -> None:
    # The hub's state belongs to the reactor thread; a scrape rendered in a
    # thread pool iterated its dicts while they changed (500s under churn).
    probe = _ThreadRecorder()
    chatd.hub.metrics.registry.register(probe)

    def scenario():
        with Client(chatd.ws_url) as a:
            for i in range(5):
                a.join(f"room{i}", "alice")
                m = _metrics(chatd.url("ws", path="/metrics"))
                assert m[("chatd_rooms", ())] == i + 1
                assert m[("chatd_test_probe", ())] == 1
        # Content negotiation still works: OpenMetrics for those who ask.
        request = urllib.request.Request(
            chatd.url("ws", path="/metrics"),
            headers={"Accept": "application/openmetrics-text; version=1.0.0"},
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            assert r.headers["Content-Type"].startswith("application/openmetrics-text")
            assert r.read().rstrip().endswith(b"# EOF")

    await deferToThread(scenario)
    assert probe.on_reactor == [True] * 6
