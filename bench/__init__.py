"""chatd's benchmark: ``python -m bench`` (or ``make bench``) starts the servers, drives them, reports.

Modules: ``servers`` (chatd as users start it, the shared kit's peers, any
command or URL; CPU and RSS from /proc), ``client`` (the load client's worker
processes: picows on uvloop for WebSocket and SignalR, grpc.aio for gRPC),
``pool`` (the parent's side of the client), ``workloads`` (W1–W5 and the
registry other modules add to with ``bench.workloads.register``), ``report``
(the summary and the README's Markdown table). ``storm.py``, ``drain.py``,
``grpc_streams.py`` and ``w5_connect.sh`` still run on their own.
"""
