"""HTTP/2 on TLS listeners: ALPN picks h2 for the page, ``/health``, ``/stats``
and SignalR's HTTP transports; WebSockets stay on HTTP/1.1 on the same port.

Browsers open at most six HTTP/1.1 connections to one host, and every
SignalR tab on Server-Sent Events or long polling holds one open; over
HTTP/2 they all share one connection. chatd runs on the test reactor with
every listener on ``ssl:``; the clients are httpx (HTTP/2 through ``h2``),
the ``websockets`` library and Chromium with the official SignalR client,
each driven from a worker thread.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from chatd import tap
from chatd.signalr import protocol as p
from tests.conftest import require
from tests.tlscert import client_context, make_certificate, threaded_client_context
from tests.wsclient import Client

try:
    import httpx
except ImportError:  # pragma: no cover - the test extra brings it
    httpx = None  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parent.parent
SIGNALR_JS = ROOT / "tests/node/node_modules/@microsoft/signalr/dist/browser/signalr.js"
HANDSHAKE = b'{"protocol":"json","version":1}\x1e'
WAIT = 20.0  # the bound on each wait for the server, seconds


@pytest.fixture
def tls_chatd(start, tmp_path):
    """Start a chatd with every listener on ``ssl:`` (a throwaway certificate for 127.0.0.1)."""
    require(httpx is not None, "httpx is not installed (pip install '.[test]')")
    key, cert = make_certificate(tmp_path)

    async def _start(*extra: str) -> Any:
        listeners = [
            arg
            for name in tap.LISTENERS
            for arg in (f"--{name}", f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}")
        ]
        running = await start(*listeners, *extra)
        running.cert = cert
        return running

    return _start


def https(running: Any, listener: str, path: str) -> str:
    return running.url(listener, "https", path)


def h2_client(running: Any) -> Any:
    return httpx.AsyncClient(http2=True, verify=client_context(running.cert), timeout=WAIT)


def in_thread(coroutine_function, *args: Any):
    """Run an asyncio client in a worker thread, so the server on this reactor keeps serving."""
    return deferToThread(asyncio.run, coroutine_function(*args))


def records(data: bytes) -> list[dict]:
    return p.JsonCodec().feed(data)


def invocation(target: str, *arguments: Any, invocation_id: str = "1") -> bytes:
    body = {"type": 1, "invocationId": invocation_id, "target": target, "arguments": list(arguments)}
    return orjson.dumps(body) + b"\x1e"


@pytest_twisted.ensureDeferred
async def test_page_health_stats_and_negotiate_are_served_over_http2(tls_chatd) -> None:
    running = await tls_chatd()

    async def fetch() -> dict[str, tuple[str, int]]:
        async with h2_client(running) as client:
            answers = {
                "page": await client.get(https(running, "web", "/")),
                "config": await client.get(https(running, "web", "/config.json")),
                "health": await client.get(https(running, "ws", "/health")),
                "stats": await client.get(https(running, "ws", "/stats")),
                "signalr health": await client.get(https(running, "signalr", "/signalr/health")),
                "negotiate": await client.post(https(running, "signalr", "/signalr/negotiate?negotiateVersion=1")),
            }
            assert answers["health"].json()["status"] == "healthy"
            assert "connections" in answers["stats"].json()
            assert "connectionToken" in answers["negotiate"].json()
            assert b"<html" in answers["page"].content
        return {name: (r.http_version, r.status_code) for name, r in answers.items()}

    answers = await in_thread(fetch)
    assert answers == {name: ("HTTP/2", 200) for name in answers}


@pytest_twisted.ensureDeferred
async def test_a_client_without_http2_still_gets_http11(tls_chatd) -> None:
    running = await tls_chatd()

    async def fetch() -> str:
        async with httpx.AsyncClient(http2=False, verify=client_context(running.cert), timeout=WAIT) as client:
            response = await client.get(https(running, "ws", "/health"))
            assert response.status_code == 200
            return response.http_version

    assert await in_thread(fetch) == "HTTP/1.1"


@pytest_twisted.ensureDeferred
async def test_websocket_upgrade_works_beside_http2_on_the_same_tls_listener(tls_chatd) -> None:
    running = await tls_chatd()

    async def health_over_h2() -> str:
        async with h2_client(running) as client:
            return (await client.get(https(running, "ws", "/health"))).http_version

    def chat_over_wss() -> list[dict]:
        # A browser offers only http/1.1 by ALPN for a WebSocket, as this client does.
        context = threaded_client_context(running.cert)
        context.set_alpn_protocols(["http/1.1"])
        url = running.url("ws", "wss", "/ws")
        with Client(url, ssl=context) as alice, Client(url, ssl=context) as bob:
            alice.join("tls", "alice")
            bob.join("tls", "bob")
            alice.send(type="message", room="tls", message="over wss", ref=1)
            alice.recv_type("sent")
            return [bob.recv_until(lambda m: m.get("type") == "message")]

    assert await in_thread(health_over_h2) == "HTTP/2"
    (message,) = await deferToThread(chat_over_wss)
    assert (message["user"], message["message"]) == ("alice", "over wss")


async def _event_stream_events(stream: Any, events: asyncio.Queue) -> None:
    """Put every SignalR record of a ``text/event-stream`` response on ``events``.

    Lines are split on CRLF by hand: ``str.splitlines`` (httpx's
    ``aiter_lines``) also splits on the record separator 0x1E.
    """
    buffered = b""
    async for chunk in stream.aiter_bytes():
        buffered += chunk
        *lines, buffered = buffered.split(b"\r\n")
        for line in lines:
            if line.startswith(b"data: "):
                for record in line[6:].split(b"\x1e"):
                    if record:  # the handshake's answer is no hub message: not for JsonCodec
                        await events.put(orjson.loads(record))


async def _next_message(events: asyncio.Queue) -> dict:
    """The next ``ReceiveMessage`` invocation (pings and completions pass)."""
    while True:
        record = await asyncio.wait_for(events.get(), WAIT)
        if record.get("target") == "ReceiveMessage":
            return record


@pytest_twisted.ensureDeferred
async def test_signalr_server_sent_events_over_http2_send_and_receive(tls_chatd) -> None:
    running = await tls_chatd()
    url = https(running, "signalr", "/signalr")

    async def chat() -> dict[str, Any]:
        async with h2_client(running) as client:
            # Two SignalR connections, each with its event stream open, on one HTTP/2 connection.
            streams, queues, tokens, versions = [], [], [], []
            try:
                for user in ("ada", "bob"):
                    negotiated = await client.post(f"{url}/negotiate?negotiateVersion=1&user={user}")
                    token = negotiated.json()["connectionToken"]
                    stream = client.stream("GET", url, params={"id": token}, headers={"Accept": "text/event-stream"})
                    response = await stream.__aenter__()
                    streams.append(stream)
                    assert response.headers["content-type"] == "text/event-stream"
                    versions.append(response.http_version)
                    events: asyncio.Queue = asyncio.Queue()
                    reader = asyncio.create_task(_event_stream_events(response, events))
                    post = await client.post(url, params={"id": token}, content=HANDSHAKE)
                    versions.append(post.http_version)
                    assert await asyncio.wait_for(events.get(), WAIT) == {}  # the handshake's answer
                    queues.append(events)
                    tokens.append(token)
                sent = await client.post(url, params={"id": tokens[0]}, content=invocation("SendMessage", "ada", "hi"))
                versions.append(sent.http_version)
                received = [await _next_message(q) for q in queues]
                reply = await client.post(url, params={"id": tokens[1]}, content=invocation("SendMessage", "bob", "yo"))
                versions.append(reply.http_version)
                replies = [await _next_message(q) for q in queues]
                reader.cancel()
                return {"versions": versions, "received": received, "replies": replies}
            finally:
                for stream in streams:
                    await stream.__aexit__(None, None, None)

    result = await in_thread(chat)
    assert set(result["versions"]) == {"HTTP/2"}
    assert [r["arguments"] for r in result["received"]] == [["ada", "hi", "general"]] * 2
    assert [r["arguments"] for r in result["replies"]] == [["bob", "yo", "general"]] * 2


@pytest_twisted.ensureDeferred
async def test_signalr_long_polling_over_http2_send_and_receive(tls_chatd) -> None:
    running = await tls_chatd()
    url = https(running, "signalr", "/signalr")

    async def chat() -> dict[str, Any]:
        versions: list[str] = []

        async def call(method: str, **kwargs: Any) -> Any:
            response = await client.request(method, url, **kwargs)
            versions.append(response.http_version)
            assert response.status_code == 200, response.text
            return response

        async with h2_client(running) as client:
            negotiated = await client.post(f"{url}/negotiate?negotiateVersion=1&user=ada")
            versions.append(negotiated.http_version)
            token = negotiated.json()["connectionToken"]
            first = await call("GET", params={"id": token})  # opens the long-polling transport
            assert first.content == b""
            await call("POST", params={"id": token}, content=HANDSHAKE)
            assert (await call("GET", params={"id": token})).content == b"{}\x1e"
            # A poll waits on the same HTTP/2 connection while the send goes beside it.
            poll = asyncio.create_task(call("GET", params={"id": token}))
            await call("POST", params={"id": token}, content=invocation("SendMessage", "ada", "polled"))
            received = records((await asyncio.wait_for(poll, WAIT)).content)
            completion = records((await call("GET", params={"id": token})).content)
            await client.delete(url, params={"id": token})
        return {"versions": versions, "received": received + completion}

    result = await in_thread(chat)
    assert set(result["versions"]) == {"HTTP/2"}
    messages = [r for r in result["received"] if r.get("target") == "ReceiveMessage"]
    assert [m["arguments"] for m in messages] == [["ada", "polled", "general"]]
    (completion,) = [r for r in result["received"] if r.get("type") == 3]
    assert completion["invocationId"] == "1" and "error" not in completion


# -- eight browser tabs on Server-Sent Events ----------------------------------


TABS = 8  # more than the six HTTP/1.1 connections a browser opens to one host

_START_SSE = """async ([url, user]) => {
  window.received = [];
  const connection = new signalR.HubConnectionBuilder()
    .withUrl(url, { transport: signalR.HttpTransportType.ServerSentEvents })
    .configureLogging(signalR.LogLevel.Warning)
    .build();
  connection.on("ReceiveMessage", (user, message, room) => window.received.push(user + ": " + message));
  await connection.start();
  window.connection = connection;
}"""


@pytest_twisted.ensureDeferred
async def test_eight_chromium_tabs_on_server_sent_events_all_chat_over_http2(tls_chatd, tmp_path) -> None:
    from tests.test_browser import CHROMIUM_ARGS, WAIT_MS, require_tool, sync_playwright

    chromium = require_tool("chromium")
    require(sync_playwright is not None, "playwright is not installed (pip install '.[test]')")
    require(SIGNALR_JS.exists(), "the official SignalR client is not installed (scripts/install-test-deps)")
    running = await tls_chatd()
    page_url = https(running, "web", "/")
    hub_url = https(running, "signalr", "/signalr")

    def scenario() -> dict[str, Any]:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                # One profile, as a person's tabs are: they share the browser's connection limits.
                # The certificate is self-signed; the page's CSP would refuse the injected client.
                context = browser.new_context(ignore_https_errors=True, bypass_csp=True)
                context.set_default_timeout(WAIT_MS)
                pages, protocols, errors = [], [], []
                for i in range(TABS):
                    page = context.new_page()
                    # What the browser itself says each response came over (Chrome DevTools Protocol).
                    devtools = context.new_cdp_session(page)
                    devtools.on("Network.responseReceived", lambda e: protocols.append(
                        (e["response"]["url"].split("?")[0], e["response"].get("protocol"))))
                    devtools.send("Network.enable")
                    page.on("pageerror", lambda e, i=i: errors.append(f"tab{i}: {e}"))
                    page.goto(page_url)
                    page.add_script_tag(path=str(SIGNALR_JS))
                    page.evaluate(_START_SSE, [f"{hub_url}?user=tab{i}", f"tab{i}"])
                    pages.append(page)
                for i, page in enumerate(pages):
                    page.evaluate("([u, m]) => window.connection.invoke('SendMessage', u, m)", [f"tab{i}", f"hello {i}"])
                expected = sorted(f"tab{i}: hello {i}" for i in range(TABS))
                seen = []
                for page in pages:
                    page.wait_for_function(f"window.received.length >= {TABS}")
                    seen.append(sorted(page.evaluate("window.received")))
                transports = [page.evaluate("window.connection.connection.transport.constructor.name") for page in pages]
                for page in pages:
                    page.evaluate("window.connection.stop()")
                return {"protocols": protocols, "seen": seen, "expected": expected, "transports": transports,
                        "errors": errors}
            finally:
                browser.close()

    result = await deferToThread(scenario)
    urls = {url for url, _ in result["protocols"]}
    assert {page_url, f"{hub_url}/negotiate", hub_url} <= urls
    assert {protocol for _, protocol in result["protocols"]} == {"h2"}, result["protocols"]
    assert result["seen"] == [result["expected"]] * TABS
    assert result["errors"] == []
    assert set(result["transports"]) == {"ServerSentEventsTransport"}



@pytest_twisted.ensureDeferred
async def test_an_http2_connection_outlives_the_http11_request_deadline(tls_chatd) -> None:
    # --handshake-timeout bounds how long an HTTP/1.1 request may take to arrive; an HTTP/2
    # connection carrying an event stream is not an HTTP/1.1 request and must not be cut by it.
    running = await tls_chatd("--handshake-timeout", "1", "--signalr-keep-alive", "1")
    url = https(running, "signalr", "/signalr")

    async def stream_past_the_deadline() -> list[dict]:
        async with h2_client(running) as client:
            token = (await client.post(f"{url}/negotiate?negotiateVersion=1&user=ada")).json()["connectionToken"]
            async with client.stream("GET", url, params={"id": token}, headers={"Accept": "text/event-stream"}) as r:
                assert r.http_version == "HTTP/2"
                events: asyncio.Queue = asyncio.Queue()
                reader = asyncio.create_task(_event_stream_events(r, events))
                await client.post(url, params={"id": token}, content=HANDSHAKE)
                seen = [await asyncio.wait_for(events.get(), WAIT) for _ in range(4)]  # {} then 3 pings: > 2 s
                await client.post(url, params={"id": token}, content=invocation("SendMessage", "ada", "still here"))
                seen.append(await _next_message(events))
                reader.cancel()
            return seen, (await client.get(https(running, "ws", "/metrics"))).text

    seen, metrics = await in_thread(stream_past_the_deadline)
    # The deadline did not fire on it (over TLS its close would wait behind the HTTP/2 stream).
    assert "chatd_limit_refusals" in metrics and 'limit="handshake_timeout"' not in metrics
    assert seen[0] == {} and all(record == {"type": 6} for record in seen[1:4])
    assert seen[4]["arguments"] == ["ada", "still here", "general"]
