"""A health ``Watch`` client that grants no flow-control window cannot freeze health.

Health is open to anyone (no token). With grpcio's servicers as they come,
one ``Watch`` whose client set HTTP/2 ``INITIAL_WINDOW_SIZE`` to 0 held the
servicer's lock while its write waited: on the aio server ``Check`` then
answered SERVING for good (the status change waited on that lock), on the
threaded server every ``Check`` waited on it until its deadline, holding a
worker. Each scenario runs in a subprocess so a wedged server fails the
test rather than hanging pytest.
"""

from __future__ import annotations

import pytest

from tests.daemon import run_python

_SCENARIO = """
import os, socket, struct, sys
import grpc, h2.config, h2.connection, h2.settings
from grpc_health.v1 import health_pb2, health_pb2_grpc
from twisted.internet import defer, reactor, task, threads
from chatd.hub import Hub
from chatd.validate import Limits

if sys.argv[1] == "aio":
    from chatd.grpc.aio import AioGrpcService as Service
else:
    from chatd.grpc.service import GrpcService as Service

def stuck_watch(port):
    # A Watch whose client grants the server no window, so its first write never completes.
    s = socket.create_connection(("127.0.0.1", port))
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    body = health_pb2.HealthCheckRequest(service="").SerializeToString()
    c.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":path", "/grpc.health.v1.Health/Watch"),
                       (":authority", "x"), ("content-type", "application/grpc"), ("te", "trailers")])
    c.send_data(1, b"\\0" + struct.pack(">I", len(body)) + body, end_stream=True)
    s.sendall(c.data_to_send())
    return s

def check(port):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=3).status
        except grpc.RpcError as e:
            return e.code().name

@defer.inlineCallbacks
def go():
    hub = Hub(reactor, limits=Limits(history_limit=10))
    hub.startService()
    service = Service(hub, reactor, "127.0.0.1:0")
    service.startService()
    port = yield service.whenListening()
    print("before", (yield threads.deferToThread(check, port)), flush=True)
    held = stuck_watch(port)
    yield task.deferLater(reactor, 0.5, lambda: None)
    hub.store.problem = "disk full"  # the hub is unhealthy: health must say so
    yield task.deferLater(reactor, 2 * service.health_interval + 0.5, lambda: None)
    print("after", (yield threads.deferToThread(check, port)), flush=True)
    os._exit(0)

reactor.callWhenRunning(go)
reactor.run()
"""


@pytest.mark.parametrize("kind", ["aio", "threaded"])
def test_a_health_watch_that_grants_no_window_does_not_freeze_health(kind: str) -> None:
    done = run_python(_SCENARIO, kind)
    assert done.stdout.split() == ["before", "1", "after", "2"], (done.stdout, done.stderr[-3000:])
