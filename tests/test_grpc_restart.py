"""A gRPC service started again after a stop says SERVING again.

Health's servicer, once told of the shutdown, ignores every later status:
started again (from the manhole, or a test), the service answered
NOT_SERVING for good. Run in a subprocess on each server kind.
"""

from __future__ import annotations

import pytest

from tests.daemon import run_python

_SCENARIO = """
import os, sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from twisted.internet import defer, reactor, task, threads
from chatd.hub import Hub
from chatd.validate import Limits
from chatd.grpc.aio import AioGrpcService
from chatd.grpc.service import GrpcService

Service = AioGrpcService if sys.argv[1] == "aio" else GrpcService

def check(port):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=3).status

@defer.inlineCallbacks
def go():
    hub = Hub(reactor, limits=Limits(history_limit=10))
    hub.startService()
    service = Service(hub, reactor, "127.0.0.1:0", grace=0.2)
    service.startService()
    yield task.deferLater(reactor, 2 * service.health_interval, lambda: None)
    print("first", (yield threads.deferToThread(check, service.port)))
    yield service.stopService()
    service.startService()
    yield task.deferLater(reactor, 2 * service.health_interval + 0.5, lambda: None)
    print("again", (yield threads.deferToThread(check, service.port)), flush=True)
    os._exit(0)

reactor.callWhenRunning(go)
reactor.run()
"""


@pytest.mark.parametrize("kind", ["aio", "threaded"])
def test_a_grpc_service_started_again_after_a_stop_is_serving(kind: str) -> None:
    done = run_python(_SCENARIO, kind)
    assert done.stdout.split() == ["first", "1", "again", "1"], (done.stdout, done.stderr[-3000:])
