"""One room, three protocols at once: every receiver sees one order.

Senders on WebSocket (the ``websockets`` library), SignalR (its JSON hub
protocol over a ``websockets`` connection, as any client speaks it) and gRPC
(grpcio) publish into the same room at the same time; receivers on all three
must each see every message once, in the room's gap-free ``seq`` order, and
each sender's messages in the order it sent them.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest_twisted
from twisted.internet.threads import deferToThread
from websockets.sync.client import connect

from chatd.grpc.generated import chat_pb2 as pb
from chatd.grpc.generated.chat_pb2_grpc import ChatServiceStub
from tests import grpcservers
from tests.wsclient import Client

grpc_server = grpcservers.grpc_server  # a test that asks for it runs on both gRPC servers

ROOM = "mix"
PER_SENDER = 40
TOTAL = 3 * PER_SENDER
TIMEOUT = 20
RS = "\x1e"  # SignalR's record separator


class SignalRClient:
    """A SignalR JSON-protocol client over one WebSocket: invocations out, records in."""

    def __init__(self, url: str) -> None:
        self._cm = connect(url, open_timeout=10, max_queue=None)
        self.ws = self._cm.__enter__()
        self._records: list[dict] = []
        self._ids = iter(range(1, 1 << 30))
        self.ws.send(json.dumps({"protocol": "json", "version": 1}) + RS)
        assert self.next() == {}, "SignalR handshake refused"

    def next(self) -> dict:
        """The next record from the server, pings skipped."""
        while True:
            while not self._records:
                frame = self.ws.recv(timeout=TIMEOUT)
                self._records = [json.loads(r) for r in frame.split(RS) if r]
            record = self._records.pop(0)
            if record.get("type") != 6:
                return record

    def invoke(self, target: str, *args: Any, kind: int = 1) -> str:
        invocation_id = str(next(self._ids))
        body = {"type": kind, "invocationId": invocation_id, "target": target, "arguments": list(args)}
        self.ws.send(json.dumps(body) + RS)
        return invocation_id

    def call(self, target: str, *args: Any, seen: list[dict] | None = None) -> Any:
        """Invoke and wait for the completion; other records go to ``seen``."""
        invocation_id = self.invoke(target, *args)
        while True:
            record = self.next()
            if record.get("type") == 3 and record.get("invocationId") == invocation_id:
                assert "error" not in record, record
                return record.get("result")
            if seen is not None:
                seen.append(record)

    def close(self) -> None:
        self._cm.__exit__(None, None, None)

    def __enter__(self) -> SignalRClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _key(m: dict) -> tuple:
    return (m["seq"], m["user"], m["message"], m["protocol"])


@pytest_twisted.ensureDeferred
async def test_concurrent_senders_on_three_protocols_are_seen_in_one_seq_order_everywhere(start, grpc_server) -> None:
    running = await start("--max-message-rate", "0", "--history-limit", "500", "--grpc-server", grpc_server)
    signalr_url = running.url("signalr", "ws", "/signalr")

    def scenario() -> None:
        ws_reader, ws_sender = Client(running.ws_url), Client(running.ws_url)
        sr_reader, sr_sender = (
            SignalRClient(signalr_url + "?user=sr-reader"),
            SignalRClient(signalr_url + "?user=sr-sender"),
        )
        channel = grpc.insecure_channel(running.grpc_target)
        stub = ChatServiceStub(channel)
        try:
            ws_reader.join(ROOM, "ws-reader")
            ws_sender.join(ROOM, "ws-sender")
            sr_reader_early: list[dict] = []
            sr_reader.call("JoinRoom", ROOM, seen=sr_reader_early)
            stream_id = sr_reader.invoke("StreamRoom", ROOM, kind=4)
            # Records of one connection are handled in order: once this call
            # completes, the StreamRoom before it is live.
            sr_reader.call("GetUsers", ROOM, seen=sr_reader_early)
            sr_sender_early: list[dict] = []
            sr_sender.call("JoinRoom", ROOM, seen=sr_sender_early)
            # since_seq=0: whenever the stream starts, it gets every message from seq 1.
            grpc_stream = stub.StreamMessages(
                pb.StreamRequest(room=ROOM, user="grpc-reader", since_seq=0), timeout=60
            )
            go = threading.Barrier(3, timeout=TIMEOUT)

            def send_ws() -> None:
                go.wait()
                for i in range(PER_SENDER):
                    ws_sender.send(type="message", room=ROOM, message=f"ws {i}")

            def send_signalr() -> list[str]:
                go.wait()
                return [
                    sr_sender.invoke("SendToRoom", ROOM, "sr-sender", f"sr {i}") for i in range(PER_SENDER)
                ]

            def send_grpc() -> None:
                go.wait()
                for i in range(PER_SENDER):
                    stub.SendMessage(
                        pb.MessageRequest(user="grpc-sender", message=f"grpc {i}", room=ROOM), timeout=10
                    )

            def read_ws(client: Client) -> list[tuple]:
                return [_key(client.recv_type("message")) for _ in range(TOTAL)]

            def read_grpc() -> list[tuple]:
                got = []
                for m in grpc_stream:
                    got.append((m.seq, m.user, m.message, m.protocol))
                    if len(got) == TOTAL:
                        break
                grpc_stream.cancel()
                return got

            def read_signalr(client: SignalRClient, early: list[dict], stream: str | None) -> dict[str, list]:
                """ReceiveMessage calls (user, text) and, with a stream, its items; plus completions."""
                calls: list[tuple] = []
                items: list[tuple] = []
                completions: list[dict] = []
                pending = list(early)
                while len(calls) < TOTAL or (stream and len(items) < TOTAL):
                    record = pending.pop(0) if pending else client.next()
                    if record.get("type") == 1 and record.get("target") == "ReceiveMessage":
                        user, text, room = record["arguments"]
                        if room == ROOM:
                            calls.append((user, text))
                    elif record.get("type") == 2 and record.get("invocationId") == stream:
                        items.append(_key(record["item"]))
                    elif record.get("type") == 3:
                        completions.append(record)
                return {"calls": calls, "items": items, "completions": completions}

            with ThreadPoolExecutor(max_workers=8) as pool:
                readers = {
                    "websocket reader": pool.submit(read_ws, ws_reader),
                    "websocket sender": pool.submit(read_ws, ws_sender),
                    "grpc reader": pool.submit(read_grpc),
                    "signalr reader": pool.submit(read_signalr, sr_reader, sr_reader_early, stream_id),
                    "signalr sender": pool.submit(read_signalr, sr_sender, sr_sender_early, None),
                }
                senders = [pool.submit(send_ws), pool.submit(send_signalr), pool.submit(send_grpc)]
                signalr_ids = senders[1].result(timeout=60)
                for sender in senders:
                    sender.result(timeout=60)
                got = {name: future.result(timeout=60) for name, future in readers.items()}
        finally:
            for client in (ws_reader, ws_sender, sr_reader, sr_sender):
                client.close()
            channel.close()

        reference = got["websocket reader"]
        assert [m[0] for m in reference] == list(range(1, TOTAL + 1)), "seq is gap-free from 1"
        for who, protocol in (("ws", "websocket"), ("sr", "signalr"), ("grpc", "grpc")):
            mine = [m for m in reference if m[2].startswith(f"{who} ")]
            assert [m[2] for m in mine] == [f"{who} {i}" for i in range(PER_SENDER)], "a sender's own order"
            assert {m[3] for m in mine} == {protocol}
        assert got["websocket sender"] == reference
        assert got["grpc reader"] == reference
        assert got["signalr reader"]["items"] == reference
        by_seq = [(user, text) for _, user, text, _ in reference]
        assert got["signalr reader"]["calls"] == by_seq
        assert got["signalr sender"]["calls"] == by_seq
        # Every SignalR send was acknowledged without error.
        done = {c["invocationId"]: c for c in got["signalr sender"]["completions"]}
        assert all(i in done and "error" not in done[i] for i in signalr_ids)

    await deferToThread(scenario)
