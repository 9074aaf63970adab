"""Python CPU per delivery of chatd's WebSocket fan-out, beside a bare ``send`` loop.

W1's CPU per delivery (``python -m bench W1``) moves by 10-15 % from one run
to the next on these shared machines, more than a change to the fan-out's
Python can show: at 10,000 deliveries a second the kernel's ``send`` is
more than half of a delivery. This measures the Python alone, in one
process, with no client and no reactor: ``--members`` WebSocket sessions
(chatd's own ``WebSocketSession`` on ``ChatServerProtocol`` objects, each
on a real ``tcp.Server`` transport over an AF_UNIX socket pair, switched to
the direct write path as an accepted connection is) in one room of a
``Hub``, and ``Hub.deliver`` of a fresh ``Message`` to all of them, against
the least any server does for the same frames (encode once, then
``socket.send`` to each). The difference is chatd's per-delivery Python.

The caches are hot here (one room, a tight loop), so the absolute figures
are lower than in a server that does other work between messages; what
they are for is a before/after of the same code path on the same machine.
``--baseline REV`` runs the ``chatd`` package as it was at git ``REV`` too,
in its own process, alternating rounds with the working tree::

    flock /tmp/bench.lock .venv/bin/python -m bench.fanout --baseline HEAD
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(members: int, messages: int, rounds: int, path: str = "delivery") -> dict[str, float]:
    """Median µs per delivery (or, ``path="message"``, per message) over ``rounds`` of ``messages`` fan-outs.

    ``message`` times the whole of a chat frame's handling after the
    WebSocket layer: ``dispatch`` of the kit's ``{"user","room","message"}``
    payload, validation, numbering, the (memory) store, the fan-out to
    every member and the metrics; the bare loop parses the same payload,
    encodes it once and sends it to every member.
    """
    import socket

    import orjson
    from twisted.internet import reactor, tcp
    from twisted.internet.task import Clock

    from chatd import fastwrite
    from chatd.events import Message
    from chatd.hub import Hub
    from chatd.websocket import ChatServerProtocol, WebSocketSession, dispatch, frame

    class Port:  # what tcp.Server asks of its listening port
        _realPortNumber = 1

        def _getLogPrefix(self, protocol: object) -> str:
            return "bench"

    hub = Hub(Clock())
    pairs = []
    for i in range(members):
        ours, theirs = socket.socketpair()
        for s in (ours, theirs):
            s.setblocking(False)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        proto = object.__new__(ChatServerProtocol)
        transport = tcp.Server(ours, proto, ("127.0.0.1", 1024 + i), Port(), i, reactor)
        transport.stopReading()  # no reactor reads these (one may be running: the tests')
        proto.transport = transport
        proto._perMessageCompress = None
        proto.logOctets = False  # factory options, set at a real connection's start
        proto.state = proto.STATE_OPEN
        session = WebSocketSession(proto, "bench", 1 << 22)
        session.user = f"u{i}"
        # what ChatServerProtocol.onOpen does for an accepted TCP connection, then the join
        hub.connect(session)
        session.budget.attach(transport)
        if fastwrite.install(transport) and hasattr(session, "direct"):
            session.direct = transport
        hub.join(session, "room")
        pairs.append((ours, theirs))
    seq = iter(range(10**9, 10**10))  # as many digits in every frame

    def message() -> Message:
        return Message("id", next(seq), "room", "u0", "a chat message of an ordinary length, say", 1.0, "ws")

    def chatd(n: int) -> None:
        for _ in range(n):
            hub.deliver(message())

    sender = hub.sessions[min(hub.sessions)]
    payload = b'{"user":"u0","room":"room","message":"a chat message of an ordinary length, say"}'

    def chatd_message(n: int) -> None:
        for _ in range(n):
            dispatch(hub, sender, payload)

    def bare_message(n: int) -> None:
        socks = [ours for ours, _ in pairs]
        for _ in range(n):
            request = orjson.loads(payload)
            m = Message("id", next(seq), request["room"], request["user"], request["message"], 1.0, "ws")
            data = frame(orjson.dumps(m.as_dict())).payloadHybi
            for s in socks:
                s.send(data)

    def bare(n: int) -> None:
        socks = [ours for ours, _ in pairs]
        for _ in range(n):
            payload = frame(orjson.dumps(message().as_dict())).payloadHybi
            for s in socks:
                s.send(payload)

    def drain() -> int:
        received = 0
        for _, theirs in pairs:
            try:
                while chunk := theirs.recv(1 << 20):
                    received += len(chunk)
            except BlockingIOError:
                pass
        return received

    size = len(frame(orjson.dumps(message().as_dict())).payloadHybi)

    runs = (("chatd", chatd), ("bare", bare)) if path == "delivery" else (("chatd", chatd_message), ("bare", bare_message))
    per = messages * members if path == "delivery" else messages
    results: dict[str, list[float]] = {"chatd": [], "bare": []}
    for _ in range(rounds):
        for name, run in runs:
            drain()
            t0 = time.process_time()
            run(messages)
            results[name].append((time.process_time() - t0) / per * 1e6)
            received = drain()  # every frame reached every member, or the figure means nothing
            if received < 0.9 * size * messages * members:
                raise SystemExit(f"{name}: {received} bytes received, {size * messages * members} expected")
    for ours, theirs in pairs:
        ours.close()
        theirs.close()
    out = {name: statistics.median(v) for name, v in results.items()}
    out["python"] = out["chatd"] - out["bare"]
    return out


def _tree_at(rev: str, into: str, *more: str) -> str:
    """The ``chatd`` package as it was at ``rev`` (and the top-level paths ``more``), unpacked under ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "chatd", *more], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", into], input=archive.stdout, check=True)
    return into


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--members", type=int, default=100, help="sessions in the room (W1: 100)")
    p.add_argument("--messages", type=int, default=20, help="fan-outs per round")
    p.add_argument("--rounds", type=int, default=30, help="rounds per process (the median is reported)")
    p.add_argument("--repeat", type=int, default=3, help="processes per tree, alternating")
    p.add_argument("--baseline", metavar="REV", help="also measure chatd at this git revision")
    p.add_argument("--path", choices=("delivery", "message"), default="delivery",
                   help="time one delivery (Hub.deliver), or one chat frame's whole handling (use --members 5: W2)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.members, args.messages, args.rounds, args.path)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        trees = [("now", str(ROOT))]
        if args.baseline:
            trees.insert(0, (f"at {args.baseline}", _tree_at(args.baseline, tmp)))
        figures: dict[str, list[dict[str, float]]] = {name: [] for name, _ in trees}
        child = [sys.executable, "-m", "bench.fanout", "--child", "--members", str(args.members),
                 "--messages", str(args.messages), "--rounds", str(args.rounds), "--path", args.path]  # fmt: skip
        for r in range(args.repeat):
            for name, path in trees if r % 2 == 0 else trees[::-1]:
                env = {**os.environ, "PYTHONPATH": f"{path}{os.pathsep}{ROOT}"}
                # cwd first on sys.path (python -m): the tree's chatd, the bench from ROOT
                done = subprocess.run(child, env=env, cwd=path, capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"{name}: {done.stderr.strip()}")
                figures[name].append(json.loads(done.stdout))
    unit = f"µs/{args.path}"
    print(f"{'chatd':>12}  {unit:>11}  {'bare send':>9}  {'chatd Python':>12}   (medians of {args.repeat})")
    for name, runs in figures.items():
        med = {k: statistics.median(run[k] for run in runs) for k in ("chatd", "bare", "python")}
        print(f"{name:>12}  {med['chatd']:11.2f}  {med['bare']:9.2f}  {med['python']:12.2f}")


if __name__ == "__main__":
    main()
