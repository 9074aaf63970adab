"""Nothing acknowledged is lost: resume, idempotent sends, and restarts of a real daemon.

The daemon tests start ``twistd -n chatd`` on a data directory, talk to it
with the ``websockets`` library, stop it (SIGTERM, or SIGKILL right after
the acknowledgements) and start it again on the same directory.
"""

from __future__ import annotations

import signal

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests import grpcservers
from tests.daemon import Daemon
from tests.wsclient import Client

grpc_server = grpcservers.grpc_server  # a test that asks for it runs on both gRPC servers


def send_acked(ws: Client, room: str, text: str, **extra) -> dict:
    ref = f"ref-{text}"
    ws.send(type="message", room=room, message=text, ref=ref, **extra)
    return ws.recv_until(lambda f: f.get("ref") == ref)


@pytest_twisted.ensureDeferred
async def test_websocket_resume_gets_exactly_what_was_missed_then_live(chatd) -> None:
    def scenario() -> tuple[list[int], dict]:
        with Client(chatd.ws_url) as writer:
            writer.join("r", "writer")
            seqs = [send_acked(writer, "r", f"m{i}")["seq"] for i in range(6)]
            assert seqs == [1, 2, 3, 4, 5, 6]
            with Client(chatd.ws_url) as back:
                back.send(type="join", room="r", user="back", since=3)
                got: list[int] = []
                joined = None
                while joined is None:
                    frame = back.recv()
                    if frame["type"] == "message":
                        got.append(frame["seq"])
                    elif frame["type"] == "joined":
                        joined = frame
                send_acked(writer, "r", "live")
                got.append(back.recv_type("message")["seq"])
                return got, joined

    got, joined = await deferToThread(scenario)
    assert got == [4, 5, 6, 7]
    assert "truncated" not in joined


@pytest_twisted.ensureDeferred
async def test_websocket_resume_past_retention_is_told_what_is_gone(start) -> None:
    running = await start("--history-limit", "3", "--max-message-rate", "0")

    def scenario() -> tuple[list[int], dict]:
        with Client(running.ws_url) as writer, Client(running.ws_url) as back:
            writer.join("r", "writer")
            for i in range(8):
                send_acked(writer, "r", f"m{i}")
            back.send(type="join", room="r", user="back", since=2)
            got: list[int] = []
            while True:
                frame = back.recv()
                if frame["type"] == "message":
                    got.append(frame["seq"])
                elif frame["type"] == "joined":
                    return got, frame

    got, joined = await deferToThread(scenario)
    assert got == [6, 7, 8]
    assert joined["truncated"] is True and joined["first_seq"] == 6


@pytest_twisted.ensureDeferred
async def test_bad_since_is_refused_and_joins_nothing(chatd) -> None:
    def scenario() -> dict:
        with Client(chatd.ws_url) as ws:
            ws.send(type="join", room="r", user="u", since=-1, ref=1)
            return ws.recv()

    reply = await deferToThread(scenario)
    assert reply == {"type": "error", "error": "since must be a non-negative integer", "request": "join", "ref": 1}
    assert chatd.hub.members("r") == []


@pytest_twisted.ensureDeferred
async def test_a_retried_client_id_is_delivered_once_and_acknowledged_as_the_original(chatd) -> None:
    def scenario() -> tuple[dict, dict, dict, list[dict]]:
        with Client(chatd.ws_url) as sender, Client(chatd.ws_url) as watcher:
            watcher.join("r", "watcher")
            sender.join("r", "sender")
            first = send_acked(sender, "r", "once", client_id="abc-1")
            retry = send_acked(sender, "r", "once", client_id="abc-1")
            # the seed form takes a client_id too, and says sent without a ref
            sender.send(user="sender", room="r", message="once", client_id="abc-1")
            seed = sender.recv_type("sent")
            send_acked(sender, "r", "after")
            seen = []
            while not seen or seen[-1]["message"] != "after":
                seen.append(watcher.recv_type("message"))
            return first, retry, seed, seen

    first, retry, seed, seen = await deferToThread(scenario)
    assert (retry["id"], retry["seq"]) == (first["id"], first["seq"]) == (seed["id"], seed["seq"])
    assert retry["client_id"] == "abc-1"
    assert [(m["message"], m["seq"]) for m in seen] == [("once", 1), ("after", 2)]
    assert "client_id" not in seen[0], "a sender's key is not shown to others"


@pytest_twisted.ensureDeferred
async def test_a_bad_client_id_is_refused_and_stores_nothing(chatd) -> None:
    def scenario() -> dict:
        with Client(chatd.ws_url) as ws:
            ws.join("r", "u")
            ws.send(type="message", room="r", message="x", client_id=["no"], ref="a")
            return ws.recv()

    reply = await deferToThread(scenario)
    assert reply["type"] == "error" and reply["error"] == "client_id must be a string"
    assert (await chatd.hub.history("r")) == []


def _chat_then_stop(tmp_path, sig: int) -> tuple[list[dict], str]:
    data = str(tmp_path / "data")
    with Daemon("--data-dir", data, "--max-message-rate", "0") as first:
        first.wait_healthy()
        with Client(first.ws_url) as ws:
            ws.join("keep", "alice")
            acks = [send_acked(ws, "keep", f"m{i}", client_id=f"c{i}") for i in range(20)]
        output = first.stop(sig)
    return acks, output


def _history_after_restart(tmp_path) -> tuple[dict, dict, dict]:
    data = str(tmp_path / "data")
    with Daemon("--data-dir", data, "--max-message-rate", "0") as again:
        again.wait_healthy()
        with Client(again.ws_url) as ws:
            ws.join("keep", "bob")
            ws.send(type="history", room="keep", limit=100)
            history = ws.recv_type("history")
            retry = send_acked(ws, "keep", "m3", client_id="c3")
            new = send_acked(ws, "keep", "new")
        return history, retry, new


def test_history_and_seq_survive_a_clean_restart(tmp_path) -> None:
    acks, output = _chat_then_stop(tmp_path, signal.SIGTERM)
    history, retry, new = _history_after_restart(tmp_path)
    assert [m["seq"] for m in history["messages"]] == list(range(1, 21))
    assert [m["id"] for m in history["messages"]] == [a["id"] for a in acks]
    assert (retry["id"], retry["seq"]) == (acks[3]["id"], 4)
    assert new["seq"] == 21


def test_every_acknowledged_message_survives_kill_9(tmp_path) -> None:
    acks, _ = _chat_then_stop(tmp_path, signal.SIGKILL)
    history, retry, new = _history_after_restart(tmp_path)
    assert [(m["id"], m["seq"]) for m in history["messages"]] == [(a["id"], a["seq"]) for a in acks]
    assert retry["seq"] == 4
    assert new["seq"] == 21


# -- gRPC and SignalR over real sockets -------------------------------------------


@pytest_twisted.ensureDeferred
async def test_grpc_client_id_retry_answers_the_original_and_is_delivered_once(chatd) -> None:
    import grpc

    from chatd.grpc.generated import chat_pb2 as pb
    from chatd.grpc.generated.chat_pb2_grpc import ChatServiceStub

    def scenario() -> tuple[list, list[dict], object]:
        with Client(chatd.ws_url) as watcher, grpc.insecure_channel(chatd.grpc_target) as channel:
            watcher.join("g", "watcher")
            stub = ChatServiceStub(channel)
            request = pb.MessageRequest(user="gus", message="once", room="g", client_id="grpc-1")
            replies = [stub.SendMessage(request, timeout=10) for _ in range(3)]
            stub.SendMessage(pb.MessageRequest(user="gus", message="next", room="g"), timeout=10)
            seen = [watcher.recv_type("message") for _ in range(2)]
            # Chat: a Send with a client_id already stored gets a Sent with the original's id and seq
            out: list = []
            events = iter(
                [
                    pb.ChatEvent(ref="j", join=pb.Join(room="g", user="gus")),
                    pb.ChatEvent(ref="s", send=pb.Send(room="g", message="once", client_id="grpc-1")),
                ]
            )
            call = stub.Chat(events, timeout=10)
            for event in call:
                out.append(event)
                if event.WhichOneof("event") == "sent":
                    call.cancel()
                    break
            return replies, seen, out[-1]

    replies, seen, sent = await deferToThread(scenario)
    assert {(r.id, r.seq) for r in replies} == {(replies[0].id, 1)}
    assert [(m["message"], m["seq"]) for m in seen] == [("once", 1), ("next", 2)]
    assert (sent.ref, sent.sent.id, sent.sent.seq, sent.sent.client_id) == ("s", replies[0].id, 1, "grpc-1")


@pytest_twisted.ensureDeferred
async def test_grpc_resume_past_retention_is_told_in_metadata_and_in_joined(start, grpc_server) -> None:
    import grpc

    from chatd.grpc.generated import chat_pb2 as pb
    from chatd.grpc.generated.chat_pb2_grpc import ChatServiceStub

    running = await start("--history-limit", "3", "--max-message-rate", "0", "--grpc-server", grpc_server)

    def scenario() -> tuple[dict, list[int], object]:
        with grpc.insecure_channel(running.grpc_target) as channel:
            stub = ChatServiceStub(channel)
            for i in range(6):
                stub.SendMessage(pb.MessageRequest(user="w", message=f"m{i}", room="t"), timeout=10)
            stream = stub.StreamMessages(pb.StreamRequest(room="t", user="r", since_seq=1), timeout=10)
            metadata = dict(stream.initial_metadata())
            seqs = [next(stream).seq for _ in range(3)]
            stream.cancel()
            call = stub.Chat(iter([pb.ChatEvent(join=pb.Join(room="t", user="c", since_seq=1))]), timeout=10)
            joined = next(e for e in call if e.WhichOneof("event") == "joined")
            call.cancel()
            return metadata, seqs, joined.joined

    metadata, seqs, joined = await deferToThread(scenario)
    assert metadata["chatd-truncated"] == "true" and metadata["chatd-first-seq"] == "4"
    assert seqs == [4, 5, 6]
    assert (joined.truncated, joined.first_seq) == (True, 4)


@pytest_twisted.ensureDeferred
async def test_signalr_stream_room_since_and_send_to_room_client_id_over_a_socket(chatd) -> None:
    from tests.test_cross_protocol import SignalRClient

    def scenario() -> tuple[dict, dict, list[dict]]:
        url = chatd.url("signalr", "ws", "/signalr?user=sam")
        with SignalRClient(url) as sam:
            first = sam.call("SendToRoom", "s", "sam", "hello", "sr-1")
            retry = sam.call("SendToRoom", "s", "sam", "hello", "sr-1")
            sam.call("SendToRoom", "s", "sam", "two")
            stream = sam.invoke("StreamRoom", "s", 1, kind=4)
            items = []
            while len(items) < 1:
                record = sam.next()
                if record.get("type") == 2 and record["invocationId"] == stream:
                    items.append(record["item"])
            return first, retry, items

    first, retry, items = await deferToThread(scenario)
    assert (retry["id"], retry["seq"]) == (first["id"], first["seq"]) == (first["id"], 1)
    assert [(i["seq"], i["message"]) for i in items] == [(2, "two")]
