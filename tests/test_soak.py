"""Soak: hundreds of clients on all three protocols churn against one ``twistd -n chatd``.

Workers on WebSocket (``websockets``), SignalR (its JSON hub protocol over a
``websockets`` connection, ``tests.test_cross_protocol.SignalRClient``) and
gRPC (grpcio ``Chat``) each play a long series of short-lived clients: connect,
resume from the last ``seq`` they saw (``since`` on a WebSocket join,
``StreamRoom(room, since)`` on SignalR, ``since_seq`` on a gRPC Join), send a
few messages whose text is their ``client_id``, sometimes retry one with the
same ``client_id``, sometimes hang up before the acknowledgement and retry it
from the next client, then leave. Checked, per room, against the server's
acknowledgements:

- every client sees the room's ``seq`` gap-free and without a duplicate,
  across all its reconnections (zero lost, zero duplicated deliveries);
- a retried ``client_id`` is acknowledged with the original ``seq``, and no
  ``client_id`` is stored twice (zero duplicated messages);
- every acknowledged message is seen by the other clients of its room with
  that ``seq`` (zero lost messages);
- once the churn is over, the daemon's open file descriptors are back to the
  baseline and its RSS near it.

Loopback only, bounded in time, stops by itself. The normal suite runs it for
30 s; run the long one by hand with::

    CHATD_SOAK_SECONDS=600 .venv/bin/python -m pytest tests/test_soak.py -q -s
"""

from __future__ import annotations

import os
import queue
import random
import time
import urllib.request
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import orjson

from chatd.grpc.generated import chat_pb2 as pb
from chatd.grpc.generated.chat_pb2_grpc import ChatServiceStub
from tests.daemon import Daemon
from tests.test_cross_protocol import SignalRClient
from tests.test_slow_consumers import _fds, _poll, _rss_kib
from tests.wsclient import Client

SECONDS = float(os.environ.get("CHATD_SOAK_SECONDS", "30"))
WORKERS_PER_PROTOCOL = int(os.environ.get("CHATD_SOAK_WORKERS", "10"))
ROOMS = [f"soak{i}" for i in range(4)]
TIMEOUT = 20


class WsSoak:
    """A WebSocket client: ``since`` on join, ``client_id`` on messages."""

    def __init__(self, url: str, user: str) -> None:
        self.c = Client(url)
        self.user = user

    def join(self, room: str, since: int) -> None:
        self.c.send(type="join", room=room, user=self.user, since=since)

    def send(self, room: str, cid: str) -> None:
        self.c.send(type="message", room=room, message=cid, client_id=cid)

    def next(self) -> tuple | None:
        f = self.c.recv(TIMEOUT)
        if f["type"] == "message":
            return ("msg", f["room"], f["seq"], f["message"])
        if f["type"] == "sent":
            return ("ack", f["client_id"], f["seq"])
        if f["type"] == "joined":
            return ("joined",)
        assert f["type"] == "presence", f
        return None

    def close(self) -> None:
        self.c.close()


class SignalRSoak:
    """A SignalR JSON client: ``StreamRoom(room, since)`` for the room, ``SendToRoom`` with a client_id."""

    def __init__(self, url: str, user: str) -> None:
        self.c = SignalRClient(f"{url}?user={user}")
        self.user = user
        self.calls: dict[str, str] = {}
        self.stream: str | None = None

    def join(self, room: str, since: int) -> None:
        self.room = room
        self.stream = self.c.invoke("StreamRoom", room, since, kind=4)
        self.calls[self.c.invoke("GetUsers", room)] = "joined"  # completes once the stream is live

    def send(self, room: str, cid: str) -> None:
        self.calls[self.c.invoke("SendToRoom", room, self.user, cid, cid)] = cid

    def next(self) -> tuple | None:
        r = self.c.next()
        if r.get("type") == 2 and r.get("invocationId") == self.stream:
            return ("msg", self.room, r["item"]["seq"], r["item"]["message"])
        if r.get("type") == 3 and r.get("invocationId") in self.calls:
            assert "error" not in r, r
            what = self.calls.pop(r["invocationId"])
            return ("joined",) if what == "joined" else ("ack", what, r["result"]["seq"])
        assert r.get("type") in (1, 3), r  # ReceiveMessage/UserJoined/UserLeft calls
        return None

    def close(self) -> None:
        self.c.close()


class GrpcSoak:
    """One gRPC ``Chat`` call: a Join with ``since_seq``, Sends with a ``client_id``."""

    def __init__(self, stub: ChatServiceStub, user: str) -> None:
        self.user = user
        self.requests: queue.Queue[pb.ChatEvent | None] = queue.Queue()
        self.call = stub.Chat(iter(self.requests.get, None), timeout=SECONDS + 120)

    def join(self, room: str, since: int) -> None:
        self.requests.put(pb.ChatEvent(join=pb.Join(room=room, user=self.user, since_seq=since)))

    def send(self, room: str, cid: str) -> None:
        self.requests.put(pb.ChatEvent(send=pb.Send(room=room, message=cid, client_id=cid)))

    def next(self) -> tuple | None:
        e = next(self.call)
        kind = e.WhichOneof("event")
        if kind == "message":
            return ("msg", e.message.room, e.message.seq, e.message.message)
        if kind == "sent":
            return ("ack", e.sent.client_id, e.sent.seq)
        if kind == "joined":
            return ("joined",)
        assert kind == "presence", e
        return None

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()


class Worker:
    """One user playing a series of clients of one protocol in one room."""

    def __init__(self, name: str, room: str, make: Any, deadline: float) -> None:
        self.name = name
        self.room = room
        self.make = make
        self.deadline = deadline
        self.last_seen = 0
        self.seen: dict[int, str] = {}  # seq -> text, every message of the room this user saw
        self.acked: dict[str, int] = {}  # client_id -> seq the server acknowledged
        self.unacked: list[str] = []  # sent, then hung up before the acknowledgement
        self.sessions = 0
        #: sessions chatd cut for falling 1,000 events behind (resumed by the next one)
        self.cuts = 0
        self.n = 0
        self.rng = random.Random(name)

    def run(self) -> None:
        while time.monotonic() < self.deadline or self.unacked:
            self.session()

    def session(self) -> None:
        client = self.make(self.name)
        self.sessions += 1
        todo: list[str] = []
        try:
            client.join(self.room, self.last_seen)
            self._until(client, lambda e: e[0] == "joined")
            # Retry what the last client hung up on, then a few new ones.
            todo = [*self.unacked, *(self._new() for _ in range(self.rng.randint(1, 4)))]
            self.unacked = []
            for cid in todo:
                client.send(self.room, cid)
                if self.rng.random() < 0.15 and time.monotonic() < self.deadline:
                    self.unacked.append(cid)  # hang up before the ack: the next client retries
                    return
                seq = self._ack(client, cid)
                if self.rng.random() < 0.2:
                    client.send(self.room, cid)  # a retry on the same connection
                    assert self._ack(client, cid) == seq
        except grpc.RpcError as e:
            # chatd ends a stream that falls 1,000 events behind (here: a reader thread
            # starved of CPU among this process's thirty); its client resumes from the
            # last seq it saw, as the error says, and retries what was not acknowledged.
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or "too slow" not in (e.details() or ""):
                raise
            self.cuts += 1
            self.unacked += [cid for cid in todo if cid not in self.acked and cid not in self.unacked]
        finally:
            client.close()

    def _new(self) -> str:
        self.n += 1
        return f"{self.name}-{self.n}"

    def _ack(self, client: Any, cid: str) -> int:
        event = self._until(client, lambda e: e[0] == "ack" and e[1] == cid)
        seq = event[2]
        first = self.acked.setdefault(cid, seq)
        assert first == seq, f"{cid} acknowledged as {first} then {seq}"
        return seq

    def _until(self, client: Any, pred: Any) -> tuple:
        while True:
            event = client.next()
            if event is None:
                continue
            if event[0] == "msg" and event[1] == self.room:
                _, _, seq, text = event
                assert seq == self.last_seen + 1, f"{self.name}: seq {seq} after {self.last_seen}"
                self.last_seen = seq
                self.seen[seq] = text
            if pred(event):
                return event


def _stats(daemon: Daemon) -> dict:
    with urllib.request.urlopen(daemon.url(path="/stats"), timeout=10) as r:
        return orjson.loads(r.read())


def test_soak_churn_on_three_protocols_loses_and_duplicates_nothing_and_leaks_nothing() -> None:
    with Daemon("--max-message-rate", "0", "--history-limit", "5000") as d:
        d.wait_healthy()
        pid = d.proc.pid
        ws_url = d.ws_url
        sr_url = d.url("signalr", "ws", "/signalr")
        channel = grpc.insecure_channel(f"127.0.0.1:{d.ports['grpc']}")
        stub = ChatServiceStub(channel)
        makers = {
            "ws": lambda user: WsSoak(ws_url, user),
            "sr": lambda user: SignalRSoak(sr_url, user),
            "grpc": lambda user: GrpcSoak(stub, user),
        }

        def churn(seconds: float, prefix: str) -> list[Worker]:
            deadline = time.monotonic() + seconds
            workers = [
                Worker(f"{prefix}{proto}{i}", ROOMS[i % len(ROOMS)], make, deadline)
                for proto, make in makers.items()
                for i in range(WORKERS_PER_PROTOCOL)
            ]
            with ThreadPoolExecutor(len(workers)) as pool:
                for future in [pool.submit(w.run) for w in workers]:
                    future.result(timeout=seconds + 180)
            return workers

        # Warm up (every code path, allocator arenas), then take the baseline.
        churn(2, "warm")
        _poll(lambda: _stats(d)["connections"]["total"] == 0, timeout=30)
        baseline_rss, baseline_fds = _rss_kib(pid), _fds(pid)

        started = time.monotonic()
        workers = churn(SECONDS, "w")
        elapsed = time.monotonic() - started
        channel.close()
        _poll(lambda: _stats(d)["connections"]["total"] == 0, timeout=30)
        after_rss, after_fds = _rss_kib(pid), _fds(pid)

    by_room: dict[str, list[Worker]] = defaultdict(list)
    for w in workers:
        by_room[w.room].append(w)
    sessions = sum(w.sessions for w in workers)
    messages = sum(len(w.acked) for w in workers)
    cuts = sum(w.cuts for w in workers)
    print(
        f"soak {elapsed:.0f}s: {len(workers)} workers, {sessions} client sessions ({cuts} cut as too slow), "
        f"{messages} messages; "
        f"RSS {baseline_rss} -> {after_rss} KiB; fds {baseline_fds} -> {after_fds}"
    )
    assert sessions >= 300, "hundreds of clients came and went"
    assert cuts <= sessions // 20, f"{cuts} of {sessions} sessions were cut as too slow"
    for room, members in by_room.items():
        # One room history as every member saw it: the same text at each seq, for everyone.
        history: dict[int, str] = {}
        for w in members:
            for seq, text in w.seen.items():
                assert history.setdefault(seq, text) == text, f"{room} seq {seq} seen as two messages"
        texts = list(history.values())
        assert len(texts) == len(set(texts)), f"{room}: a client_id was stored twice"
        for w in members:
            for cid, seq in w.acked.items():
                assert history.get(seq) == cid, f"{room}: acknowledged {cid} as seq {seq}, never seen there"
                # Everyone who was there later saw it too (a reader's own view is gap-free from 1).
                for other in members:
                    if other.last_seen >= seq:
                        assert other.seen[seq] == cid
        assert sorted(history) == list(range(1, len(history) + 1)), f"{room}: seq has a gap"
    assert after_fds <= baseline_fds + 2, f"open files {baseline_fds} -> {after_fds}"
    assert after_rss - baseline_rss < 64 * 1024, f"RSS grew {after_rss - baseline_rss} KiB"
