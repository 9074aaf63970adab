"""A gRPC client's keep-alive pings keep a quiet stream open; a flood of pings does not.

Chat clients hold a ``StreamMessages`` or ``Chat`` stream for hours, often
in a room where nothing is said for minutes, behind NATs and load balancers
that drop a connection idle for a minute or so. So they ping: grpc-java and
grpc-go clients are commonly set to every 10-30 s. grpc's server, left to
its defaults, takes a ping on a connection that sent no data within the
last 5 minutes as abuse, and at the third ends the connection with
``GOAWAY ENHANCE_YOUR_CALM "too_many_pings"``: every stream on it dies
``UNAVAILABLE`` within half a minute of going quiet. chatd permits a ping
every ``GrpcService.min_ping_interval_ms`` (10 s), with or without a call
open, and still ends a connection that pings faster.

The tests shrink that interval so they run in seconds: to 1 s for a client
pinging every 1.5 s (allowed), to 3 s for one pinging every second (too
often; grpc's client pings no more often than about once a second anyway).
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest_twisted
from twisted.internet.threads import deferToThread

from chatd.grpc.generated import chat_pb2 as pb
from chatd.grpc.generated.chat_pb2_grpc import ChatServiceStub
from chatd.grpc.service import GrpcService
from tests import grpcservers

start, grpc_server = grpcservers.start, grpcservers.grpc_server


def quiet_stream(target: str, ping_ms: int, quiet: float) -> tuple[list[str], list[tuple[str, str]]]:
    """Hold a stream in a silent room for ``quiet`` s while pinging, then send one message."""
    options = [
        ("grpc.keepalive_time_ms", ping_ms),
        ("grpc.keepalive_timeout_ms", 5000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging while nothing comes
    ]
    with grpc.insecure_channel(target, options=options) as channel:
        stub = ChatServiceStub(channel)
        call = stub.StreamMessages(pb.StreamRequest(room="quiet", user="sam"))
        got: list[str] = []
        errors: list[tuple[str, str]] = []
        first = threading.Event()
        done = threading.Event()  # the cancel at the end is this client's own

        def read() -> None:
            try:
                for event in call:
                    got.append(event.message)
                    first.set()
            except grpc.RpcError as e:
                if not done.is_set():
                    errors.append((e.code().name, e.details()))
                first.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        time.sleep(quiet)
        if not errors:
            with grpc.insecure_channel(target) as other:  # the sender is someone else
                ChatServiceStub(other).SendMessage(pb.MessageRequest(user="ann", room="quiet", message="still there?"), timeout=10)
            first.wait(10)
        done.set()
        call.cancel()
        reader.join(10)
        return got, errors


@pytest_twisted.ensureDeferred
async def test_a_client_pinging_within_the_allowance_keeps_a_quiet_stream(start, monkeypatch) -> None:
    monkeypatch.setattr(GrpcService, "min_ping_interval_ms", 1000)
    running = await start()
    got, errors = await deferToThread(quiet_stream, running.grpc_target, 1500, 8.0)
    assert (got, errors) == (["still there?"], [])


@pytest_twisted.ensureDeferred
async def test_a_client_pinging_too_often_is_told_so(start, monkeypatch) -> None:
    monkeypatch.setattr(GrpcService, "min_ping_interval_ms", 3000)
    running = await start()
    got, errors = await deferToThread(quiet_stream, running.grpc_target, 1000, 6.0)
    assert got == []
    assert errors == [("UNAVAILABLE", "Too many pings")]
