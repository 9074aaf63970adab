"""How a graceful shutdown spreads its closes: N WebSocket clients, then SIGTERM.

    .venv/bin/python bench/drain.py 1000 6

starts ``twistd -n chatd`` on free loopback ports with DRAIN_TIMEOUT=6,
opens N clients, sends SIGTERM and reports when the clients saw their close
(and with which code) and when the process exited, with which status.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import websockets

ROOT = Path(__file__).resolve().parent.parent
TWISTD = Path(sys.executable).with_name("twistd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def main(n: int, drain_timeout: int) -> None:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), DRAIN_TIMEOUT=str(drain_timeout))
    loopback = "tcp:0:interface=127.0.0.1"
    argv = [str(TWISTD), "-n", "--pidfile=", "chatd", "--ws", f"tcp:{port}:interface=127.0.0.1"]
    argv += [
        "--signalr",
        loopback,
        "--web",
        loopback,
        "--grpc",
        "127.0.0.1:0",
        "--max-connections",
        str(n + 100),
        "--max-connections-per-ip",
        "0",  # every client comes from 127.0.0.1
    ]
    # The daemon logs a line per client: to a file, so a full pipe never stalls it.
    with tempfile.NamedTemporaryFile("w", prefix="chatd-drain-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        url = f"ws://127.0.0.1:{port}/ws"
        clients = [await websockets.connect(url, open_timeout=30, ping_interval=None) for _ in range(n)]
        closed: list[tuple[float, int | None]] = []

        async def watch(ws) -> None:
            await ws.wait_closed()
            closed.append((time.monotonic(), ws.close_code))

        watchers = [asyncio.create_task(watch(ws)) for ws in clients]
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        await asyncio.gather(*watchers)
        status = await asyncio.to_thread(proc.wait, drain_timeout + 30)
        exited = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
    times = sorted(t - start for t, _ in closed)
    codes: dict[int | None, int] = {}
    for _, code in closed:
        codes[code] = codes.get(code, 0) + 1
    print(
        f"clients={n} drain_timeout={drain_timeout}s exit_status={status} exited_after={exited:.2f}s "
        f"close_codes={codes} first={times[0]:.2f}s median={times[len(times) // 2]:.2f}s last={times[-1]:.2f}s"
    )
    print(f"daemon log: {log.name}")


if __name__ == "__main__":
    asyncio.run(
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 500, int(sys.argv[2]) if len(sys.argv) > 2 else 6)
    )
