"""``twistd -n chatd --workers 2 --redis ...``: two processes behind the same ports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time

from tests.daemon import TWISTD, Daemon, free_ports, listener_args, source_env
from tests.wsclient import Client


def workers_of(daemon: Daemon) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(daemon.proc.pid)], capture_output=True, text=True).stdout
    return sorted(int(p) for p in out.split())


def serving_pids(port: int) -> dict[int, int]:
    """How many established connections each process holds on ``port`` (from ``ss``)."""
    out = subprocess.run(
        ["ss", "-Htnp", "state", "established", f"( sport = :{port} )"], capture_output=True, text=True
    ).stdout
    counts: dict[int, int] = {}
    for line in out.splitlines():
        for part in line.split("pid=")[1:]:
            pid = int(part.split(",")[0])
            counts[pid] = counts.get(pid, 0) + 1
    return counts


def wait_for(check, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_two_workers_share_the_ports_and_every_room(redis) -> None:
    with Daemon("--workers", "2", "--redis", redis.url, "--max-message-rate", "0") as daemon:
        daemon.wait_healthy()
        pids = wait_for(lambda: len(w := workers_of(daemon)) == 2 and w)
        clients = [Client(daemon.ws_url) for _ in range(16)]
        try:
            for i, c in enumerate(clients):
                c.join("everyone", f"u{i}")
            spread = serving_pids(daemon.ports["ws"])
            assert set(spread) == set(pids), f"connections not spread over both workers: {spread}"
            for n in range(5):
                clients[n].send(type="message", room="everyone", message=f"m{n}", ref=n)
            for c in clients:
                got = [c.recv_type("message") for _ in range(5)]
                assert [m["seq"] for m in got] == [1, 2, 3, 4, 5]
            # a worker that dies is started again
            os.kill(pids[0], signal.SIGKILL)
            replaced = wait_for(lambda: len(w := workers_of(daemon)) == 2 and pids[0] not in w and w)
            assert pids[1] in replaced
        finally:
            for c in clients:
                try:
                    c.close()
                except Exception:
                    pass
        log = daemon.stop()
    assert daemon.proc.returncode == 0, log
    assert "2 workers started" in log
    assert "starting it again" in log


def test_sigterm_drains_every_worker(redis) -> None:
    with Daemon("--workers", "2", "--redis", redis.url) as daemon:
        daemon.wait_healthy()
        wait_for(lambda: len(workers_of(daemon)) == 2)
        clients = [Client(daemon.ws_url) for _ in range(8)]
        for i, c in enumerate(clients):
            c.join("r", f"u{i}")
        assert len(serving_pids(daemon.ports["ws"])) == 2
        daemon.proc.send_signal(signal.SIGTERM)
        codes = []
        for c in clients:
            try:
                while True:
                    c.recv(timeout=15)
            except Exception:
                codes.append(c.ws.close_code)
        daemon.proc.wait(30)
    assert codes == [1001] * len(clients)
    assert daemon.proc.returncode == 0


def test_workers_leave_when_their_supervisor_is_killed(redis) -> None:
    """A supervisor killed outright (OOM, SIGKILL, outside systemd's cgroup) must not leave workers serving.

    Orphans would keep the ports (``SO_REUSEPORT`` lets the next supervisor
    bind beside them) and go on answering a share of new connections with
    the old code and options. Each worker drains as on SIGTERM instead.
    """
    with Daemon("--workers", "2", "--redis", redis.url, "--drain-timeout", "2") as daemon:
        daemon.wait_healthy()
        pids = wait_for(lambda: len(w := workers_of(daemon)) == 2 and w)
        client = Client(daemon.ws_url)
        client.join("r", "ann")
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(10)

        def gone() -> bool:
            alive = []
            for pid in pids:
                try:
                    os.kill(pid, 0)
                    alive.append(pid)
                except ProcessLookupError:
                    pass
            return not alive

        try:
            wait_for(gone, timeout=20)
        finally:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            while True:
                client.recv(timeout=5)
        except Exception:
            pass
        assert client.ws.close_code == 1001  # drained: a going-away close, not a dropped socket
        log = daemon.read_output()
    # The workers' drain is in the log although no supervisor is left to read anything.
    assert sum("draining" in line and "[worker " in line for line in log.splitlines()) == 2, log


def test_every_worker_log_line_says_which_worker_wrote_it(redis) -> None:
    """With several workers on one journal, a line must say whose it is, in the supervisor's own format."""
    with Daemon("--workers", "2", "--redis", redis.url) as daemon:
        daemon.wait_healthy()
        pids = wait_for(lambda: len(w := workers_of(daemon)) == 2 and w)
        with Client(daemon.ws_url) as c:
            c.join("r", "ann")
        wait_for(lambda: daemon.read_output().count("caught up") >= 2)
        log = daemon.stop()
    caught_up = [line for line in log.splitlines() if "redis: caught up" in line]
    assert len(caught_up) == 2, log
    assert {line.split("[worker ", 1)[1][0] for line in caught_up if "[worker " in line} == {"0", "1"}, log
    assert all(": chatd.redis#info]" in line for line in caught_up), log
    assert "[chatd.workers#info] 2 workers started" in log  # the supervisor's own lines as before
    assert pids


def test_worker_lines_are_json_when_the_supervisor_logs_json(redis) -> None:
    ports = free_ports()
    argv = [str(TWISTD), "--nodaemon", "--pidfile=", "--logger", "chatd.logs.json_observer", "chatd",
            *listener_args(ports), "--workers", "2", "--redis", redis.url]  # fmt: skip
    with tempfile.TemporaryDirectory() as data:
        proc = subprocess.Popen([*argv, "--data-dir", data], env=source_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and len(subprocess.run(
                    ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()) < 2:
                time.sleep(0.1)  # fmt: skip
            time.sleep(3)  # the workers' start-up lines
            pids = {int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                   text=True).stdout.split()}  # fmt: skip
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=40)
        finally:
            if proc.poll() is None:
                proc.kill()
    records = [json.loads(line) for line in out.splitlines()]  # every line parses, the workers' too
    workers = [r for r in records if "worker" in r]
    assert {r["worker"] for r in workers} == {0, 1}, out
    assert {r["pid"] for r in workers} == pids, (pids, out)
    assert any(r["logger"] == "chatd.redis" and "caught up" in r["message"] for r in workers), out
    assert any(r["logger"] == "chatd.workers" and "worker" not in r for r in records), out


def test_workers_without_redis_is_a_one_line_usage_error() -> None:
    result = subprocess.run(
        [str(TWISTD), "--nodaemon", "--pidfile=", "chatd", "--workers", "2", *listener_args(free_ports())],
        env=source_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "--workers needs --redis" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_signalr_negotiated_connections_always_find_their_process(redis) -> None:
    """Negotiate and the requests after it are separate TCP connections: they must meet one process."""
    import json
    import urllib.request

    with Daemon("--workers", "2", "--redis", redis.url) as daemon:
        daemon.wait_healthy()
        wait_for(lambda: len(workers_of(daemon)) == 2)
        base = daemon.url("signalr", path="/signalr")
        for _ in range(12):
            request = urllib.request.Request(base + "/negotiate?negotiateVersion=1", data=b"", method="POST")
            with urllib.request.urlopen(request, timeout=10) as r:
                token = json.loads(r.read())["connectionToken"]
            # the first long poll activates the connection; a 404 would mean another process got it
            with urllib.request.urlopen(f"{base}?id={token}", timeout=10) as r:
                assert r.status == 200
            urllib.request.urlopen(urllib.request.Request(f"{base}?id={token}", method="DELETE"), timeout=10)
        # every worker's browser page knows where SignalR is
        for _ in range(6):
            with urllib.request.urlopen(daemon.url("web", path="/config.json"), timeout=10) as r:
                config = json.loads(r.read())
            assert config["signalr"].endswith(f":{daemon.ports['signalr']}/signalr")


def _listen_backlog(port: int) -> int:
    """A listening socket's backlog, as ``ss`` shows it (its Send-Q)."""
    out = subprocess.run(["ss", "-Hltn", f"( sport = :{port} )"], capture_output=True, text=True).stdout
    return int(out.split()[2])


def test_every_listener_asks_for_the_kernels_largest_backlog_unless_told() -> None:
    from chatd.workers import somaxconn
    from tests.daemon import free_port

    web = free_port()
    with Daemon("--web", f"tcp:{web}:interface=127.0.0.1:backlog=7") as daemon:
        daemon.wait_healthy()
        assert _listen_backlog(daemon.ports["ws"]) == somaxconn()
        assert _listen_backlog(daemon.ports["signalr"]) == somaxconn()
        assert _listen_backlog(web) == 7, "an explicit backlog= wins"
        assert _listen_backlog(daemon.ports["grpc"]) >= 1024  # grpcio asks for the maximum itself


def _held_message(daemon: Daemon, redis) -> Client:
    """A client whose message waits for Redis (stopped with SIGSTOP): its worker's drain waits for the answer."""
    a = Client(daemon.ws_url)
    a.join("r", "alice")
    redis.proc.send_signal(signal.SIGSTOP)
    a.send(type="message", room="r", message="held", ref="m1")
    time.sleep(0.5)
    return a


def _read_to_close(a: Client) -> None:
    try:
        while True:
            a.recv(timeout=15)
    except Exception:  # noqa: BLE001 - the close ends it, whatever form it takes
        pass


def test_one_systemd_stop_is_not_a_second_sigterm_to_the_workers(redis) -> None:
    """Without KillMode=mixed (or on Ctrl-C) SIGTERM reaches every process of the unit, supervisor and workers;
    the supervisor then passes its own on. One stop must drain the workers as one stop, not a hurried second."""
    with Daemon("--workers", "2", "--redis", redis.url, "--drain-timeout", "8") as daemon:
        daemon.wait_healthy()
        wait_for(lambda: len(workers_of(daemon)) == 2)
        try:
            a = _held_message(daemon, redis)
            for pid in [daemon.proc.pid, *workers_of(daemon)]:  # what systemd's control-group mode does
                os.kill(pid, signal.SIGTERM)
            time.sleep(1.5)
        finally:
            redis.proc.send_signal(signal.SIGCONT)  # Redis answers well within the drain timeout
        _read_to_close(a)
        assert daemon.proc.wait(timeout=40) == 0
    log = daemon.output
    assert "ending the drain now" not in log, log
    assert "Traceback" not in log, log


def test_a_second_sigterm_to_the_supervisor_ends_the_workers_drains_without_a_traceback(redis) -> None:
    """As without workers: a second SIGTERM while the workers drain ends their drains, no ReactorNotRunning."""
    with Daemon("--workers", "2", "--redis", redis.url, "--drain-timeout", "30") as daemon:
        daemon.wait_healthy()
        wait_for(lambda: len(workers_of(daemon)) == 2)
        try:
            a = _held_message(daemon, redis)
            daemon.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: "draining 1 sessions" in daemon.output)
            time.sleep(0.3)
            daemon.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: "drain ended by SIGUSR2 from the supervisor: dropping 1 sessions" in daemon.output)
        finally:
            redis.proc.send_signal(signal.SIGCONT)
        _read_to_close(a)
        assert daemon.proc.wait(timeout=40) == 0
    log = daemon.output
    assert "Traceback" not in log and "ReactorNotRunning" not in log, log


def test_a_second_sigterm_still_ends_a_drain_that_started_after_it(redis) -> None:
    """A worker slow to take the supervisor's SIGTERM (stopped for 1 s here, as a busy or descheduled
    process would be) gets the hurry before its drain has started: it is kept, and ends the drain once it does."""
    with Daemon("--workers", "2", "--redis", redis.url, "--drain-timeout", "25") as daemon:
        daemon.wait_healthy()
        wait_for(lambda: len(workers_of(daemon)) == 2)
        workers = workers_of(daemon)
        try:
            a = _held_message(daemon, redis)  # one worker's drain waits for Redis
            for pid in workers:
                os.kill(pid, signal.SIGSTOP)
            daemon.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            daemon.proc.send_signal(signal.SIGTERM)  # the operator: "now"
            time.sleep(0.5)
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
            wait_for(lambda: "drain ended by SIGUSR2 from the supervisor" in daemon.output, timeout=10)
        finally:
            for pid in workers:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            redis.proc.send_signal(signal.SIGCONT)
        _read_to_close(a)
        assert daemon.proc.wait(timeout=40) == 0
    assert "Traceback" not in daemon.output, daemon.output
