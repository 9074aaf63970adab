"""Attack pass of 2026-12-04: a full room's history (a reply, a resume) over every transport of a client that reads.

Each test drives a ``twistd -n chatd`` subprocess (``tests.daemon.Daemon``)
the way a hostile or merely unlucky client would, with blocking clients.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import grpc
import pytest
from websockets.sync.client import connect

from chatd.grpc.generated import chat_pb2 as pb
from chatd.grpc.generated.chat_pb2_grpc import ChatServiceStub
from tests.daemon import Daemon

RS = "\x1e"
HANDSHAKE = (json.dumps({"protocol": "json", "version": 1}) + RS).encode()
#: at the default limits (--history-limit 100, --max-message-length 4096) a room may hold
#: 100 messages of 4,096 three-byte characters: about 1.2 MB of JSON, over the default
#: --write-buffer-size (1 MiB)
EURO_MESSAGE = "\u20ac" * 4096
CONTROL_MESSAGE = "\x01" * 4096


def _http(d: Daemon, method: str, path: str, body: bytes | None = None, headers=None, timeout: float = 10):
    request = urllib.request.Request(
        d.url("signalr", path=path), method=method, data=body, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _negotiate(d: Daemon, user: str) -> str:
    status, body = _http(d, "POST", f"/signalr/negotiate?negotiateVersion=1&user={user}", b"")
    assert status == 200, (status, body)
    return json.loads(body)["connectionToken"]


def _fill(d: Daemon, room: str, text: str, count: int = 100) -> None:
    """``count`` messages of ``text`` in ``room``, each acknowledged (stored)."""
    with connect(d.ws_url, open_timeout=10, max_size=None) as ws:
        ws.send(json.dumps({"type": "join", "room": room, "user": "filler"}))
        sent = 0
        for i in range(count):
            ws.send(json.dumps({"type": "message", "room": room, "message": text, "ref": i}))
        while sent < count:
            reply = json.loads(ws.recv(timeout=10))
            assert reply.get("type") != "error", reply
            if reply.get("type") == "sent":
                sent += 1


def _records(body: bytes) -> list[dict]:
    return [json.loads(r) for r in body.decode().split(RS) if r]


def _long_poll_call(d: Daemon, target: str, arguments: list, polls: int) -> list[dict]:
    """A long-polling client's invocation of ``target``; every record it polls until a completion or a close."""
    token = _negotiate(d, "lp")
    assert _http(d, "GET", f"/signalr?id={token}")[0] == 200  # the first poll opens the transport
    assert _http(d, "POST", f"/signalr?id={token}", HANDSHAKE)[0] == 200
    assert _http(d, "GET", f"/signalr?id={token}")[1] == b"{}" + RS.encode()
    call = {"type": 1, "invocationId": "1", "target": target, "arguments": arguments}
    assert _http(d, "POST", f"/signalr?id={token}", (json.dumps(call) + RS).encode())[0] == 200
    seen: list[dict] = []
    for _ in range(polls):
        status, body = _http(d, "GET", f"/signalr?id={token}", timeout=30)
        if status != 200:
            break
        seen += _records(body)
        if any(r.get("type") in (3, 7) for r in seen):
            break
    return seen


# -- 1. SignalR over HTTP: a room's history is more than the write budget -----------------


@pytest.mark.parametrize(
    "text",
    [
        EURO_MESSAGE,
        # The most JSON there can be of a message: every character a control character, six bytes (\u0001).
        CONTROL_MESSAGE,
    ],
    ids=["three-byte", "escaped"],
)
def test_long_polling_get_history_of_a_full_room_at_default_limits_is_answered(text: str) -> None:
    """GetHistory over long polling of a room the defaults allow (100 x 4,096 '€', ~1.2 MB).

    The long-polling transport counts every byte not yet polled against
    ``--write-buffer-size`` the moment it is written, so the one Completion
    record carrying the history (1.2 MB) closes the connection as
    ``too slow: more than 1048576 bytes not polled`` although the client is
    polling the whole time. A client that polls must get its answer.
    """
    with Daemon("--max-message-rate", "0", "--max-connection-rate", "0") as d:
        d.wait_healthy()
        _fill(d, "big", text)
        seen = _long_poll_call(d, "GetHistory", ["big"], polls=20)
        closes = [r for r in seen if r.get("type") == 7]
        assert not closes, f"a polling client was closed: {closes}"
        completions = [r for r in seen if r.get("type") == 3 and r.get("invocationId") == "1"]
        assert completions and "error" not in completions[0], seen[-3:]
        assert completions[0]["result"], "no history in the completion"


def test_server_sent_events_resume_of_a_full_room_at_default_limits_replays_everything() -> None:
    """JoinRoom(room, user, since=0) over SSE on a room the defaults allow (~1.2 MB kept).

    The replay is written in one reactor turn, so the event stream's send
    budget (which counts once Twisted's 64 KiB buffer has paused it) passes
    1 MiB before the client can read: the connection is closed as too slow
    after about 90 of the 100 messages, and the stream simply ends (the
    Close record saying why is dropped as over budget too). A client that
    reads must be able to resume, as the docs say.
    """
    with Daemon("--max-message-rate", "0", "--max-connection-rate", "0") as d:
        d.wait_healthy()
        _fill(d, "big", EURO_MESSAGE)
        token = _negotiate(d, "sse")
        stream = socket.create_connection(("127.0.0.1", d.ports["signalr"]), timeout=10)
        try:
            stream.sendall(
                f"GET /signalr?id={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode()
            )
            time.sleep(0.3)
            assert _http(d, "POST", f"/signalr?id={token}", HANDSHAKE)[0] == 200
            call = {"type": 1, "invocationId": "1", "target": "JoinRoom", "arguments": ["big", "sse", 0]}
            assert _http(d, "POST", f"/signalr?id={token}", (json.dumps(call) + RS).encode())[0] == 200
            data = b""
            stream.settimeout(5)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and b'"type":3' not in data:
                try:
                    chunk = stream.recv(1 << 20)
                except TimeoutError:
                    break
                if not chunk:
                    break
                data += chunk
        finally:
            stream.close()
        replayed = data.count(b'"target":"ReceiveMessage"')
        assert b'"type":3' in data, (
            f"no JoinRoom completion; {replayed} of 100 messages replayed, then the stream ended"
        )
        assert replayed == 100


def test_long_polling_resume_of_a_full_room_at_default_limits_replays_everything() -> None:
    """JoinRoom(room, user, since=0) over long polling on a room the defaults allow (~1.2 MB kept).

    The replay's 100 ReceiveMessage records are queued for the client in one
    turn and counted against ``--write-buffer-size`` before the first of them
    can be polled (one record per poll), so the resume ends in
    ``too slow: more than 1048576 bytes not polled``.
    """
    with Daemon("--max-message-rate", "0", "--max-connection-rate", "0") as d:
        d.wait_healthy()
        _fill(d, "big", EURO_MESSAGE)
        seen = _long_poll_call(d, "JoinRoom", ["big", "lp", 0], polls=300)
        closes = [r for r in seen if r.get("type") == 7]
        assert not closes, f"a polling client was closed: {closes}"
        assert sum(1 for r in seen if r.get("target") == "ReceiveMessage") == 100


def test_grpc_resume_of_a_room_keeping_more_than_the_stream_queue_replays_everything() -> None:
    """``StreamMessages`` with ``since_seq`` 0 on a room that keeps more messages than ``--grpc-stream-queue``.

    The replay is queued in one reactor turn; a stream's queue past
    ``--grpc-stream-queue`` events ends it as too slow, so with
    ``--history-limit`` above it (1,500 against 1,000) a resume could never
    succeed. The queue must hold a full room's history.
    """
    with Daemon("--max-message-rate", "0", "--max-connection-rate", "0", "--history-limit", "1500") as d:
        d.wait_healthy()
        _fill(d, "deep", "m", count=1500)
        with grpc.insecure_channel(f"127.0.0.1:{d.ports['grpc']}") as channel:
            stream = ChatServiceStub(channel).StreamMessages(pb.StreamRequest(room="deep", user="g", since_seq=0), timeout=30)
            seqs = []
            for message in stream:
                seqs.append(message.seq)
                if len(seqs) == 1500:
                    stream.cancel()
                    break
        assert seqs == list(range(1, 1501))
