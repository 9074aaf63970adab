"""CPU per WebSocket connection (accept, upgrade, join, close), chatd beside the Twisted floor, in one process.

W5's CPU per connection (``bench/w5_connect.sh``) moves by 20 % and more
between runs on these shared machines, more than a change to chatd's
connection path can show. This drives the same life of a connection in
one process, with no load generator: chatd's whole service tree (built by
``chatd.tap.makeService`` with the bench's options and a history file, as
``twistd -n chatd`` builds it) on a real loopback listener, and clients on
plain non-blocking sockets in the same thread. Rooms of five connect,
upgrade and join one after another (each join answered with presence to
the room and a ``joined`` frame); then every client sends a close frame
and waits for the server to close. The same clients against
``bench.floor --presence`` (the least a Twisted server does for those
frames) give the floor; the client's own work is the same for both, so
the difference is what chatd adds.

``--baseline REV`` measures the ``chatd`` package as it was at git ``REV``
too, alternating processes with the working tree::

    flock /tmp/bench.lock .venv/bin/python -m bench.connect --baseline HEAD
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.fanout import _tree_at

ROOT = Path(__file__).resolve().parent.parent
ROOM = 5
_KEY = base64.b64encode(b"0123456789abcdef")
_UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: " + _KEY + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def _masked(payload: bytes, opcode: int = 0x1) -> bytes:
    """A client frame; the zero mask keeps the payload as it is (valid: RFC 6455 only asks for a mask)."""
    assert len(payload) < 126
    return bytes((0x80 | opcode, 0x80 | len(payload))) + b"\0\0\0\0" + payload


_CLOSE = _masked(b"\x03\xe8", 0x8)


def _server(kind: str, data_dir: str) -> tuple[int, object]:
    """Start chatd's service tree or the presence floor on this process's reactor; its port and a stop."""
    from twisted.internet import reactor

    if kind == "floor":
        from bench.floor import FloorFactory

        port = reactor.listenTCP(0, FloorFactory(presence=True), backlog=4096, interface="127.0.0.1")
        return port.getHost().port, port.stopListening
    from bench.servers import LOAD_OPTIONS
    from chatd import tap

    options = tap.Options(environ={})
    options.parseOptions(
        ["--ws", "tcp:0:interface=127.0.0.1", "--signalr", "tcp:0:interface=127.0.0.1", "--web",
         "tcp:0:interface=127.0.0.1", "--grpc", "127.0.0.1:0", "--data-dir", data_dir, *LOAD_OPTIONS]
    )  # fmt: skip
    service = tap.makeService(options, reactor=reactor)
    service.startService()
    listening = service.getServiceNamed("ws").whenListening()
    ports: list = []
    listening.addCallback(ports.append)
    while not ports:
        reactor.iterate(0.01)
    return ports[0].getHost().port, service.stopService


def _pump(socks: list[socket.socket], until: bytes | None) -> None:
    """Turn the reactor until every client has read ``until`` (``None``: until the server closed it)."""
    from twisted.internet import reactor

    got = {s: b"" for s in socks}
    waiting = set(socks)
    for _ in range(100_000):
        reactor.iterate(0)
        for s in list(waiting):
            try:
                chunk = s.recv(65536)
            except BlockingIOError:
                continue
            if until is None:
                if not chunk:
                    waiting.discard(s)
                continue
            got[s] += chunk
            if until in got[s]:
                waiting.discard(s)
        if not waiting:
            return
    raise SystemExit(f"{len(waiting)} clients still waiting for {until!r}")


def measure(kind: str, conns: int, rounds: int) -> dict[str, float]:
    """Median µs of process CPU per connection's life, over ``rounds`` of ``conns`` connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory() as tmp:
        port, stop = _server(kind, os.path.join(tmp, "data"))
        addr = ("127.0.0.1", port)
        per_conn = []
        for r in range(rounds + 1):  # the first round warms up
            t0 = time.process_time()
            clients: list[socket.socket] = []
            for room in range(conns // ROOM):
                socks = []
                for _ in range(ROOM):
                    s = socket.socket()
                    s.connect(addr)  # loopback: the kernel completes it before accept
                    s.setblocking(False)
                    s.send(_UPGRADE)
                    socks.append(s)
                _pump(socks, b"\r\n\r\n")
                for i, s in enumerate(socks):
                    s.send(_masked(b'{"type":"join","room":"r%d-%d","user":"u%d"}' % (r, room, i)))
                _pump(socks, b'"joined"')
                clients += socks
            for s in clients:
                s.send(_CLOSE)
            _pump(clients, None)
            for s in clients:
                s.close()
            per_conn.append(1e6 * (time.process_time() - t0) / len(clients))
        stop()
    return {"per_conn": statistics.median(per_conn[1:])}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conns", type=int, default=2000, help="connections per round, in rooms of 5")
    p.add_argument("--rounds", type=int, default=5, help="rounds per process (the median is reported)")
    p.add_argument("--repeat", type=int, default=3, help="processes per server, alternating")
    p.add_argument("--baseline", metavar="REV", help="also measure chatd at this git revision")
    p.add_argument("--child", choices=("chatd", "floor"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.conns, args.rounds)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        servers = [("floor", "floor", str(ROOT)), ("chatd now", "chatd", str(ROOT))]
        if args.baseline:
            servers.insert(1, (f"chatd at {args.baseline}", "chatd", _tree_at(args.baseline, tmp, "web")))
        figures: dict[str, list[float]] = {name: [] for name, _, _ in servers}
        for r in range(args.repeat):
            for name, kind, path in servers if r % 2 == 0 else servers[::-1]:
                env = {**os.environ, "PYTHONPATH": f"{path}{os.pathsep}{ROOT}"}
                child = [sys.executable, "-m", "bench.connect", "--child", kind, "--conns", str(args.conns),
                         "--rounds", str(args.rounds)]  # fmt: skip
                done = subprocess.run(child, env=env, cwd=path, capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"{name}: {done.stderr.strip()[-2000:]}")
                figures[name].append(json.loads(done.stdout)["per_conn"])
    floor = statistics.median(figures["floor"])
    print(
        f"{'server':>16}  {'µs/connection':>13}  {'above floor':>11}   (medians of {args.repeat} processes; each process)"
    )
    for name, runs in figures.items():
        med = statistics.median(runs)
        print(f"{name:>16}  {med:13.1f}  {med - floor:11.1f}   {' '.join(f'{x:.0f}' for x in runs)}")


if __name__ == "__main__":
    main()
