"""Which reactor turns of a ``twistd`` run long, and what ran in them (a diagnostic, not part of chatd).

Put this directory first on ``PYTHONPATH`` and name an output file; every
``twistd`` started so writes, at exit (or on ``SIGUSR2``), a JSON file with
the histogram of its reactor turns (the time between two polls, in ms), each
turn longer than ``STALL_MS`` (start, seconds since start; length), the
main thread's stack sampled every 2 ms while such a turn runs, and the
cyclic collector's pauses over 2 ms::

    PYTHONPATH=bench/stall_trace:. STALL_OUT=/tmp/stalls.json STALL_MS=6 \\
        .venv/bin/twistd -n chatd ...

The bench starts chatd with ``PYTHONPATH`` set to the tree, so for a bench
run copy this file into the venv's ``site-packages`` for the run (it does
nothing without ``STALL_OUT``) and remove it after. This is how W2's
periodic tails were found (README, "W2's tail, traced").
"""

from __future__ import annotations

import atexit
import collections
import gc
import json
import os
import signal
import sys
import threading
import time
import traceback

OUT = os.environ.get("STALL_OUT")

if OUT and "twistd" in sys.argv[0]:
    STALL = float(os.environ.get("STALL_MS", "8")) / 1000
    T0 = time.perf_counter()
    main_id = threading.main_thread().ident
    busy_since: list[float | None] = [None]
    turns: collections.Counter[int] = collections.Counter()
    long_turns: list[tuple[float, float]] = []
    pauses: list[tuple[float, int, float]] = []
    per_turn: dict[float, collections.Counter] = {}
    gc_started = [0.0]

    def _gc(phase: str, info: dict) -> None:
        now = time.perf_counter()
        if phase == "start":
            gc_started[0] = now
        elif now - gc_started[0] > 0.002:
            pauses.append((gc_started[0] - T0, info["generation"], now - gc_started[0]))

    gc.callbacks.append(_gc)

    class _Poller:
        """The reactor's epoll object, timing the gaps between its polls."""

        def __init__(self, poller: object) -> None:
            self._poller = poller

        def __getattr__(self, name: str) -> object:
            return getattr(self._poller, name)

        def poll(self, *args: object) -> object:
            now = time.perf_counter()
            began = busy_since[0]
            if began is not None:
                turns[min(int((now - began) * 1000), 200)] += 1
                if now - began > STALL:
                    long_turns.append((began - T0, now - began))
            busy_since[0] = None
            try:
                return self._poller.poll(*args)
            finally:
                busy_since[0] = time.perf_counter()

    def _watch() -> None:
        while True:
            reactor = sys.modules.get("twisted.internet.reactor")
            if reactor is not None and hasattr(reactor, "_poller") and reactor.running:
                reactor._poller = _Poller(reactor._poller)
                break
            time.sleep(0.05)
        while True:
            time.sleep(0.002)
            began = busy_since[0]
            if began is not None and time.perf_counter() - began > STALL:
                frame = sys._current_frames().get(main_id)
                if frame is not None:
                    stack = tuple(
                        f"{os.path.basename(f.filename)}:{f.lineno}:{f.name}" for f in traceback.extract_stack(frame)[-14:]
                    )
                    per_turn.setdefault(began, collections.Counter())[stack] += 1

    threading.Thread(target=_watch, daemon=True).start()

    def _dump(*_: object) -> None:
        with open(OUT, "w") as fh:
            json.dump(
                {
                    "turns_ms": sorted(turns.items()),
                    "long": long_turns[-5000:],
                    "gc_pauses": pauses,
                    "per_turn": [
                        [began - T0, [[n, list(stack)] for stack, n in c.most_common(3)]]
                        for began, c in list(per_turn.items())
                    ],
                },
                fh,
            )

    atexit.register(_dump)
    signal.signal(signal.SIGUSR2, _dump)
