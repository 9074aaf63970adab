"""gRPC connections themselves are bounded: how long one may take to start, sit unused, and how many.

chatd's other limits count clients of the hub (WebSocket connections,
SignalR connections, gRPC streams); an HTTP/2 connection on the gRPC port
that opens no stream is none of those. grpc's server, left to its
defaults, gives a connection 120 s to send its preface, keeps one with no
call open for ever, and takes any number: one address could hold the
process's file descriptors with connections that do nothing.
"""

from __future__ import annotations

import socket
import threading
import time

import grpc
import pytest_twisted
from twisted.internet.threads import deferToThread

from chatd.grpc.generated import chat_pb2 as pb
from chatd.grpc.generated.chat_pb2_grpc import ChatServiceStub
from chatd.grpc.service import GrpcService
from tests import grpcservers
from tests.daemon import Daemon

start, grpc_server = grpcservers.start, grpcservers.grpc_server


def closed_within(port: int, seconds: float) -> bool:
    """Connect and send nothing: does the server close the connection within ``seconds``?"""
    with socket.create_connection(("127.0.0.1", port), timeout=seconds) as s:
        try:
            while s.recv(4096):
                pass  # (a server may send its SETTINGS first)
            return True
        except TimeoutError:
            return False


def test_a_connection_that_never_sends_its_preface_is_closed_after_the_handshake_timeout() -> None:
    with Daemon("--handshake-timeout", "1") as daemon:
        daemon.wait_healthy()
        started = time.monotonic()
        assert closed_within(daemon.ports["grpc"], 8)
        assert time.monotonic() - started < 5


def wait_for_state(channel: grpc.Channel, wanted: grpc.ChannelConnectivity, timeout: float) -> bool:
    reached = threading.Event()

    def seen(state: grpc.ChannelConnectivity) -> None:
        if state is wanted:
            reached.set()

    channel.subscribe(seen)
    try:
        return reached.wait(timeout)
    finally:
        channel.unsubscribe(seen)


@pytest_twisted.ensureDeferred
async def test_a_connection_with_no_call_is_let_go_and_one_with_a_stream_is_kept(start, monkeypatch) -> None:
    monkeypatch.setattr(GrpcService, "idle_connection_ms", 1000)
    running = await start()

    def scenario() -> tuple[bool, bool, list[str]]:
        with grpc.insecure_channel(running.grpc_target, options=[("grpc.use_local_subchannel_pool", 1)]) as idle:
            grpc.channel_ready_future(idle).result(timeout=10)
            let_go = wait_for_state(idle, grpc.ChannelConnectivity.IDLE, 8)
        with grpc.insecure_channel(running.grpc_target, options=[("grpc.use_local_subchannel_pool", 1)]) as busy:
            call = ChatServiceStub(busy).StreamMessages(pb.StreamRequest(room="quiet", user="sam"))
            grpc.channel_ready_future(busy).result(timeout=10)
            dropped = wait_for_state(busy, grpc.ChannelConnectivity.IDLE, 3)
            with grpc.insecure_channel(running.grpc_target) as other:
                ChatServiceStub(other).SendMessage(pb.MessageRequest(user="ann", room="quiet", message="hi"), timeout=10)
            got = [next(call).message]
            call.cancel()
        return let_go, dropped, got

    let_go, dropped, got = await deferToThread(scenario)
    assert let_go, "a connection with no call open was kept"
    assert not dropped and got == ["hi"]


def test_connections_past_max_connections_are_refused() -> None:
    with Daemon("--max-connections", "3") as daemon:
        daemon.wait_healthy()
        target = f"127.0.0.1:{daemon.ports['grpc']}"
        channels = [grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(5)]
        try:
            ready = 0
            for channel in channels:
                try:
                    grpc.channel_ready_future(channel).result(timeout=3)
                    ready += 1
                except grpc.FutureTimeoutError:
                    pass
            assert ready == 3
        finally:
            for channel in channels:
                channel.close()
