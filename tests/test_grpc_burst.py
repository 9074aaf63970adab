"""Thousands of gRPC streams opened at once: each is taken in or refused by chatd, never dropped by grpc.

A restarted server meets every subscriber reconnecting in the same second.
grpc's core keeps a call it has not yet handed to the application in a
pending queue, and past ``grpc.server.max_pending_requests`` (1,000 by
default) it cancels new calls at random, past the hard limit (3,000) every
one: the client sees a bare ``CANCELLED`` that says nothing. chatd's own
stream limit (``--grpc-max-streams``, ``RESOURCE_EXHAUSTED`` with a reason)
is the one that must decide.

The client is a separate process (grpcio's asyncio client, several HTTP/2
connections) against ``twistd -n chatd``, so the burst reaches the server as
a storm of real clients does.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.daemon import Daemon, source_env

BURST_CLIENT = textwrap.dedent(
    """
    import asyncio, collections, json, sys, time
    import grpc, grpc.aio
    from chatd.grpc.generated import chat_pb2 as pb
    from chatd.grpc.generated.chat_pb2_grpc import ChatServiceStub

    async def main(target, n, connections):
        channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(connections)]
        stubs = [ChatServiceStub(c) for c in channels]
        got, errors, cancelling = {}, [], False

        async def subscribe(i):
            call = stubs[i % connections].StreamMessages(pb.StreamRequest(room="storm", user=f"s{i}"))
            try:
                async for event in call:
                    got[i] = event.seq
            except grpc.aio.AioRpcError as e:
                if not cancelling:  # not this client's own cancel at the end
                    errors.append(f"{e.code().name}: {e.details()}")

        tasks = [asyncio.ensure_future(subscribe(i)) for i in range(n)]
        deadline = time.monotonic() + 90
        async def settled():  # every stream is either open on the server or has ended
            stats = await stubs[0].GetStats(pb.StatsRequest(), timeout=10)
            return stats.connections_by_protocol["grpc"] + len(errors) >= n
        while not await settled() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        opened = n - len(errors)
        reply = await stubs[0].SendMessage(pb.MessageRequest(user="ann", room="storm", message="back"), timeout=10)
        while sum(1 for s in got.values() if s >= reply.seq) < opened and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        received = sum(1 for s in got.values() if s >= reply.seq)
        cancelling = True
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        print(json.dumps({"received": received, "errors": dict(collections.Counter(errors))}))

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
    """
)


def burst(daemon: Daemon, streams: int, connections: int = 8) -> dict:
    """Open ``streams`` StreamMessages at once; how many got the next message, and every error."""
    done = subprocess.run(
        [sys.executable, "-c", BURST_CLIENT, f"127.0.0.1:{daemon.ports['grpc']}", str(streams), str(connections)],
        env=source_env(),
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def limits(streams: int) -> list[str]:
    # every client is 127.0.0.1; --max-message-rate 0: the one sender is not the point
    return ["--grpc-max-streams", str(streams), "--max-connections", str(streams + 100),
            "--max-connections-per-ip", "0", "--max-message-rate", "0"]  # fmt: skip


def test_a_burst_of_4500_streams_is_taken_in_whole() -> None:
    with Daemon(*limits(5000)) as daemon:
        daemon.wait_healthy()
        result = burst(daemon, 4500)
        assert result == {"received": 4500, "errors": {}}, daemon.output[-2000:]


@pytest.mark.parametrize("server", ["aio", "threaded"])
def test_a_burst_past_the_stream_limit_is_refused_by_chatd_with_its_reason(server: str) -> None:
    with Daemon(*limits(200), "--grpc-server", server, "--grpc-workers", "300") as daemon:
        daemon.wait_healthy()
        result = burst(daemon, 3500)
        refused = "RESOURCE_EXHAUSTED: server full: 200 gRPC streams open, try again later"
        errors = result["errors"]
        assert result["received"] == 200 and sum(errors.values()) == 3300, daemon.output[-2000:]
        if server == "aio":
            assert errors == {refused: 3300}
        else:
            # The threaded server refuses in a worker thread: in a burst, calls past its
            # --grpc-workers are refused by grpcio's own pool limit, RESOURCE_EXHAUSTED too.
            assert set(errors) <= {refused, "RESOURCE_EXHAUSTED: Concurrent RPC limit exceeded!"}, errors
