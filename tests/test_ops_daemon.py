"""chatd as systemd runs it: a real ``twistd -n chatd`` process, a notification
socket the test binds, socket activation, SIGTERM, JSON logs, unit files."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

from chatd import tap
from tests.conftest import require_tool
from tests.daemon import ROOT, TWISTD, Daemon, free_port
from tests.wsclient import Client

UNITS = ROOT / "systemd"


class NotifySocket:
    """What systemd would hear: a datagram socket in the abstract namespace."""

    def __init__(self) -> None:
        self.name = f"@chatd-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.sock.settimeout(30)
        self.heard: list[str] = []

    def wait_for(self, prefix: str) -> str:
        """The next datagram whose first line starts with ``prefix`` (bounded by the timeout)."""
        while True:
            state = self.sock.recv(4096).decode()
            self.heard.append(state)
            if state.startswith(prefix):
                return state

    def close(self) -> None:
        self.sock.close()


def test_ready_watchdog_and_stopping_reach_systemd_and_sigterm_drains_to_exit_0() -> None:
    notify = NotifySocket()
    env = {"NOTIFY_SOCKET": notify.name, "WATCHDOG_USEC": "2000000", "DRAIN_TIMEOUT": "20"}
    try:
        with Daemon(env=env) as daemon:
            ready = notify.wait_for("READY=1")
            assert f"MAINPID={daemon.proc.pid}" in ready
            # Ready means every listener accepts, without polling.
            with Client(daemon.ws_url) as a, Client(daemon.ws_url) as b:
                a.join("bye", "alice")
                b.join("bye", "bob")
                notify.wait_for("WATCHDOG=1")
                daemon.proc.send_signal(signal.SIGTERM)
                assert "STATUS=draining" in notify.wait_for("STOPPING=1")
                for client in (a, b):
                    with pytest.raises(ConnectionClosed) as closed:
                        client.recv_type("never")
                    assert closed.value.rcvd.code == 1001
                    assert "shutting down" in closed.value.rcvd.reason
            assert daemon.proc.wait(timeout=30) == 0, daemon.stop()
            log = daemon.stop()
            assert "draining 2 sessions" in log and "drained" in log
    finally:
        notify.close()


def test_a_second_sigterm_ends_the_drain_at_once_without_a_traceback(tmp_path) -> None:
    """Twisted's handler would call reactor.stop() again: ReactorNotRunning, logged at critical."""
    import sqlite3
    import time

    def stats(daemon: Daemon) -> dict:
        with urllib.request.urlopen(daemon.url(path="/stats"), timeout=10) as r:
            return json.loads(r.read())

    def wait_for(condition, what: str) -> None:
        for _ in range(300):
            if condition():
                return
            time.sleep(0.05)
        raise AssertionError(f"never: {what}")

    with Daemon("--data-dir", str(tmp_path), env={"DRAIN_TIMEOUT": "60"}) as daemon:
        daemon.wait_healthy()
        with Client(daemon.ws_url) as a:
            a.join("r", "alice")
            other = sqlite3.connect(str(tmp_path / "chatd.sqlite3"), isolation_level=None)
            other.execute("BEGIN IMMEDIATE")  # the drain then waits for alice's message to be answered
            try:
                a.send(type="message", room="r", message="waits for the file", ref="m1")
                wait_for(lambda: stats(daemon)["history"]["queued"] >= 1, "the message waits for the file")
                daemon.proc.send_signal(signal.SIGTERM)
                wait_for(lambda: "draining 1 sessions" in daemon.output, "the drain started")
                daemon.proc.send_signal(signal.SIGTERM)
                wait_for(lambda: "SIGTERM again: ending the drain now" in daemon.output, "the drain ended")
            finally:
                other.execute("ROLLBACK")
                other.close()
            assert daemon.proc.wait(timeout=30) == 0
        log = daemon.output
        assert "drain ended by SIGTERM again: dropping 1 sessions" in log
        assert "Traceback" not in log and "ReactorNotRunning" not in log, log


def _spawn(
    twistd_args: list[str],
    chatd_args: list[str],
    env: dict[str, str] | None = None,
    prefix=(),
    pass_fds: tuple[int, ...] = (),
):
    environ = {k: v for k, v in os.environ.items() if not k.endswith("_PORT") and k != "MANHOLE"}
    environ["PYTHONPATH"] = str(ROOT)
    environ.update(env or {})
    argv = [*prefix, str(TWISTD), *twistd_args, "--nodaemon", "--pidfile=", "chatd", *chatd_args]
    return subprocess.Popen(
        argv,
        cwd=str(ROOT),
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        pass_fds=pass_fds,
    )


def _other_listeners(skip: str) -> list[str]:
    args: list[str] = []
    for name in tap.LISTENERS:
        if name != skip:
            args += [f"--{name}", "tcp:0:interface=127.0.0.1"]
    if any(o[0] == "grpc" for o in tap.Options.optParameters):
        args += ["--grpc", "127.0.0.1:0"]
    return args


def test_json_log_mode_prints_one_json_object_per_line_and_no_message_bodies() -> None:
    notify = NotifySocket()
    port = free_port()
    proc = _spawn(
        ["--logger", "chatd.logs.json_observer"],
        ["--ws", f"tcp:{port}:interface=127.0.0.1", *_other_listeners("ws")],
        {"NOTIFY_SOCKET": notify.name},
    )
    try:
        notify.wait_for("READY=1")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health?access_token=hunter2", timeout=10) as r:
            assert r.status == 200
        with Client(f"ws://127.0.0.1:{port}/ws") as a:
            a.join("logs", "alice")
            a.send(type="message", room="logs", message="a very private sentence")
            a.recv_type("message")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) > 5
    records = [json.loads(line) for line in lines]  # every line parses
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    assert any(r["logger"] == "chatd.websocket" and "connected" in r["message"] for r in records)
    assert "a very private sentence" not in out + err
    # Access lines keep the path and drop the query string, where tokens travel.
    assert any('"GET /health HTTP/1.1" 200' in r["message"] for r in records)
    assert "hunter2" not in out + err


def test_socket_activation_serves_websocket_chat_on_the_inherited_socket() -> None:
    tool = require_tool("systemd-socket-activate")
    ports = {name: free_port() for name in tap.LISTENERS}
    listen: list[str] = []
    chatd_args: list[str] = []
    for index, (name, port) in enumerate(ports.items()):
        listen += ["-l", f"127.0.0.1:{port}"]
        chatd_args += [f"--{name}", f"systemd:domain=INET:index={index}"]
    if any(o[0] == "grpc" for o in tap.Options.optParameters):
        chatd_args += ["--grpc", "127.0.0.1:0"]
    names = ":".join(["chatd"] * len(ports))
    notify = NotifySocket()
    proc = _spawn(
        [],
        chatd_args,
        {"NOTIFY_SOCKET": notify.name},
        prefix=[tool, *listen, f"--fdname={names}", "-E", "PYTHONPATH", "-E", "NOTIFY_SOCKET"],
    )
    try:
        assert proc.stderr is not None
        for _ in ports:  # wait until the tool has bound every socket
            assert "Listening on" in proc.stderr.readline()
        # The sockets exist before chatd does: this first connection is what
        # starts it, and waits in the backlog (start-up may be slow here).
        with socket.create_connection(("127.0.0.1", ports["ws"]), timeout=60) as s:
            s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
            assert s.recv(12).startswith(b"HTTP/1.")
        with Client(f"ws://127.0.0.1:{ports['ws']}/ws") as a:
            a.join("activated", "alice")
            a.send(type="message", room="activated", message="hello")
            assert a.recv_type("message")["message"] == "hello"
        notify.wait_for("READY=1")
        # The other inherited sockets are served too.
        for name, port in ports.items():
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                assert s.recv(12).startswith(b"HTTP/1."), name
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Execing" in err


def test_unit_files_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = require_tool("systemd-analyze")
    service = (UNITS / "chatd.service").read_text()
    assert re.search(r"^ExecStart=/opt/chatd/bin/twistd --nodaemon --pidfile= chatd$", service, re.M)
    assert re.search(r"^Type=notify$", service, re.M) and re.search(r"^WatchdogSec=", service, re.M)
    # verify checks that the command exists: point it at this environment's twistd.
    (tmp_path / "chatd.service").write_text(service.replace("/opt/chatd/bin/twistd", str(TWISTD)))
    (tmp_path / "chatd.socket").write_text((UNITS / "chatd.socket").read_text())
    result = subprocess.run(
        [tool, "verify", str(tmp_path / "chatd.service"), str(tmp_path / "chatd.socket")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Unknown" not in result.stderr and "Invalid" not in result.stderr, result.stderr
    # The hardening adds up: systemd's own exposure score stays "OK" (lower is safer; 10 is unconfined).
    security = subprocess.run(
        [tool, "security", "--offline=yes", str(tmp_path / "chatd.service")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    score = re.search(r"Overall exposure level for chatd.service: ([0-9.]+)", security.stdout)
    assert score is not None, security.stdout + security.stderr
    assert float(score.group(1)) <= 2.0, security.stdout


def test_env_file_names_only_options_that_exist_and_socket_order_matches() -> None:
    env_vars = {spec[0] for table in (tap.LISTENERS, tap.INTEGERS, tap.STRINGS) for spec in table.values()}
    env_vars |= {"GRPC_PORT"}
    text = (UNITS / "chatd.env").read_text()
    named = set(re.findall(r"^#?([A-Z_]+)=", text, re.M))
    assert named <= env_vars, named - env_vars
    # chatd.socket's ListenStream= order is the index order the env file uses.
    streams = re.findall(r"^ListenStream=(\d+)$", (UNITS / "chatd.socket").read_text(), re.M)
    indexed = dict(re.findall(r"^([A-Z_]+)=systemd:domain=INET6:index=(\d+)$", text, re.M))
    assert streams == ["8080", "8081", "3000"]
    assert indexed == {"WS_PORT": "0", "SIGNALR_PORT": "1", "WEB_PORT": "2"}


#: exec argv[2:] with fd argv[1] as systemd passes a socket: fd 3, LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID
SD_EXEC = """
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.environ.update(LISTEN_FDS="1", LISTEN_FDNAMES="chatd", LISTEN_PID=str(os.getpid()))
os.execv(sys.argv[2], sys.argv[2:])
"""


def test_a_restart_on_an_inherited_socket_keeps_new_connections_for_the_next_process(tmp_path: Path) -> None:
    """What ``systemctl restart chatd`` does with chatd.socket: systemd keeps the
    listening socket across the restart. A client that connects while the old
    process drains must wait in that socket's queue for the new process, not
    be refused (a refusal grows every client's backoff in a reconnect storm)."""
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(64)
    port = listening.getsockname()[1]
    fd = listening.fileno()
    # systemd's part: the socket as fd 3, LISTEN_PID the process's own (exec keeps the PID).
    prefix = [sys.executable, "-c", SD_EXEC, str(fd)]
    args = ["--ws", "systemd:domain=INET:index=0", *_other_listeners("ws"), "--data-dir", str(tmp_path)]
    args += ["--drain-timeout", "3"]

    def start(notify: NotifySocket) -> subprocess.Popen:
        return _spawn([], args, {"NOTIFY_SOCKET": notify.name}, prefix=prefix, pass_fds=(fd,))

    def upgrade(s: socket.socket) -> None:
        key = "dGhlIHNhbXBsZSBub25jZQ=="
        s.sendall(
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )

    first_notify, second_notify = NotifySocket(), NotifySocket()
    first = second = None
    waiting = socket.socket()
    try:
        first = start(first_notify)
        first_notify.wait_for("READY=1")
        with Client(f"ws://127.0.0.1:{port}/ws") as a:
            a.join("restart", "alice")
            a.send(type="message", room="restart", message="before the restart")
            assert a.recv_type("message")["seq"] == 1
            first.send_signal(signal.SIGTERM)
            first_notify.wait_for("STOPPING=1")
            # The old process is draining: it takes nothing new.
            waiting.settimeout(1.0)
            waiting.connect(("127.0.0.1", port))  # the kernel completes it: the socket still listens
            upgrade(waiting)
            with pytest.raises(TimeoutError):
                waiting.recv(1)  # today's answer would be a 101 and then close 1013 "try again later"
            with pytest.raises(ConnectionClosed) as closed:
                a.recv_type("never")
            assert closed.value.rcvd.code == 1001
        out, err = first.communicate(timeout=30)
        assert first.returncode == 0, out + err
        assert "not accepting on ws" in out + err
        # The next process inherits the same socket and answers the waiting client.
        second = start(second_notify)
        waiting.settimeout(60)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = waiting.recv(4096)
            assert chunk, head
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head
        assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head  # RFC 6455's sample key and its accept
        second_notify.wait_for("READY=1")
        with Client(f"ws://127.0.0.1:{port}/ws") as b:
            b.join("restart", "bob")
            b.send(type="history", room="restart", limit=10)
            kept = b.recv_type("history")["messages"]
            assert [(m["seq"], m["message"]) for m in kept] == [(1, "before the restart")]
        second.send_signal(signal.SIGTERM)
        out, err = second.communicate(timeout=30)
        assert second.returncode == 0, out + err
    finally:
        waiting.close()
        listening.close()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate()
        first_notify.close()
        second_notify.close()
