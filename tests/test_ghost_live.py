"""Defects of the hub seen on the wire: a resume that overflows its stream.

A gRPC ``StreamMessages`` (or ``Chat``) whose replay does not fit its queue
is ended with RESOURCE_EXHAUSTED; the room must not keep it as a member.
"""

from __future__ import annotations

import grpc
import pytest_twisted
from twisted.internet.threads import deferToThread

from chatd.grpc.generated import chat_pb2 as pb
from chatd.grpc.generated.chat_pb2_grpc import ChatServiceStub

TIMEOUT = 15


@pytest_twisted.ensureDeferred
async def test_a_resume_too_big_for_the_stream_leaves_no_ghost_member(start) -> None:
    running = await start(
        "--history-limit", "50", "--grpc-stream-queue", "10", "--max-message-rate", "0"
    )
    hub = running.hub

    def scenario() -> grpc.StatusCode:
        with grpc.insecure_channel(running.grpc_target) as channel:
            chat = ChatServiceStub(channel)
            for i in range(50):
                chat.SendMessage(pb.MessageRequest(user="writer", message=f"m{i}", room="full"), timeout=TIMEOUT)
            call = chat.StreamMessages(pb.StreamRequest(room="full", user="ghost", since_seq=0), timeout=TIMEOUT)
            try:
                for _ in call:
                    pass
            except grpc.RpcError as e:
                return e.code()
            return grpc.StatusCode.OK

    code = await deferToThread(scenario)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert hub.members("full") == []
    assert hub.stats()["connections"]["grpc"] == 0
    assert "full" not in hub.rooms()
