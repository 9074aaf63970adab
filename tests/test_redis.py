"""Several chatd processes on one real ``redis-server``: one order, shared history, presence, outages.

Every test starts its own ``redis-server`` (append-only file, fsync always,
so a restart keeps what it acknowledged) on a free loopback port, and
``twistd -n chatd --redis ...`` processes the way users start them.
Clients are the ``websockets`` library, a SignalR JSON client over it, and
grpcio.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc

from chatd.grpc.generated import chat_pb2 as pb
from chatd.grpc.generated.chat_pb2_grpc import ChatServiceStub
from tests.daemon import Daemon
from tests.redisserver import RedisServer
from tests.test_cross_protocol import SignalRClient
from tests.wsclient import Client

TIMEOUT = 20


def chatd(redis: RedisServer, *extra: str) -> Daemon:
    daemon = Daemon("--redis", redis.url, "--max-message-rate", "0", "--history-limit", "500", *extra)
    daemon.wait_healthy()
    return daemon


def health(daemon: Daemon) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(daemon.url(path="/health"), timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except OSError:
        return 0, {}  # not listening yet


def eventually(check, timeout: float = TIMEOUT, what: str = "condition"):
    """Poll ``check`` (bounded) until it returns something true; presence crosses processes by pub/sub."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout} s (last: {result!r})")
        time.sleep(0.05)


def signalr_url(daemon: Daemon, user: str) -> str:
    return daemon.url("signalr", "ws", f"/signalr?user={user}")


def test_two_processes_deliver_one_room_in_one_seq_order_over_every_protocol(redis) -> None:
    room, per_sender = "shared", 30
    total = 3 * per_sender
    with chatd(redis) as a, chatd(redis) as b:
        ws_reader, ws_sender = Client(a.ws_url), Client(a.ws_url)
        sr_reader, sr_sender = SignalRClient(signalr_url(b, "sr-reader")), SignalRClient(signalr_url(b, "sr-sender"))
        channel = grpc.insecure_channel(f"127.0.0.1:{b.ports['grpc']}")
        stub = ChatServiceStub(channel)
        try:
            ws_reader.join(room, "ws-reader")
            ws_sender.join(room, "ws-sender")
            early: list[dict] = []
            sr_reader.call("JoinRoom", room, seen=early)
            stream_id = sr_reader.invoke("StreamRoom", room, 0, kind=4)
            sr_reader.call("GetUsers", room, seen=early)
            sr_sender.call("JoinRoom", room)
            grpc_stream = stub.StreamMessages(pb.StreamRequest(room=room, user="grpc-reader", since_seq=0), timeout=60)
            go = threading.Barrier(3, timeout=TIMEOUT)

            def send_ws() -> None:
                go.wait()
                for i in range(per_sender):
                    ws_sender.send(type="message", room=room, message=f"ws {i}")

            def send_signalr() -> None:
                go.wait()
                for i in range(per_sender):
                    sr_sender.invoke("SendToRoom", room, "sr-sender", f"sr {i}")

            def send_grpc() -> None:
                go.wait()
                for i in range(per_sender):
                    stub.SendMessage(pb.MessageRequest(user="grpc-sender", message=f"grpc {i}", room=room), timeout=10)

            def read_ws() -> list[tuple]:
                return [(m["seq"], m["message"]) for m in (ws_reader.recv_type("message") for _ in range(total))]

            def read_grpc() -> list[tuple]:
                got = []
                for m in grpc_stream:
                    got.append((m.seq, m.message))
                    if len(got) == total:
                        break
                grpc_stream.cancel()
                return got

            def read_signalr() -> list[tuple]:
                got, pending = [], list(early)
                while len(got) < total:
                    record = pending.pop(0) if pending else sr_reader.next()
                    if record.get("type") == 2 and record.get("invocationId") == stream_id:
                        got.append((record["item"]["seq"], record["item"]["message"]))
                return got

            with ThreadPoolExecutor(max_workers=6) as pool:
                readers = [pool.submit(read_ws), pool.submit(read_grpc), pool.submit(read_signalr)]
                for sender in [pool.submit(send_ws), pool.submit(send_signalr), pool.submit(send_grpc)]:
                    sender.result(timeout=60)
                ws_seen, grpc_seen, sr_seen = (r.result(timeout=60) for r in readers)
        finally:
            for client in (ws_reader, ws_sender, sr_reader, sr_sender):
                client.close()
            channel.close()
    assert [seq for seq, _ in ws_seen] == list(range(1, total + 1)), "one gap-free seq over both processes"
    assert grpc_seen == ws_seen
    assert sr_seen == ws_seen
    for who in ("ws", "sr", "grpc"):
        assert [t for _, t in ws_seen if t.startswith(who + " ")] == [f"{who} {i}" for i in range(per_sender)]


def test_members_history_and_resume_work_whichever_process_a_client_reaches(redis) -> None:
    with chatd(redis) as a, chatd(redis) as b:
        with Client(a.ws_url) as alice, SignalRClient(signalr_url(b, "bob")) as bob:
            alice.join("lobby", "alice")
            bob.call("JoinRoom", "lobby")
            users = eventually(lambda: set(bob.call("GetUsers", "lobby")) >= {"alice", "bob"} and bob.call("GetUsers", "lobby"),
                               what="alice listed on b")
            assert set(users) == {"alice", "bob", }
            acks = []
            for i in range(5):
                alice.send(type="message", room="lobby", message=f"m{i}", ref=i)
                acks.append(alice.recv_type("sent"))
            history = bob.call("GetHistory", "lobby", 10)
            assert [(m["seq"], m["message"]) for m in history] == [(i + 1, f"m{i}") for i in range(5)]
        with Client(b.ws_url) as back:
            back.send(type="join", room="lobby", user="back", since=2)
            got = []
            while len(got) < 3:
                frame = back.recv()
                if frame["type"] == "message":
                    got.append(frame["seq"])
            assert got == [3, 4, 5]
            channel = grpc.insecure_channel(f"127.0.0.1:{b.ports['grpc']}")
            stream = ChatServiceStub(channel).StreamMessages(
                pb.StreamRequest(room="lobby", user="g", since_seq=4), timeout=10
            )
            first = next(iter(stream))
            stream.cancel()
            channel.close()
            assert (first.seq, first.id) == (5, acks[4]["id"])


def test_a_retried_client_id_is_stored_once_across_processes(redis) -> None:
    with chatd(redis) as a, chatd(redis) as b:
        with Client(a.ws_url) as first, Client(b.ws_url) as retry, Client(b.ws_url) as watcher:
            watcher.join("r", "watcher")
            first.join("r", "sender")
            first.send(type="message", room="r", message="hello", client_id="same-1")
            original = first.recv_type("sent")
            retry.join("r", "sender")
            retry.send(type="message", room="r", message="hello", client_id="same-1")
            again = retry.recv_type("sent")
            first.send(type="message", room="r", message="next", ref="n")
            first.recv_type("sent")
            seen = [watcher.recv_type("message")["message"] for _ in range(2)]
    assert (again["id"], again["seq"]) == (original["id"], original["seq"]) == (original["id"], 1)
    assert seen == ["hello", "next"], "the retry was delivered again"


def test_kill_9_of_one_process_removes_its_users_within_15_seconds(redis) -> None:
    with chatd(redis) as a, chatd(redis) as b:
        with Client(a.ws_url) as alice, Client(b.ws_url) as bob:
            alice.join("room", "alice")
            bob.join("room", "bob")
            alice.recv_until(lambda f: f.get("type") == "presence" and f["user"] == "bob" and f["action"] == "join")
            b.stop(signal.SIGKILL)
            started = time.monotonic()
            leave = alice.recv_until(
                lambda f: f.get("type") == "presence" and f["user"] == "bob" and f["action"] == "leave", timeout=20
            )
            took = time.monotonic() - started
            with SignalRClient(signalr_url(a, "carol")) as carol:
                users = carol.call("GetUsers", "room")
    assert took < 15, f"bob stayed {took:.1f} s after his process died"
    assert leave["count"] == 1
    assert users == ["alice"]


def test_redis_going_away_gives_errors_and_503_then_chat_resumes_with_nothing_lost(redis) -> None:
    with chatd(redis) as a, chatd(redis) as b:
        with Client(a.ws_url) as alice, Client(b.ws_url) as bob:
            alice.join("r", "alice")
            bob.join("r", "bob")
            alice.send(type="message", room="r", message="before", ref=1)
            assert alice.recv_type("sent")["seq"] == 1
            redis.stop()
            alice.send(type="message", room="r", message="during", ref=2)
            error = alice.recv_until(lambda f: f.get("ref") == 2)
            code, body = eventually(lambda: (h := health(a))[0] == 503 and h, what="503")
            redis.start()
            eventually(lambda: health(a)[0] == 200 and health(b)[0] == 200, what="healthy again")
            alice.send(type="message", room="r", message="after", ref=3)
            after = alice.recv_until(lambda f: f.get("ref") == 3)
            seen = [bob.recv_type("message") for _ in range(2)]
            bob.send(type="history", room="r")
            history = bob.recv_type("history")
    assert error["type"] == "error" and "not stored" in error["error"]
    assert body["status"] == "unhealthy" and "redis" in body["reason"]
    assert after["type"] == "sent" and after["seq"] == 2
    assert [(m["seq"], m["message"]) for m in seen] == [(1, "before"), (2, "after")]
    assert [m["message"] for m in history["messages"]] == ["before", "after"]


def test_a_subscriber_cut_off_catches_up_in_order(redis) -> None:
    """Pub/sub drops what a disconnected subscriber misses; catch-up from the store must not."""
    with chatd(redis) as a, chatd(redis) as b:
        with Client(a.ws_url) as alice, Client(b.ws_url) as bob:
            alice.join("r", "alice")
            bob.join("r", "bob")
            stop = threading.Event()

            def cut() -> None:
                while not stop.is_set():
                    redis.command("CLIENT", "KILL", "TYPE", "pubsub")
                    time.sleep(0.15)

            cutter = threading.Thread(target=cut, daemon=True)
            cutter.start()
            try:
                sent = []
                for i in range(60):
                    alice.send(type="message", room="r", message=f"m{i}", ref=i)
                    reply = alice.recv_until(lambda f, ref=i: f.get("ref") == ref)
                    if reply["type"] == "sent":
                        sent.append(reply["seq"])
                    time.sleep(0.01)
            finally:
                stop.set()
                cutter.join()
            got = [bob.recv_type("message", timeout=TIMEOUT)["seq"] for _ in range(len(sent))]
    assert len(sent) >= 50, "most sends should succeed while only subscriptions are cut"
    assert got == sorted(got) and len(set(got)) == len(got), "in order, no duplicate"
    assert set(sent) <= set(got), "an acknowledged message never reached bob"


def test_rediss_verifies_the_certificate_and_the_host_name(tmp_path) -> None:
    from tests.redisserver import RedisServer
    from tests.tlscert import make_certificate

    key, cert = make_certificate(tmp_path)
    server = RedisServer(tmp_path / "redis", tls=(key, cert))
    try:
        # The certificate names 127.0.0.1: trusted through --redis-ca, chat works.
        good = f"rediss://127.0.0.1:{server.tls_port}/0"
        with Daemon("--redis", good, "--redis-ca", str(cert)) as daemon:
            daemon.wait_healthy()
            eventually(lambda: health(daemon)[0] == 200, what="healthy over TLS")
            with Client(daemon.ws_url) as ws:
                ws.join("tls", "alice")
                ws.send(type="message", room="tls", message="over TLS", ref=1)
                assert ws.recv_type("sent")["seq"] == 1
        # The same server under a name the certificate does not carry is refused.
        wrong_name = f"rediss://127.0.0.2:{server.tls_port}/0"
        with Daemon("--redis", wrong_name, "--redis-ca", str(cert)) as daemon:
            code, body = eventually(lambda: (h := health(daemon))[0] == 503 and h, what="refused")
            time.sleep(1.5)
            code, body = health(daemon)
            assert code == 503 and "redis" in body["reason"]
            with Client(daemon.ws_url) as ws:
                ws.join("tls", "alice")
                ws.send(type="message", room="tls", message="not stored", ref=1)
                reply = ws.recv_until(lambda f: f.get("ref") == 1)
            assert reply["type"] == "error" and "not stored" in reply["error"]
            log = daemon.stop()
        assert "redis command connection: TLS: IPAddressMismatch" in log
    finally:
        server.stop()


def test_a_redis_that_lost_its_data_does_not_hand_out_a_seq_twice(redis) -> None:
    import shutil

    with chatd(redis) as a:
        with Client(a.ws_url) as alice:
            alice.join("r", "alice")
            for i in range(3):
                alice.send(type="message", room="r", message=f"m{i}", ref=i)
                alice.recv_until(lambda f, ref=i: f.get("ref") == ref)
            redis.stop()
            shutil.rmtree(redis.dir)  # restarted empty, as without persistence
            redis.dir.mkdir()
            redis.start()
            eventually(lambda: health(a)[0] == 200, what="healthy again")
            alice.send(type="message", room="r", message="after", ref="after")
            frames: list[dict] = []
            while not any(f.get("ref") == "after" for f in frames):
                frames.append(alice.recv())
            sent = frames[-1]
            delivered = next(f for f in frames if f.get("type") == "message" and f["message"] == "after")
    assert sent["type"] == "sent" and sent["seq"] == 4, frames
    assert delivered["seq"] == 4
