"""The gRPC stream path on both servers, and what only ``--grpc-server aio`` promises.

The slow-stream bound and a drain are checked over real sockets on both
servers; the aio server's own claims (a stream holds no thread, a fan-out
wakes its loop once, a ``twistd`` drain ends its streams ``UNAVAILABLE``)
are checked on it alone.
"""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import socket
import threading
import urllib.request
from typing import Any

import grpc
import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet.task import Clock
from twisted.internet.threads import blockingCallFromThread, deferToThread

from chatd.grpc.aio import AioGrpcSession, GrpcLoop, Outbox
from chatd.grpc.generated import chat_pb2 as pb
from chatd.grpc.generated.chat_pb2_grpc import ChatServiceStub
from chatd.hub import Hub
from chatd.validate import Limits
from tests import grpcservers
from tests.daemon import Daemon, run_python
from tests.wsclient import Client

start, grpc_server = grpcservers.start, grpcservers.grpc_server

TIMEOUT = 30


def grpc_sessions(hub: Hub) -> int:
    return sum(1 for s in hub.sessions.values() if s.protocol == "grpc")


def joined(ws: Client, user: str) -> None:
    """Wait for ``user``'s join in ``ws``'s room: the server has taken the stream in."""
    ws.recv_until(lambda f: (f.get("type"), f.get("action"), f.get("user")) == ("presence", "join", user))


@pytest_twisted.ensureDeferred
async def test_a_stream_that_does_not_read_is_ended_resource_exhausted_with_a_resume_hint(start) -> None:
    running = await start("--grpc-stream-queue", "5", "--max-message-rate", "0", "--history-limit", "10")
    text = "x" * 4000

    def scenario() -> tuple[int, list[int], grpc.RpcError, int]:
        with grpc.insecure_channel(running.grpc_target) as channel, Client(running.ws_url) as ws:
            stub = ChatServiceStub(channel)
            ws.join("lobby", "wendy")
            call = stub.StreamMessages(pb.StreamRequest(room="lobby", user="slow"), timeout=TIMEOUT)
            joined(ws, "slow")
            ws.close()  # the watcher is done: only the stream does not read
            # Send until the server gives up on the reader (bounded: 8,000 x 4 KB
            # is far past any flow-control window and socket buffer).
            sent = 0
            while sent < 8000 and blockingCallFromThread(global_reactor, grpc_sessions, running.hub):
                for _ in range(50):
                    stub.SendMessage(pb.MessageRequest(user="fast", message=text, room="lobby"), timeout=TIMEOUT)
                    sent += 1
            received: list[int] = []
            try:
                for response in call:
                    received.append(response.seq)
            except grpc.RpcError as e:
                error = e
            # The room went on without the slow reader.
            after = stub.SendMessage(pb.MessageRequest(user="fast", message="still here", room="lobby"), timeout=10)
            return sent, received, error, after.seq

    sent, received, error, last = await deferToThread(scenario)
    assert grpc_sessions(running.hub) == 0
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "too slow: more than 5 events waiting" in error.details()
    # What was delivered is in order, without a gap, and the hint resumes after it.
    assert received == list(range(1, len(received) + 1))
    assert f"lobby since_seq={received[-1]}" in error.details()
    assert len(received) < sent < last


@pytest_twisted.ensureDeferred
async def test_aio_streams_hold_no_thread_each_and_all_get_the_fan_out(start) -> None:
    running = await start("--grpc-server", "aio", "--grpc-max-streams", "500", "--max-connections-per-ip", "0")
    streams = 200

    def scenario() -> tuple[int, int, list[str]]:
        before = threading.active_count()
        with grpc.insecure_channel(running.grpc_target) as channel, Client(running.ws_url) as ws:
            ws.join("fan", "watcher")
            stub = ChatServiceStub(channel)
            calls = []
            for i in range(streams):
                calls.append(stub.StreamMessages(pb.StreamRequest(room="fan", user=f"u{i}"), timeout=TIMEOUT))
                joined(ws, f"u{i}")
            members = blockingCallFromThread(global_reactor, lambda: len(running.hub.members("fan")))
            during = threading.active_count()
            stub.SendMessage(pb.MessageRequest(user="sender", message="to all", room="fan"), timeout=TIMEOUT)
            got = [next(call).message for call in calls]
            for call in calls:
                call.cancel()
        return members, during - before, got

    members, more_threads, got = await deferToThread(scenario)
    assert members == streams + 1
    assert got == ["to all"] * streams
    # The threaded server would hold one more thread per stream here.
    assert more_threads < 20, f"{more_threads} threads for {streams} aio streams"


@pytest_twisted.ensureDeferred
async def test_a_burst_to_many_streams_reaches_every_stream_whole_and_in_order(start) -> None:
    running = await start(
        "--max-message-rate", "0", "--max-connections-per-ip", "0", "--history-limit", "1000"
    )
    streams, messages = 20, 300

    def scenario() -> list[list[int]]:
        with grpc.insecure_channel(running.grpc_target) as channel, Client(running.ws_url) as ws:
            ws.join("burst", "watcher")
            stub = ChatServiceStub(channel)
            calls = []
            for i in range(streams):
                request = pb.StreamRequest(room="burst", user=f"u{i}")
                calls.append(stub.StreamMessages(request, timeout=TIMEOUT))
                joined(ws, f"u{i}")
            # Sent from a thread of its own while the streams are read: writes
            # complete in batches, many queued per stream at a time.
            def send_all() -> None:
                for n in range(messages):
                    message = pb.MessageRequest(user="fast", message=f"m{n}", room="burst")
                    stub.SendMessage(message, timeout=TIMEOUT)

            sender = threading.Thread(target=send_all)
            sender.start()
            seqs = [[next(call).seq for _ in range(messages)] for call in calls]
            sender.join(TIMEOUT)
            for call in calls:
                call.cancel()
        return seqs

    seqs = await deferToThread(scenario)
    assert seqs == [list(range(1, messages + 1))] * streams


def test_grpcs_wakeup_socket_is_read_in_one_go_leaving_grpc_its_own_byte() -> None:
    class Poller:  # grpc.aio's PollerCompletionQueue, as far as the loop sees it
        def __init__(self, sock: socket.socket) -> None:
            self.sock = sock
            self.calls = 0

        def _handle_events(self, loop: Any) -> None:
            self.sock.recv(1)  # grpc's reader takes one byte (and raises if there is none)
            self.calls += 1

    loop = GrpcLoop()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    poller = Poller(ours)
    added: list[Any] = []
    loop._add_reader = lambda fd, callback, *args: added.append(callback)  # type: ignore[method-assign]
    try:
        loop.add_reader(ours, functools.partial(poller._handle_events, loop))
        loop.add_reader(theirs, print)  # anything else is left as it is
        (read, other) = added
        assert other is print

        theirs.send(b"1" * 7)  # seven completions queued before the loop got round to them
        read()
        assert poller.calls == 1
        with pytest.raises(BlockingIOError):
            ours.recv(1)  # all seven bytes taken in one turn of the loop
        theirs.send(b"1")
        read()  # one byte: grpc's reader takes it itself
        assert poller.calls == 2
        with pytest.raises(BlockingIOError):
            ours.recv(1)
    finally:
        loop.close()
        ours.close()
        theirs.close()


def test_a_fan_out_to_many_aio_streams_wakes_their_loop_once() -> None:
    class CountingLoop:
        def __init__(self) -> None:
            self.calls: list[Any] = []

        def call_soon_threadsafe(self, f: Any, *args: Any) -> None:
            self.calls.append((f, args))

    hub = Hub(Clock(), limits=Limits(history_limit=10))
    hub.startService()
    loop = CountingLoop()
    outbox = Outbox(loop)  # type: ignore[arg-type]
    real = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(real)  # the sessions' queues make their asyncio.Event here
        sessions = []
        for i in range(50):
            session = AioGrpcSession(outbox, hub, Clock(), "peer", 10, False)
            hub.connect(session)
            hub.identify(session, f"u{i}")
            hub.join(session, "lobby")
            sessions.append(session)
        loop.calls.clear()  # the joins' presence events went out already

        hub.publish("lobby", "bob", "one", "websocket")
        hub.publish("lobby", "bob", "two", "websocket")
        assert len(loop.calls) == 1  # one wake-up for two fan-outs to 50 streams
        assert all(s._queue.qsize() == 2 for s in sessions)

        waiters = [real.create_future() for _ in sessions]  # as each call's coroutine waits
        for s, w in zip(sessions, waiters):
            s._queue.waiter = w
        (flush, args), = loop.calls
        flush(*args)  # the loop runs the batch
        assert all(w.done() for w in waiters) and all(s._queue.waiter is None for s in sessions)
        hub.publish("lobby", "bob", "three", "websocket")
        assert len(loop.calls) == 2  # the next fan-out wakes the loop again
    finally:
        asyncio.set_event_loop(None)
        real.close()


def test_twistd_with_the_aio_server_drains_streams_with_unavailable_and_exits_cleanly() -> None:
    with Daemon("--grpc-server", "aio", "--drain-timeout", "5") as daemon:
        daemon.wait_healthy()
        target = f"127.0.0.1:{daemon.ports['grpc']}"
        with grpc.insecure_channel(target) as channel, Client(daemon.ws_url) as ws:
            ws.join("lobby", "wendy")
            stub = ChatServiceStub(channel)
            call = stub.StreamMessages(pb.StreamRequest(room="lobby", user="sam"), timeout=TIMEOUT)
            joined(ws, "sam")
            reply = stub.SendMessage(pb.MessageRequest(user="ann", message="hi", room="lobby"), timeout=TIMEOUT)
            assert next(call).seq == reply.seq
            with urllib.request.urlopen(daemon.url(path="/stats"), timeout=10) as r:
                assert json.loads(r.read())["connections"]["grpc"] == 1
            ws.close()
            output = daemon.stop(signal.SIGTERM)
            try:
                next(call)
                raise AssertionError("the stream outlived the server")
            except grpc.RpcError as e:
                assert e.code() is grpc.StatusCode.UNAVAILABLE
                assert "shutting down" in e.details()
        assert daemon.proc.returncode == 0, output
        assert "aio server" in output


_STOP_BEFORE_START = """
import time
from twisted.internet import reactor
from chatd.grpc.aio import AioGrpcService, _Loop
from chatd.hub import Hub
from chatd.validate import Limits

def go():
    hub = Hub(reactor, limits=Limits(history_limit=10))
    hub.startService()
    service = AioGrpcService(hub, reactor, "127.0.0.1:0")
    # The loop is busy (as when it serves other calls) while the service starts and stops:
    # the stop is queued on the loop before the server's start has run its first step.
    _Loop.get().call_soon_threadsafe(time.sleep, 0.3)
    service.startService()
    done = service.stopService()
    done.addCallbacks(lambda _: print("stopped"), lambda f: print("stop failed", f.getErrorMessage()))
    done.addBoth(lambda _: reactor.stop())

reactor.callWhenRunning(go)
reactor.run()
"""


def test_an_aio_server_stopped_before_its_start_has_run_stops_cleanly() -> None:
    """A stop (SIGTERM, a test's teardown) right after the start waits for the start.

    Before, grpc core's server was shut down first and then started: the
    start dereferenced a listener the shutdown had released (SIGSEGV).
    """
    done = run_python(_STOP_BEFORE_START)
    assert (done.returncode, done.stdout.strip()) == (0, "stopped"), done.stderr[-3000:]


def test_chat_streams_ended_by_a_drain_log_no_failure() -> None:
    """A Chat whose client's side is still open, ended from the server (here a drain), is no failure.

    Its reader, waiting for the client's next event, gets grpcio's
    ``AbortError``; it was logged as a critical "request failed" with a
    traceback, one per open Chat at every shutdown (and at every stream ended
    as too slow or by an operator).
    """
    import queue

    with Daemon("--grpc-server", "aio", "--drain-timeout", "1") as daemon:
        daemon.wait_healthy()
        with grpc.insecure_channel(f"127.0.0.1:{daemon.ports['grpc']}") as channel:
            stub = ChatServiceStub(channel)
            calls = []
            for i in range(3):
                outbox: queue.Queue = queue.Queue()
                outbox.put(pb.ChatEvent(join=pb.Join(room="lobby", user=f"cat{i}")))
                call = stub.Chat(iter(outbox.get, None), timeout=TIMEOUT)
                next(call)  # the join has been handled
                calls.append((outbox, call))
            output = daemon.stop(signal.SIGTERM)
            for outbox, call in calls:
                with pytest.raises(grpc.RpcError) as ended:
                    for _ in call:  # presence of the later joins, then the end
                        pass
                assert ended.value.code() is grpc.StatusCode.UNAVAILABLE
                outbox.put(None)
    assert daemon.proc.returncode == 0, output
    assert "request failed" not in output, output[-3000:]
