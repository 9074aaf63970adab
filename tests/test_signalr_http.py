"""SignalR over real sockets: what twisted.web does before a resource sees a request,
the skip-negotiation WebSocket path, and a WebSocket client that stops reading.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket

import pytest_twisted
from twisted.internet.threads import deferToThread
from websockets.sync.client import connect

HANDSHAKE = b'{"protocol":"json","version":1}\x1e'


def _call(port: int, method: str, path: str, body=None, headers=None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=not isinstance(body, bytes | None))
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_oversized_bodies_get_413_and_the_connection_carries_on(start):
    running = await start()
    port = running.ports["signalr"]
    limit = running.service.getServiceNamed("signalr").factory.body_limit

    def scenario():
        status, text = _call(port, "POST", "/signalr/negotiate?negotiateVersion=1", b"x" * (64 << 20))
        assert status == 413 and b"too large" in text
        status, text = _call(port, "POST", "/signalr/negotiate?negotiateVersion=1&user=ada")
        token = json.loads(text)["connectionToken"]
        assert _call(port, "GET", "/signalr?id=" + token)[0] == 200  # long polling starts
        assert _call(port, "POST", "/signalr?id=" + token, HANDSHAKE)[0] == 200
        assert _call(port, "GET", "/signalr?id=" + token) == (200, b"{}\x1e")
        pings = b'{"type":6}\x1e' * (limit // 11 + 1)
        status, text = _call(port, "POST", "/signalr?id=" + token, pings)
        assert (status, text) == (413, f"Request body too large: the limit is {limit} bytes".encode())
        # Without a Content-Length (chunked), the bytes read are counted.
        chunks = iter([pings[i : i + 65536] for i in range(0, len(pings), 65536)])
        assert _call(port, "POST", "/signalr?id=" + token, chunks)[0] == 413
        call = b'{"type":1,"invocationId":"1","target":"GetUsers","arguments":["general"]}\x1e'
        assert _call(port, "POST", "/signalr?id=" + token, call)[0] == 200
        status, reply = _call(port, "GET", "/signalr?id=" + token)
        assert status == 200 and json.loads(reply[:-1]) == {"type": 3, "invocationId": "1", "result": ["ada"]}

    await deferToThread(scenario)
    assert [s.user for s in running.hub.sessions.values()] == ["ada"]


# -- skipNegotiation: the WebSocket creates the connection ----------------------------------


def _open_ws(url: str, **options):
    """A websockets sync connection kept open past this call (blocking: run it in a thread)."""
    return connect(url, open_timeout=10, **options).__enter__()


def _skip_negotiation_handshake(url: str) -> tuple[str, bool]:
    """Connect without negotiate, send the handshake: its response, and whether the server then closed."""
    from websockets.exceptions import ConnectionClosed

    with connect(url, open_timeout=10) as ws:
        ws.send('{"protocol":"json","version":1}\x1e')
        response = ws.recv(timeout=10)
        try:
            ws.recv(timeout=10)
        except ConnectionClosed:
            return response, True
        return response, False


@pytest_twisted.ensureDeferred
async def test_skip_negotiation_websocket_on_a_full_server_gets_a_handshake_error(start):
    running = await start("--max-connections", "1")
    url = running.url("signalr", "ws", "/signalr?user=late")
    first = await deferToThread(_open_ws, running.url("signalr", "ws", "/signalr?user=first"))
    try:
        await deferToThread(first.send, '{"protocol":"json","version":1}\x1e')
        assert await deferToThread(first.recv, 10) == "{}\x1e"
        response, closed = await deferToThread(_skip_negotiation_handshake, url)
        assert response == '{"error":"server full: 1 connections open, try again later"}\x1e' and closed
        assert [s.user for s in running.hub.sessions.values()] == ["first"]
        manager = running.service.getServiceNamed("signalr").factory.manager
        assert len(manager.connections) == 1  # the refused one is forgotten
    finally:
        await deferToThread(first.close)


@pytest_twisted.ensureDeferred
async def test_skip_negotiation_websocket_during_shutdown_gets_a_handshake_error(start):
    running = await start()
    running.hub.closing = True  # what stopService sets first
    url = running.url("signalr", "ws", "/signalr?user=late")
    response, closed = await deferToThread(_skip_negotiation_handshake, url)
    assert response == '{"error":"server shutting down, try again shortly"}\x1e' and closed
    assert not running.hub.sessions
    assert not running.service.getServiceNamed("signalr").factory.manager.connections


# -- a WebSocket client that stops reading ----------------------------------------------------


class _NonReader:
    """A SignalR WebSocket client over a raw socket that, once open, never reads again."""

    def __init__(self, port: int, user: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET /signalr?user={user} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        received = b""
        while b"\r\n\r\n" not in received:
            received += self.sock.recv(1)
        assert received.startswith(b"HTTP/1.1 101"), received
        self._send_text(b'{"protocol":"json","version":1}\x1e')
        while b"{}\x1e" not in received:  # open: from here on, nothing is read
            received += self.sock.recv(1)

    def _send_text(self, payload: bytes) -> None:
        mask = os.urandom(4)
        assert len(payload) < 126
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)

    def close(self) -> None:
        self.sock.close()


@pytest_twisted.ensureDeferred
async def test_websocket_client_that_stops_reading_is_closed_and_others_carry_on(start):
    limit = 256 * 1024
    running = await start("--write-buffer-size", str(limit), "--max-message-rate", "0")
    hub = running.hub
    port = running.ports["signalr"]
    slow = await deferToThread(_NonReader, port, "slow")
    good = await deferToThread(_open_ws, running.url("signalr", "ws", "/signalr?user=good"), max_queue=None)
    try:
        await deferToThread(good.send, '{"protocol":"json","version":1}\x1e')
        assert await deferToThread(good.recv, 10) == "{}\x1e"
        (slow_session,) = [s for s in hub.sessions.values() if s.user == "slow"]

        def read_until(text: str) -> None:
            while True:
                for raw in good.recv(timeout=10).split("\x1e"):
                    if raw and json.loads(raw).get("arguments", [None, None])[1] == text:
                        return

        text = "x" * 4000
        batches = 0
        # Batches the good client reads before the next is sent; the slow one's kernel
        # buffers fill, then its send budget, within a few megabytes.
        while slow_session.id in hub.sessions:
            batches += 1
            assert batches < 1000, "the client that does not read was never closed"
            for _ in range(15):
                hub.publish("general", "eve", text, "websocket")
            hub.publish("general", "eve", f"mark {batches}", "websocket")
            await deferToThread(read_until, f"mark {batches}")
        assert slow_session.connection.close_error == f"too slow: more than {limit} bytes waiting to be sent"
        registry = hub.metrics.registry
        assert registry.get_sample_value("chatd_sessions_closed_slow_total", {"protocol": "signalr"}) == 1
        hub.publish("general", "eve", "after", "websocket")
        await deferToThread(read_until, "after")
        assert [s.user for s in hub.sessions.values()] == ["good"]
    finally:
        await deferToThread(good.close)
        slow.close()


# -- the direct write path (SignalRSession.deliver) --------------------------------------------


@pytest_twisted.ensureDeferred
async def test_websocket_deliveries_take_the_direct_path_and_keep_the_protocol(start):
    """JSON and MessagePack clients over a plain WebSocket get every event as the codec encodes it,
    in order, while the server writes frames straight to the socket; a delivery counts for the
    keep-alive, and once the server's close frame is out no data frame follows it."""
    import msgpack

    running = await start("--max-message-rate", "0")
    hub = running.hub
    json_ws = await deferToThread(_open_ws, running.url("signalr", "ws", "/signalr?user=jay"), max_queue=None)
    pack_ws = await deferToThread(_open_ws, running.url("signalr", "ws", "/signalr?user=max"), max_queue=None)
    try:
        await deferToThread(json_ws.send, '{"protocol":"json","version":1}\x1e')
        assert await deferToThread(json_ws.recv, 10) == "{}\x1e"
        await deferToThread(pack_ws.send, '{"protocol":"messagepack","version":1}\x1e')
        assert await deferToThread(pack_ws.recv, 10) == b"{}\x1e"
        sessions = {s.user: s for s in hub.sessions.values()}
        for user in ("jay", "max"):
            transport = sessions[user].connection.transport
            assert transport.direct is transport.transport and transport.direct.direct  # the path under test

        def read(ws, decode, count: int) -> list:
            """Every record up to the count-th ReceiveMessage (presence and pings included)."""
            records: list = []
            while sum(1 for r in records if "ReceiveMessage" in str(r)) < count:
                records.extend(decode(ws.recv(timeout=10)))
            return records

        def json_records(frame: str) -> list:
            return [json.loads(r) for r in frame.split("\x1e") if r]

        def pack_records(frame: bytes) -> list:
            out, data = [], frame
            while data:  # each record: a varint length, then that many bytes of MessagePack
                size = shift = i = 0
                while True:
                    byte = data[i]
                    size |= (byte & 0x7F) << shift
                    i, shift = i + 1, shift + 7
                    if not byte & 0x80:
                        break
                out.append(msgpack.unpackb(data[i : i + size]))
                data = data[i + size :]
            return out

        # A delivery counts as the server's traffic for the keep-alive, whichever path wrote it
        # (the ping goes out only after a quiet spell since last_sent).
        for user in ("jay", "max"):
            sessions[user].connection.last_sent = 0.0
        texts = [f"m{i} é" for i in range(10)]
        for text in texts:
            hub.publish("general", "eve", text, "websocket")
        assert all(sessions[u].connection.last_sent > 0 for u in ("jay", "max"))
        got_json = await deferToThread(read, json_ws, json_records, len(texts))
        got_pack = await deferToThread(read, pack_ws, pack_records, len(texts))
        assert [r for r in got_json if r.get("target") == "ReceiveMessage"] == [
            {"type": 1, "target": "ReceiveMessage", "arguments": ["eve", t, "general"]} for t in texts
        ]
        assert [r for r in got_pack if r[0] == 1 and r[3] == "ReceiveMessage"] == [
            [1, {}, None, "ReceiveMessage", ["eve", t, "general"], []] for t in texts
        ]

        # Once the server's close frame is out (the session is in the room until the TCP
        # connection ends), a message to the room writes no data frame after it.
        raw = await deferToThread(_NonReader, running.ports["signalr"], "raw")
        try:
            (session,) = [s for s in hub.sessions.values() if s.user == "raw"]
            session.connection.transport.sendCloseFrame(code=1000, isReply=False)
            hub.publish("general", "eve", "after the close", "websocket")
            assert session.id in hub.sessions  # delivered to, not yet gone

            def frames_after_open() -> list[int]:
                data = b""
                raw.sock.settimeout(1)
                try:
                    while chunk := raw.sock.recv(65536):
                        data += chunk
                except TimeoutError:
                    pass
                opcodes = []
                while data:  # unmasked server frames, payloads under 64 KiB here
                    size, at = data[1] & 0x7F, 2
                    if size == 126:
                        size, at = int.from_bytes(data[2:4], "big"), 4
                    opcodes.append(data[0] & 0x0F)
                    data = data[at + size :]
                return opcodes

            opcodes = await deferToThread(frames_after_open)
            assert opcodes and opcodes[-1] == 0x8 and opcodes.count(0x8) == 1, opcodes
        finally:
            raw.close()
        assert [r for r in await deferToThread(read, pack_ws, pack_records, 1) if r[0] == 1 and r[3] == "ReceiveMessage"] == [
            [1, {}, None, "ReceiveMessage", ["eve", "after the close", "general"], []]
        ]
    finally:
        await deferToThread(json_ws.close)
        await deferToThread(pack_ws.close)
