"""CPU per message of the SQLite history writer, as the W2 chat workload loads it.

W2 is 1,000 rooms x 5 clients, each sending 1 msg/s: 5,000 messages a second
spread over 1,000 rooms, every room past ``--history-limit`` once the run has
warmed up. This drives :meth:`SQLiteStore._write` (the writer thread's
transaction) directly, in batches of a given size, on a file whose rooms
already hold ``limit`` rows each, and reports process CPU seconds (user +
system, every thread) per message. Measuring the transaction alone, not the
queue and the thread around it, keeps the figure about what a change to the
transaction changes.

``--baseline REV`` also loads ``chatd/store.py`` as it was at ``REV`` (git)
and runs it in the same process, alternating with the working tree's, so
that before and after come from the same run on the same (noisy) machine::

    flock /tmp/bench.lock .venv/bin/python -m bench.store_write --baseline HEAD
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import types
import uuid
from collections import OrderedDict
from typing import Any

from twisted.internet.task import Clock

from chatd import store as current
from chatd.events import Message


def baseline(rev: str) -> types.ModuleType:
    """``chatd/store.py`` at git revision ``rev``, as a module of its own."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = subprocess.run(
        ["git", "-C", root, "show", f"{rev}:chatd/store.py"], check=True, capture_output=True, text=True
    ).stdout
    spec = importlib.util.spec_from_loader("chatd._store_baseline", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    exec(compile(source, f"{rev}:chatd/store.py", "exec"), module.__dict__)
    return module


def traffic(rooms: int, per_room: int, seed: int) -> list[str]:
    """The rooms of ``rooms * per_room`` messages in W2's order: every room's senders, interleaved at random."""
    order = [f"r{i}" for i in range(rooms) for _ in range(per_room)]
    random.Random(seed).shuffle(order)
    return order


def run(module: types.ModuleType, directory: str, args: argparse.Namespace, batch: int) -> float:
    """CPU seconds per message of ``module``'s writer at ``batch`` messages per transaction."""
    path = os.path.join(directory, f"{module.__name__}-{batch}-{uuid.uuid4().hex[:6]}.sqlite3")
    store = module.SQLiteStore(Clock(), path, limit=args.limit, max_age=args.max_age)
    db = store._connect()
    seqs: OrderedDict[str, int] = OrderedDict()
    payload = "x" * args.payload
    rate = args.rooms * 5.0  # W2: 5 clients a room, 1 msg/s each
    clock = [time.time() - (args.limit + 1) / 5.0]

    def made(rooms: list[str]) -> list[list[tuple[Message, Any, Any]]]:
        """W2's messages (times as they come), cut into batches; made before the clock starts."""
        messages = []
        for room in rooms:
            clock[0] += 1 / rate
            messages.append((Message(uuid.uuid4().hex, 0, room, "user", payload, clock[0], "ws"), None, None))
        return [messages[i : i + batch] for i in range(0, len(messages), batch)]

    def write(batches: list[list[tuple[Message, Any, Any]]]) -> None:
        for writes in batches:
            results, failed = store._write(db, seqs, writes, [])
            assert failed is None, failed
            while len(seqs) > module.SEQ_CACHE:
                seqs.popitem(last=False)

    # Steady state as W2 reaches it: every room at its limit, its rows laid out as they came, its seq
    # anywhere (rooms started at different times), then a round of traffic through the writer for the
    # WAL and the caches.
    phase = random.Random(4)
    last = {f"r{i}": phase.randrange(args.limit) for i in range(args.rooms)}
    rows = []
    for writes in made(traffic(args.rooms, args.limit, seed=1)):
        for message, _, _ in writes:
            seq = last[message.room] = last[message.room] + 1
            rows.append((message.room, seq, message.id, message.user, message.text, message.time))
    db.execute("BEGIN")
    db.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, 'ws', NULL)", rows)
    db.executemany("INSERT INTO rooms VALUES (?, ?)", last.items())
    db.execute("COMMIT")
    write(made(traffic(args.rooms, 1, seed=2)))
    measured = made(traffic(args.rooms, args.per_room, seed=3))
    began = time.process_time()
    write(measured)
    spent = time.process_time() - began
    db.close()
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    return spent / sum(len(writes) for writes in measured)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", metavar="REV", help="also run chatd/store.py at this git revision")
    p.add_argument("--batches", default="5,20,100", help="messages per transaction, comma separated")
    p.add_argument("--rooms", type=int, default=1000)
    p.add_argument("--per-room", type=int, default=5, help="measured messages per room (W2: 5 a second)")
    p.add_argument("--limit", type=int, default=100, help="--history-limit")
    p.add_argument("--max-age", type=float, default=604800.0, help="--history-max-age")
    p.add_argument("--payload", type=int, default=128, help="bytes of message text")
    p.add_argument("--repeat", type=int, default=3, help="runs of each; the best is reported")
    args = p.parse_args()
    modules = [("after", current)]
    if args.baseline:
        modules.insert(0, ("before", baseline(args.baseline)))
    directory = tempfile.mkdtemp(prefix="store_write-")
    try:
        print(
            f"{args.rooms} rooms, limit {args.limit}, {args.rooms * args.per_room} messages measured, "
            f"best of {args.repeat}; CPU microseconds per message"
        )
        print(
            f"{'batch':>6} "
            + " ".join(f"{name:>8}" for name, _ in modules)
            + ("    ratio" if args.baseline else "")
        )
        for batch in (int(b) for b in args.batches.split(",")):
            best = {name: float("inf") for name, _ in modules}
            for _ in range(args.repeat):  # alternate: drift in the machine hits both alike
                for name, module in modules:
                    best[name] = min(best[name], run(module, directory, args, batch))
            line = f"{batch:>6} " + " ".join(f"{best[name] * 1e6:8.1f}" for name, _ in modules)
            if args.baseline:
                line += f"  {best['after'] / best['before']:7.2f}"
            print(line, flush=True)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
