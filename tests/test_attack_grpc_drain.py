"""Attack pass of 2026-12-04: the gRPC ``Chat`` two-way call and the SIGTERM drain, as a client sees them.

Each test is one defect reproduced against ``twistd -n chatd`` (aio gRPC
server, the default), failing on the code it was found in:

- a ``Chat`` client that half-closes its side after sending gets ``OK``
  while its sends are still waiting for the store: the messages are stored
  but their ``Sent`` (and their echo) are dropped, so the client cannot
  know they were kept;
- a ``Chat`` send refused by the rate limit comes back as
  ``INVALID_ARGUMENT`` (do not retry) where every other gRPC refusal of the
  same kind, and the README, say ``RESOURCE_EXHAUSTED``;
- ``Chat``'s refusals are not counted in ``chatd_errors_total``, which
  counts the same refusals over WebSocket, SignalR and ``SendMessage``.

(A ``SendMessage`` in flight when SIGTERM comes may also end with a bare
``CANCELLED``: grpc core cancels the calls it has read but not yet handed to
the server, grpc/grpc#41785; the message was not stored. Not chatd's code,
so no test here.)
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import urllib.request

import grpc
import pytest

from chatd.grpc.generated import chat_pb2 as pb
from chatd.grpc.generated.chat_pb2_grpc import ChatServiceStub
from tests.daemon import Daemon


def _stub(d: Daemon) -> ChatServiceStub:
    return ChatServiceStub(grpc.insecure_channel(f"127.0.0.1:{d.ports['grpc']}"))


def _history(stub: ChatServiceStub, room: str) -> list[tuple[int, str]]:
    kept: list[tuple[int, str]] = []
    stream = stub.StreamMessages(pb.StreamRequest(room=room, user="checker", since_seq=0), timeout=2)
    try:
        for m in stream:
            kept.append((m.seq, m.message))
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e
    return kept


def test_a_chat_half_closed_after_its_sends_still_gets_every_sent_before_ok(tmp_path) -> None:
    """Sends answered by the store after the client's half-close must still be acknowledged.

    The history file is held by another connection for a second (a backup,
    an operator's ``sqlite3`` shell: the README's "a file locked by another
    connection"), so the store answers late, as it does under load (a burst,
    a slow disk). The client sends three messages with a ``ref`` and a
    ``client_id`` and closes its side: gRPC's half-close says "nothing more
    from me", not "stop answering". chatd ends the call with ``OK`` at once;
    the three messages are stored a moment later, but no ``Sent`` and no
    echo ever reach the client, which was told the call succeeded.
    """
    data = str(tmp_path)
    with Daemon("--data-dir", data) as d:
        d.wait_healthy()
        stub = _stub(d)
        stub.SendMessage(pb.MessageRequest(room="warm", user="w", message="the file exists"))
        lock = sqlite3.connect(
            os.path.join(data, "chatd.sqlite3"), isolation_level=None, timeout=5, check_same_thread=False
        )
        lock.execute("BEGIN IMMEDIATE")
        release = threading.Timer(1.0, lambda: lock.execute("COMMIT"))
        release.start()
        try:
            events = [pb.ChatEvent(ref="j", join=pb.Join(room="hc", user="alice"))]
            events += [
                pb.ChatEvent(ref=f"s{i}", send=pb.Send(room="hc", message=f"m{i}", client_id=f"c{i}"))
                for i in range(3)
            ]
            call = stub.Chat(iter(events), timeout=10)  # the iterator's end is the half-close
            sent = [e.ref for e in call if e.WhichOneof("event") == "sent"]
            code = call.code()
        finally:
            release.join()
            lock.close()
        time.sleep(0.5)
        kept = _history(stub, "hc")
    assert kept == [(1, "m0"), (2, "m1"), (3, "m2")], kept  # stored, all three
    assert sent == ["s0", "s1", "s2"], (
        f"the call ended {code.name} with sent={sent}: {len(kept)} messages were stored but never acknowledged"
    )


def test_a_rate_limited_chat_send_is_resource_exhausted_as_everywhere_else() -> None:
    """README: past the rate "the sender gets a 'rate limited' error in its protocol's form (gRPC RESOURCE_EXHAUSTED)".

    ``SendMessage`` says ``RESOURCE_EXHAUSTED``; ``Chat``'s error event says
    ``INVALID_ARGUMENT``, which tells a client the request is bad and must
    not be retried, so a client that sorts errors by code drops the message.
    """
    with Daemon() as d:
        d.wait_healthy()
        stub = _stub(d)
        events = [pb.ChatEvent(ref="j", join=pb.Join(room="rl", user="flood"))]
        events += [pb.ChatEvent(ref=f"s{i}", send=pb.Send(room="rl", message="x")) for i in range(60)]
        errors = [e.error for e in stub.Chat(iter(events), timeout=10) if e.WhichOneof("event") == "error"]
        with pytest.raises(grpc.RpcError) as unary:
            for _ in range(60):
                stub.SendMessage(pb.MessageRequest(room="rl", user="other", message="x"), timeout=5)
    assert unary.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    limited = [e for e in errors if e.reason.startswith("rate limited")]
    assert limited, errors
    assert {e.code for e in limited} == {"RESOURCE_EXHAUSTED"}, [(e.code, e.reason) for e in limited[:2]]


def _errors_total(d: Daemon, protocol: str) -> float:
    with urllib.request.urlopen(d.url(path="/metrics"), timeout=5) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("chatd_errors_total{") and f'protocol="{protocol}"' in line
    )


def test_refused_chat_events_are_counted_in_chatd_errors_total() -> None:
    """Every other refusal (WebSocket, SignalR, ``SendMessage``) counts in ``chatd_errors_total``; ``Chat``'s do not."""
    with Daemon() as d:
        d.wait_healthy()
        stub = _stub(d)
        before = _errors_total(d, "grpc")
        events = [
            pb.ChatEvent(ref="1", send=pb.Send(room="r", message="not joined")),
            pb.ChatEvent(ref="2"),  # empty oneof
            pb.ChatEvent(ref="3", join=pb.Join(room="bad room", user="a")),
        ]
        errors = [e for e in stub.Chat(iter(events), timeout=10) if e.WhichOneof("event") == "error"]
        assert len(errors) == 3, errors
        after = _errors_total(d, "grpc")
    assert after - before == 3, f"chatd_errors_total{{protocol=grpc}} went from {before} to {after} for 3 refusals"
