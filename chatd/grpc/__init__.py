"""The gRPC protocol: ``proto/chat.proto`` served by grpcio next to the reactor.

grpcio runs its own server with a thread pool; :mod:`chatd.grpc.bridge` is
the only place where those worker threads meet the hub (through the reactor),
and :mod:`chatd.grpc.service` starts and stops the server as a Twisted service.
"""
