"""gRPC over a real port with the real grpcio client, next to WebSocket clients.

Every scenario runs in a worker thread (``deferToThread``) so the blocking
clients never stall the server on the test's reactor. Points of order come
from the protocol itself (a presence event, a reply), never from sleeping.
"""

from __future__ import annotations

import json
import queue
import urllib.request
from typing import Any

import grpc
import pytest
import pytest_twisted
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from twisted.internet import defer
from twisted.internet.threads import deferToThread

from chatd.grpc.generated import chat_pb2 as pb
from chatd.grpc.generated.chat_pb2_grpc import ChatServiceStub
from tests import grpcservers
from tests.wsclient import Client

# Every test runs on both gRPC servers (--grpc-server threaded and aio).
chatd, start, grpc_server = grpcservers.chatd, grpcservers.start, grpcservers.grpc_server

TIMEOUT = 15


def stub(channel: grpc.Channel) -> ChatServiceStub:
    return ChatServiceStub(channel)


def send(channel: grpc.Channel, room: str, user: str, message: str) -> pb.MessageResponse:
    return stub(channel).SendMessage(pb.MessageRequest(user=user, message=message, room=room), timeout=TIMEOUT)


def presence_of(ws: Client, action: str, user: str) -> dict:
    return ws.recv_until(lambda f: f.get("type") == "presence" and (f["action"], f["user"]) == (action, user))


class ChatCall:
    """A ``Chat`` call fed from a queue: put events in, read events out."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._out: queue.Queue[pb.ChatEvent | None] = queue.Queue()
        self.call = stub(channel).Chat(iter(self._out.get, None), timeout=TIMEOUT * 2)

    def send(self, ref: str = "", **event: Any) -> None:
        self._out.put(pb.ChatEvent(ref=ref, **event))

    def recv(self, kind: str) -> pb.ChatEvent:
        for event in self.call:
            if event.WhichOneof("event") == kind:
                return event
        raise AssertionError(f"call ended before a {kind} event")

    def finish(self) -> None:
        self._out.put(None)


@pytest_twisted.ensureDeferred
async def test_send_message_reaches_a_websocket_client_in_the_room(chatd) -> None:
    def scenario() -> tuple[pb.MessageResponse, dict]:
        with Client(chatd.ws_url) as ws, grpc.insecure_channel(chatd.grpc_target) as channel:
            ws.join("lobby", "wendy")
            reply = send(channel, "lobby", "alice", "hello from grpc")
            return reply, ws.recv_type("message")

    reply, frame = await deferToThread(scenario)
    assert (reply.seq, reply.user, reply.room, reply.protocol) == (1, "alice", "lobby", "grpc")
    assert frame == {
        "type": "message",
        "id": reply.id,
        "seq": 1,
        "room": "lobby",
        "user": "alice",
        "message": "hello from grpc",
        "timestamp": reply.timestamp,
        "protocol": "grpc",
    }


@pytest_twisted.ensureDeferred
async def test_websocket_messages_reach_a_stream_subscriber_in_seq_order_and_cancel_unsubscribes(chatd) -> None:
    def scenario() -> tuple[list[pb.MessageResponse], dict, dict]:
        with Client(chatd.ws_url) as ws, grpc.insecure_channel(chatd.grpc_target) as channel:
            ws.join("lobby", "wendy")
            call = stub(channel).StreamMessages(pb.StreamRequest(room="lobby", user="sam"), timeout=TIMEOUT * 2)
            presence_of(ws, "join", "sam")  # the subscriber is live
            during = stub(channel).GetStats(pb.StatsRequest(), timeout=TIMEOUT)
            for i in range(20):
                ws.send(type="message", room="lobby", message=f"m{i}")
            got = [next(call) for _ in range(20)]
            call.cancel()
            presence_of(ws, "leave", "sam")
            after = stub(channel).GetStats(pb.StatsRequest(), timeout=TIMEOUT)
            return got, dict(during.connections_by_protocol), dict(after.connections_by_protocol)

    got, during, after = await deferToThread(scenario)
    assert [m.message for m in got] == [f"m{i}" for i in range(20)]
    assert [m.seq for m in got] == list(range(1, 21))
    assert {m.protocol for m in got} == {"websocket"}
    assert {m.user for m in got} == {"wendy"}
    assert (during["grpc"], after["grpc"]) == (1, 0)
    assert after["websocket"] == 1


@pytest_twisted.ensureDeferred
async def test_since_seq_replays_the_missed_messages_then_goes_live_without_gap_or_duplicate(chatd) -> None:
    def scenario() -> list[int]:
        with Client(chatd.ws_url) as ws, grpc.insecure_channel(chatd.grpc_target) as channel:
            for i in range(5):
                send(channel, "lobby", "alice", f"early {i}")
            ws.join("lobby", "wendy")
            call = stub(channel).StreamMessages(
                pb.StreamRequest(room="lobby", user="sam", since_seq=2), timeout=TIMEOUT * 2
            )
            presence_of(ws, "join", "sam")
            ws.send(type="message", room="lobby", message="live")
            seqs = [next(call).seq for _ in range(4)]
            call.cancel()
            return seqs

    assert await deferToThread(scenario) == [3, 4, 5, 6]


@pytest_twisted.ensureDeferred
async def test_chat_joins_sends_receives_and_leaves_both_ways(chatd) -> None:
    def scenario() -> dict[str, Any]:
        with Client(chatd.ws_url) as ws, grpc.insecure_channel(chatd.grpc_target) as channel:
            ws.join("lobby", "wendy")
            chat = ChatCall(channel)
            chat.send("j", join=pb.Join(room="lobby", user="gus"))
            joined = chat.recv("joined")
            presence_of(ws, "join", "gus")
            ws.send(type="message", room="lobby", message="hi gus")
            from_ws = chat.recv("message")
            chat.send(send=pb.Send(room="lobby", message="hi wendy"))
            at_ws = ws.recv_until(lambda f: f.get("type") == "message" and f["user"] == "gus")
            own = chat.recv("message")
            chat.send("bad", send=pb.Send(room="elsewhere", message="nope"))
            error = chat.recv("error")
            chat.send("l", leave=pb.Leave(room="lobby"))
            left = chat.recv("left")
            presence_of(ws, "leave", "gus")
            chat.finish()
            rest = list(chat.call)
            return {
                "joined": joined,
                "from_ws": from_ws,
                "at_ws": at_ws,
                "own": own,
                "error": error,
                "left": left,
                "rest": rest,
                "code": chat.call.code(),
            }

    r = await deferToThread(scenario)
    assert (r["joined"].ref, list(r["joined"].joined.members)) == ("j", ["wendy", "gus"])
    assert (r["from_ws"].message.user, r["from_ws"].message.message) == ("wendy", "hi gus")
    assert (r["at_ws"]["message"], r["at_ws"]["protocol"]) == ("hi wendy", "grpc")
    assert r["own"].message.id == r["at_ws"]["id"]
    assert (r["error"].ref, r["error"].error.code) == ("bad", "INVALID_ARGUMENT")
    assert r["error"].error.reason == "not in room elsewhere: join it first"
    assert (r["left"].ref, r["left"].left.room) == ("l", "lobby")
    assert r["rest"] == []
    assert r["code"] is grpc.StatusCode.OK


@pytest_twisted.ensureDeferred
async def test_get_stats_agrees_with_the_stats_page(chatd) -> None:
    def scenario() -> tuple[pb.StatsResponse, dict]:
        with Client(chatd.ws_url) as ws, grpc.insecure_channel(chatd.grpc_target) as channel:
            ws.join("lobby", "wendy")
            send(channel, "lobby", "alice", "one")
            ws.recv_type("message")
            reply = stub(channel).GetStats(pb.StatsRequest(), timeout=TIMEOUT)
            with urllib.request.urlopen(chatd.http_url + "/stats", timeout=TIMEOUT) as response:
                page = json.load(response)
            return reply, page

    reply, page = await deferToThread(scenario)
    connections = dict(page["connections"])
    assert reply.connections == connections.pop("total") == 1
    assert dict(reply.connections_by_protocol) == connections
    assert reply.connections_accepted == page["connections_accepted"]
    assert reply.rooms == page["rooms"] == 1
    assert reply.messages_total == page["messages"]["total"] == 1
    assert reply.deliveries == page["messages"]["deliveries"]


@pytest.mark.parametrize(
    "request_, reason",
    [
        (pb.MessageRequest(user="alice", message="x", room="no spaces"), "invalid room name"),
        (pb.MessageRequest(user="", message="x", room="lobby"), "invalid user name"),
        (pb.MessageRequest(user="alice", message="   ", room="lobby"), "message must not be empty"),
        (pb.MessageRequest(user="alice", message="x" * 5000, room="lobby"), "message too long"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_input_gets_invalid_argument_and_changes_nothing(chatd, request_, reason) -> None:
    def scenario() -> grpc.RpcError:
        with grpc.insecure_channel(chatd.grpc_target) as channel:
            with pytest.raises(grpc.RpcError) as info:
                stub(channel).SendMessage(request_, timeout=TIMEOUT)
            return info.value

    error = await deferToThread(scenario)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(reason)
    assert chatd.hub.messages_total == 0


@pytest_twisted.ensureDeferred
async def test_a_flooding_sender_gets_resource_exhausted(start) -> None:
    running = await start("--max-message-rate", "1", "--message-burst", "2")

    def scenario() -> grpc.RpcError:
        with grpc.insecure_channel(running.grpc_target) as channel:
            for i in range(2):
                stub(channel).SendMessage(pb.MessageRequest(user="fast", message=f"m{i}", room="lobby"), timeout=TIMEOUT)
            with pytest.raises(grpc.RpcError) as info:
                stub(channel).SendMessage(pb.MessageRequest(user="fast", message="m2", room="lobby"), timeout=TIMEOUT)
            return info.value

    error = await deferToThread(scenario)
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details().startswith("rate limited: fast")
    assert running.hub.messages_total == 2


@pytest_twisted.ensureDeferred
async def test_bad_stream_request_gets_invalid_argument(chatd) -> None:
    def scenario() -> grpc.RpcError:
        with grpc.insecure_channel(chatd.grpc_target) as channel:
            call = stub(channel).StreamMessages(pb.StreamRequest(room="lobby", user=" padded"), timeout=TIMEOUT)
            with pytest.raises(grpc.RpcError) as info:
                next(call)
            return info.value

    error = await deferToThread(scenario)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("invalid user name")
    assert chatd.hub.sessions == {}


@pytest_twisted.ensureDeferred
async def test_oversized_requests_are_refused_by_the_receive_limit(start) -> None:
    running = await start("--read-buffer-size", "1024", "--max-message-length", "100000")

    def scenario() -> grpc.RpcError:
        with grpc.insecure_channel(running.grpc_target) as channel:
            with pytest.raises(grpc.RpcError) as info:
                send(channel, "lobby", "alice", "x" * 4000)
            return info.value

    error = await deferToThread(scenario)
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert running.hub.messages_total == 0


@pytest_twisted.ensureDeferred
async def test_streams_past_the_limit_are_refused_with_resource_exhausted(start) -> None:
    running = await start("--grpc-workers", "6", "--grpc-max-streams", "2")

    def scenario() -> tuple[grpc.RpcError, pb.MessageResponse]:
        with Client(running.ws_url) as ws, grpc.insecure_channel(running.grpc_target) as channel:
            ws.join("lobby", "wendy")
            calls = []
            for user in ("s1", "s2"):
                calls.append(stub(channel).StreamMessages(pb.StreamRequest(room="lobby", user=user), timeout=TIMEOUT))
                presence_of(ws, "join", user)
            third = stub(channel).StreamMessages(pb.StreamRequest(room="lobby", user="s3"), timeout=TIMEOUT)
            with pytest.raises(grpc.RpcError) as info:
                next(third)
            reply = send(channel, "lobby", "alice", "unary calls still work")
            for call in calls:
                call.cancel()
            return info.value, reply

    error, reply = await deferToThread(scenario)
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "2 gRPC streams open" in error.details()
    assert reply.seq == 1


class ReflectionCall:
    """A ``ServerReflectionInfo`` stream kept open, as grpcurl or a GUI client holds one."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._out: queue.Queue[reflection_pb2.ServerReflectionRequest | None] = queue.Queue()
        stub_ = reflection_pb2_grpc.ServerReflectionStub(channel)
        self.call = stub_.ServerReflectionInfo(iter(self._out.get, None), timeout=TIMEOUT * 2)

    def list_services(self) -> list[str]:
        self._out.put(reflection_pb2.ServerReflectionRequest(list_services=""))
        return [s.name for s in next(self.call).list_services_response.service]

    def close(self) -> None:
        self._out.put(None)
        self.call.cancel()


@pytest_twisted.ensureDeferred
async def test_every_long_lived_call_counts_against_the_stream_limit_and_unary_calls_keep_working(start) -> None:
    running = await start("--grpc-workers", "4", "--grpc-max-streams", "2")

    def scenario() -> dict[str, Any]:
        with grpc.insecure_channel(running.grpc_target) as channel:
            held = [ReflectionCall(channel) for _ in range(2)]
            listed = [call.list_services() for call in held]  # both streams are open on the server
            refused: dict[str, grpc.RpcError] = {}
            extra = ReflectionCall(channel)
            with pytest.raises(grpc.RpcError) as info:
                extra.list_services()
            refused["reflection"] = info.value
            extra.close()
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
            with pytest.raises(grpc.RpcError) as info:
                next(watch)
            refused["watch"] = info.value
            call = stub(channel).StreamMessages(pb.StreamRequest(room="lobby", user="sam"), timeout=TIMEOUT)
            with pytest.raises(grpc.RpcError) as info:
                next(call)
            refused["stream"] = info.value
            # Workers past the stream limit are kept for unary calls.
            replies = [send(channel, "lobby", "alice", f"m{i}") for i in range(3)]
            stats = stub(channel).GetStats(pb.StatsRequest(), timeout=TIMEOUT)
            for call_ in held:
                call_.close()
            return {"listed": listed, "refused": refused, "replies": replies, "stats": stats}

    r = await deferToThread(scenario)
    assert all("chat.ChatService" in services for services in r["listed"])
    for kind, error in r["refused"].items():
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, kind
        assert error.details() == "server full: 2 gRPC streams open, try again later", kind
    assert [reply.seq for reply in r["replies"]] == [1, 2, 3]
    assert r["stats"].messages_total == 3


@pytest_twisted.ensureDeferred
async def test_reflection_lists_the_chat_service(chatd) -> None:
    def scenario() -> tuple[list[str], list[str]]:
        with grpc.insecure_channel(chatd.grpc_target) as channel:
            db = ProtoReflectionDescriptorDatabase(channel)
            services = db.get_services()
            methods = [m.name for m in db.FindFileContainingSymbol("chat.ChatService").service[0].method]
            return services, methods

    services, methods = await deferToThread(scenario)
    assert "chat.ChatService" in services
    assert "grpc.health.v1.Health" in services
    assert methods == ["SendMessage", "StreamMessages", "GetStats", "Chat"]


@pytest_twisted.ensureDeferred
async def test_health_is_serving_then_not_serving_and_streams_end_unavailable_on_shutdown(grpc_server) -> None:
    running = await grpcservers.start_with(grpc_server)
    watching: defer.Deferred = defer.Deferred()
    from twisted.internet import reactor

    def scenario() -> tuple[list[int], grpc.RpcError, Any]:
        with Client(running.ws_url) as ws, grpc.insecure_channel(running.grpc_target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = health.Check(health_pb2.HealthCheckRequest(service="chat.ChatService"), timeout=TIMEOUT)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT * 2)
            statuses = [next(watch).status]
            ws.join("lobby", "wendy")
            call = stub(channel).StreamMessages(pb.StreamRequest(room="lobby", user="sam"), timeout=TIMEOUT * 2)
            presence_of(ws, "join", "sam")
            reactor.callFromThread(watching.callback, None)  # now stop the server
            statuses.append(next(watch).status)
            watch.cancel()
            with pytest.raises(grpc.RpcError) as info:
                next(call)
            return statuses, info.value, check.status

    scenario_done = deferToThread(scenario)
    await watching
    stopped = defer.maybeDeferred(running.service.stopService)
    statuses, error, checked = await scenario_done
    await stopped
    assert checked == health_pb2.HealthCheckResponse.SERVING
    assert statuses == [health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING]
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in error.details()

