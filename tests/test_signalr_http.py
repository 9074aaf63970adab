"""SignalR's HTTP edges over real sockets: what twisted.web does before a resource sees a request."""

from __future__ import annotations

import http.client
import json

import pytest_twisted
from twisted.internet.threads import deferToThread

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
