"""The gRPC protocol: ``proto/chat.proto`` served by grpcio next to the reactor.

grpcio runs its own server, on threads (``--grpc-server threaded``, the
default: a worker per call) or on one asyncio loop of its own
(``--grpc-server aio``, :mod:`chatd.grpc.aio`). :mod:`chatd.grpc.bridge` is
where grpcio's side meets the hub (always through the reactor), and
:mod:`chatd.grpc.service` starts and stops the server as a Twisted service.
"""
