"""chatd started as users start it: ``twistd -n chatd``, a real process."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import require
from tests.daemon import TWISTD, Daemon, free_ports, listener_args, source_env
from tests.wsclient import Client


def test_twistd_chatd_serves_health_and_relays_chat() -> None:
    with Daemon() as daemon:
        health = daemon.wait_healthy()
        assert (health["status"], health["service"]) == ("healthy", "websocket")
        with Client(daemon.ws_url) as a, Client(daemon.ws_url) as b:
            a.join("lobby", "alice")
            b.join("lobby", "bob")
            b.send(type="message", room="lobby", message="over a real process")
            got = a.recv_type("message")
            assert (got["user"], got["message"]) == ("bob", "over a real process")
        log = daemon.stop()
    assert daemon.proc.returncode == 0, log
    # One line per WebSocket connection, when it ends: who, how long, why.
    assert "connected over websocket" not in log
    assert re.search(r"\(alice\) disconnected after \d+\.\d s: closed \(code 1000\)", log), log
    assert "over a real process" not in log  # no message bodies in the log


def test_a_bad_option_fails_with_a_one_line_usage_error() -> None:
    result = subprocess.run(
        [str(TWISTD), "--nodaemon", "--pidfile=", "chatd", "--max-connections", "lots"],
        env=source_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "--max-connections must be a whole number" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_a_port_in_use_stops_the_start() -> None:
    with Daemon() as first:
        first.wait_healthy()
        taken = first.ports["ws"]
        ports = {**free_ports(), "ws": taken}
        result = subprocess.run(
            [str(TWISTD), "--nodaemon", "--pidfile=", "chatd", *listener_args(ports)],
            env=source_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode != 0
        assert "Address already in use" in result.stdout + result.stderr


def test_the_installed_package_runs_from_any_directory(tmp_path) -> None:
    """``pip install .`` ships the package and the plugin dropin (what ``make run`` uses)."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run(
        [str(TWISTD.with_name("python")), "-c", "import chatd, twisted.plugins.chatd_plugin; print(chatd.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    require(probe.returncode == 0 and "site-packages" in probe.stdout, "chatd is not installed (run make test)")
    result = subprocess.run(
        [str(TWISTD), "chatd", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "--ws=" in result.stdout
    assert "Traceback" not in result.stderr
