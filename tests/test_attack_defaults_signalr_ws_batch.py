"""A SignalR WebSocket message may carry many records, as the official .NET client sends them.

The .NET client (``Microsoft.AspNetCore.Http.Connections.Client``'s
``WebSocketsTransport``) sends everything its pipe holds as ONE WebSocket
message: hub messages written while the previous send was in flight (a
loop of ``SendAsync``, concurrent ``InvokeAsync``, stream items) go
together, and ASP.NET Core reads them as a stream of records, each bounded
by ``MaximumReceiveMessageSize``. chatd bounded the whole WebSocket message
by one record's limit (Autobahn's ``maxMessagePayloadSize`` =
``--read-buffer-size``, 64 KiB): twenty 4,000-character messages sent at
once closed the connection with 1009 and nothing was published. Long
polling and SSE POSTs already take ``_RECORDS_PER_POST`` records at once.
"""

from __future__ import annotations

import json
import urllib.request

from websockets.sync.client import connect

from tests.daemon import Daemon

RS = "\x1e"


def test_batched_records_in_one_websocket_message_are_all_taken() -> None:
    with Daemon("--max-connection-rate", "0", "--max-message-rate", "0") as d:
        d.wait_healthy()
        negotiate = urllib.request.Request(
            d.url("signalr", path="/signalr/negotiate?negotiateVersion=1&user=ada"), method="POST", data=b""
        )
        with urllib.request.urlopen(negotiate, timeout=10) as r:
            token = json.loads(r.read())["connectionToken"]
        with connect(d.url("signalr", "ws", f"/signalr?id={token}"), open_timeout=10, max_size=None) as ws:
            ws.send(json.dumps({"protocol": "json", "version": 1}) + RS)
            assert ws.recv(timeout=10).startswith("{}" + RS)
            batch = "".join(
                json.dumps(
                    {"type": 1, "invocationId": str(i), "target": "SendMessage", "arguments": ["ada", f"{i:04d}" * 1000]}
                )
                + RS
                for i in range(20)
            )
            assert len(batch.encode()) > 65536
            ws.send(batch)
            done: set[str] = set()
            while len(done) < 20:
                for record in ws.recv(timeout=10).split(RS):
                    if record:
                        message = json.loads(record)
                        if message.get("type") == 3:
                            assert "error" not in message, message
                            done.add(message["invocationId"])
