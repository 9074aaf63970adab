"""The parent's side of the load client: start worker processes, hand out connections, run steps.

The parent never touches a socket: it spreads connections over the workers
(whole rooms per worker where it can), starts every step on one shared
schedule of unix times, and merges what the workers report: per-room sent
counts times per-room members give ``expected``; the workers' latency samples
give exact percentiles.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from array import array
from dataclasses import asdict

from bench.client import GRPC_KINDS, Conn, worker_main
from bench.servers import machine_busy


def percentile(sorted_values: list[int] | array, p: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))] / 1000  # µs -> ms


class ClientPool:
    """A set of client processes, each pinned to the client CPUs, that act together."""

    def __init__(self, urls: dict[str, str], procs: int, cpus: list[int] | None, payload: int = 128,
                 grpc_procs: int = 0, timeout: float = 120) -> None:
        self.timeout = timeout
        ctx = multiprocessing.get_context("fork")
        self.workers: list[tuple[object, multiprocessing.Process]] = []
        self.kinds: list[str] = []
        for i in range(procs + grpc_procs):
            parent, child = ctx.Pipe()
            uv = i < procs
            p = ctx.Process(target=worker_main, args=(child, urls, payload, cpus, uv), daemon=True)
            p.start()
            child.close()
            self.workers.append((parent, p))
            self.kinds.append("ws" if uv else "grpc")
        self.pids = [self._recv(i)["pid"] for i in range(len(self.workers))]

    def _recv(self, i: int, timeout: float | None = None) -> dict:
        pipe = self.workers[i][0]
        if not pipe.poll(timeout or self.timeout):  # type: ignore[attr-defined]
            raise TimeoutError(f"client process {i} did not answer within {timeout or self.timeout:.0f} s")
        msg = pipe.recv()  # type: ignore[attr-defined]
        if "error" in msg:
            raise RuntimeError(f"client process {i}: {msg['error']}")
        return msg

    def _all(self, msg: dict, timeout: float | None = None) -> list[dict]:
        for pipe, _ in self.workers:
            pipe.send(msg)  # type: ignore[attr-defined]
        return [self._recv(i, timeout) for i in range(len(self.workers))]

    def connect(self, conns: list[Conn], rate: float = 1000, concurrency: int = 256) -> dict:
        """Open every connection (gRPC kinds on the gRPC processes); rooms stay whole per process."""
        share: list[list[dict]] = [[] for _ in self.workers]
        ws_idx = [i for i, k in enumerate(self.kinds) if k == "ws"]
        grpc_idx = [i for i, k in enumerate(self.kinds) if k == "grpc"] or ws_idx
        for c in conns:
            group = grpc_idx if c.kind in GRPC_KINDS else ws_idx
            share[group[c.room % len(group)]].append(asdict(c))
        n = len(self.workers)
        for (pipe, _), mine in zip(self.workers, share):
            pipe.send({"cmd": "connect", "conns": mine, "rate": rate / n, "concurrency": max(1, concurrency // n),
                       "timeout": 30})  # type: ignore[attr-defined]
        replies = [self._recv(i, self.timeout + len(conns) / rate) for i in range(n)]
        hs = sorted(h for r in replies for h in r["handshake_s"])
        self.members: dict[int, int] = {}
        for r in replies:
            for room, m in r["members"].items():
                self.members[int(room)] = self.members.get(int(room), 0) + m
        return {
            "conns_ok": sum(r["ok"] for r in replies),
            "conns_failed": sum(r["failed"] for r in replies),
            "connect_time_s": round(max(r["wall_s"] for r in replies), 3),
            "handshake_p50_ms": round(hs[len(hs) // 2] * 1000, 2) if hs else 0,
            "handshake_p99_ms": round(hs[min(len(hs) - 1, int(0.99 * len(hs)))] * 1000, 2) if hs else 0,
            "first_error": next((r["first_error"] for r in replies if r["first_error"]), ""),
        }

    def expected(self, sent_rooms: list[dict]) -> tuple[int, int]:
        sent = expected = 0
        for sr in sent_rooms:
            for room, n in sr.items():
                sent += n
                expected += n * self.members.get(int(room), 0)
        return sent, expected

    def step(self, rate: float, warmup: float, duration: float, drain: float, seed: int,
             server=None) -> dict:
        """One measured window at ``rate`` messages/s per sender (open loop), then drain."""
        t0 = time.time_ns() + 200_000_000
        win_start = t0 + int(warmup * 1e9)
        win_end = win_start + int(duration * 1e9)
        self._all({"cmd": "step", "rate": rate, "t0": t0, "win_start": win_start, "win_end": win_end,
                   "seed": seed})
        time.sleep(max(0.0, (win_start - time.time_ns()) / 1e9))
        s0 = server.cpu() if server else float("nan")
        r0 = server.redis_cpu() if server else None
        m0 = machine_busy()
        peak = [0, 0]

        def sample() -> None:
            if server:
                rss, hwm = server.memory()
                peak[0], peak[1] = max(peak[0], rss), max(peak[1], hwm)

        while time.time_ns() < win_end:
            time.sleep(min(0.25, max(0.0, (win_end - time.time_ns()) / 1e9)))
            sample()
        s1 = server.cpu() if server else float("nan")
        r1 = server.redis_cpu() if server else None
        m1 = machine_busy()
        deadline = time.monotonic() + drain
        while time.monotonic() < deadline:
            counts = self._all({"cmd": "counts"})
            _, exp = self.expected([c["sent_room"] for c in counts])
            if not any(c["senders_running"] for c in counts) and sum(c["received"] for c in counts) >= exp:
                break
            time.sleep(0.02)
        replies = self._all({"cmd": "finish"})
        sent, expected = self.expected([r["sent_room"] for r in replies])
        received = sum(r["received"] for r in replies)
        lat = array("q")
        for r in replies:
            lat.frombytes(r["lat_us"])
        lat = sorted(lat)
        client_cpu = [r["cpu_s"] for r in replies]
        out = {
            "rate": rate,
            "duration_s": duration,
            "sent": sent,
            "expected": expected,
            "received": received,
            "lost": max(0, expected - received),
            "extra": max(0, received - expected),
            "loss_pct": round(100 * max(0, expected - received) / expected, 4) if expected else 0.0,
            "p50_ms": percentile(lat, 0.5),
            "p90_ms": percentile(lat, 0.9),
            "p99_ms": percentile(lat, 0.99),
            "p999_ms": percentile(lat, 0.999),
            "max_ms": lat[-1] / 1000 if lat else 0.0,
            "send_rate": round(sent / duration, 1),
            "deliveries_per_s": round(received / duration, 1),
            "disconnects": sum(r["disconnects"] for r in replies),
            "write_errors": sum(r["write_errors"] for r in replies),
            "client_procs": len(replies),
            "client_cpu_s": round(sum(client_cpu), 3),
            "client_cpu_pct": round(100 * sum(client_cpu) / duration, 1),
            "client_max_proc_cpu_pct": round(100 * max(client_cpu) / duration, 1),
        }
        # What else ran meanwhile (other processes, steal): a busy machine skews latency.
        others = (m1[0] - m0[0]) - sum(client_cpu) - (s1 - s0 if server and server.pid else 0)
        others -= (r1 - r0) if r0 is not None else 0
        out["other_cpu_pct"] = round(max(0.0, 100 * others / duration), 1)
        out["softirq_pct"] = round(100 * (m1[1] - m0[1]) / duration, 1)
        if server and server.pid:
            out["server_cpu_s"] = round(s1 - s0, 3)
            out["server_cpu_pct"] = round(100 * (s1 - s0) / duration, 1)
            out["server_rss_kb"], out["server_hwm_kb"] = peak
            if received:
                out["server_cpu_us_per_delivery"] = round(1e6 * (s1 - s0) / received, 2)
            if r0 is not None:
                out["redis_cpu_s"] = round(r1 - r0, 3)
                out["redis_cpu_pct"] = round(100 * (r1 - r0) / duration, 1)
        return out

    def frames(self) -> int:
        return sum(c["frames"] for c in self._all({"cmd": "counts"}))

    def quiesce(self, quiet: float = 0.3, limit: float = 10) -> bool:
        """Wait until nothing has arrived for ``quiet`` s (at most ``limit``): no backlog leaks into the next step."""
        end = time.monotonic() + limit
        last, stable = self.frames(), time.monotonic()
        while time.monotonic() < end:
            time.sleep(0.05)
            cur = self.frames()
            if cur != last:
                last, stable = cur, time.monotonic()
            elif time.monotonic() - stable >= quiet:
                return True
        return False

    def close(self) -> None:
        """Close every connection, then end the processes (only ours, by handle)."""
        try:
            self._all({"cmd": "close"}, timeout=30)
            for pipe, _ in self.workers:
                pipe.send({"cmd": "exit"})  # type: ignore[attr-defined]
        except (OSError, TimeoutError, RuntimeError, EOFError):
            pass
        for _, p in self.workers:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()


def client_cpus(spec: str | None) -> list[int] | None:
    if not spec:
        return None
    cpus: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def default_procs(cpus: list[int] | None) -> int:
    return len(cpus) if cpus else max(1, (os.cpu_count() or 2) - 1)
