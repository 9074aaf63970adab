"""The manhole with a real OpenSSH client in a pseudo-terminal, against a live chatd."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import time
from pathlib import Path

import pytest_twisted
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from websockets.exceptions import ConnectionClosed

from chatd import manhole
from chatd.manhole import host_key
from tests.conftest import require_tool
from tests.wsclient import Client

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]|\r")


class Terminal:
    """``ssh`` attached to a pty, as an operator's terminal would be."""

    def __init__(self, argv: list[str]) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        self.seen = ""

    def expect(self, pattern: str, timeout: float = 20) -> str:
        """Read until ``pattern`` (a regex) appears in the escape-free output."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, _ANSI.sub("", self.seen))
            if match:
                return match.group(0)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"never saw {pattern!r} in:\n{_ANSI.sub('', self.seen)}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # the other end closed
                    data = b""
                if not data:
                    raise AssertionError(f"session ended before {pattern!r}:\n{_ANSI.sub('', self.seen)}")
                self.seen += data.decode("utf-8", "replace")

    def type(self, line: str) -> None:
        self.seen = ""
        os.write(self.master, line.encode() + b"\r")

    def close(self) -> int:
        try:
            os.write(self.master, b"\x04")  # Ctrl-D ends the console
            return self.proc.wait(timeout=20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            os.close(self.master)


def _keygen(path: Path) -> Path:
    subprocess.run(
        [require_tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", "ops@test", "-f", str(path)],
        check=True,
    )
    return path


def _ssh(port: int, key: Path, known_hosts: Path) -> list[str]:
    config = known_hosts.with_name("ssh_config")  # no user or system ssh_config applies
    config.touch()
    return [
        require_tool("ssh"),
        "-tt",
        "-p",
        str(port),
        "-i",
        str(key),
        "-F",
        str(config),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "PasswordAuthentication=no",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"UserKnownHostsFile={known_hosts}",
        "ops@127.0.0.1",
    ]


@pytest_twisted.ensureDeferred
async def test_operator_logs_in_inspects_rooms_awaits_and_kicks_a_live_client(start, tmp_path) -> None:
    require_tool("ssh")
    key = _keygen(tmp_path / "id_ops")
    stranger = _keygen(tmp_path / "id_stranger")
    authorized = tmp_path / "authorized_keys"
    authorized.write_text(Path(f"{key}.pub").read_text())
    host_key = tmp_path / "state" / "manhole_host_key"
    host_key.parent.mkdir()
    running = await start(
        "--manhole", "tcp:0", "--manhole-keys", str(authorized), "--manhole-host-key", str(host_key)
    )
    port = running.ports["manhole"]
    # The operator trusts exactly the host key the daemon generated.
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {Path(f'{host_key}.pub').read_text()}")
    assert oct(host_key.stat().st_mode & 0o777) == "0o600"

    def scenario():
        with Client(running.ws_url) as alice, Client(running.ws_url) as bob:
            alice.join("lobby", "alice")
            bob.join("lobby", "bob")
            term = Terminal(_ssh(port, key, known))
            try:
                term.expect(r">>> ")
                term.type("rooms()")
                term.expect(r"\{'lobby': 2\}")
                term.type("users('lobby')")
                term.expect(r"\['alice', 'bob'\]")
                term.type("stats()['connections']['websocket']")
                term.expect(r"\n2\n")
                # A coroutine typed at the prompt is awaited and its result shown.
                term.type(
                    'exec("async def later():\\n from twisted.internet import task\\n'
                    ' return await task.deferLater(reactor, 0.05, lambda: 6 * 7)")'
                )
                term.expect(r">>> ")
                term.type("later()")
                term.expect(r"Deferred #\d+ called back: 42")
                term.type("broadcast('lobby', 'maintenance in 5 minutes')")
                term.expect(r">>> ")
                notice = bob.recv_until(lambda f: f.get("type") == "message")
                assert notice["user"] == "server" and notice["message"] == "maintenance in 5 minutes"
                term.type("kick('alice', 'bye now')")
                term.expect(r"\n1\n")
                try:
                    while True:
                        alice.recv()
                except ConnectionClosed as closed:
                    assert closed.rcvd.code == 4000 and closed.rcvd.reason == "bye now"
                left = bob.recv_until(lambda f: f.get("type") == "presence" and f["action"] == "leave")
                assert left["user"] == "alice"
                term.type("rooms()")
                term.expect(r"\{'lobby': 1\}")
            finally:
                term.close()

        # A key that is not in authorized_keys is refused.
        refused = subprocess.run(
            [*_ssh(port, stranger, known), "true"],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        assert refused.returncode == 255
        assert "Permission denied (publickey)" in refused.stderr

    await deferToThread(scenario)


def test_authorized_keys_are_read_once_until_the_file_changes(tmp_path, monkeypatch) -> None:
    # Every signed SSH login attempt asks for the keys, on the reactor thread:
    # an unauthenticated peer must not be able to make it re-read the file each time.
    ops, other = host_key(str(tmp_path / "ops")), host_key(str(tmp_path / "other"))
    path = tmp_path / "authorized_keys"
    path.write_bytes(ops.public().toString("openssh") + b" ops@example\n")
    reads: list[str] = []
    real = manhole._read_keys
    monkeypatch.setattr(manhole, "_read_keys", lambda p: reads.append(p) or real(p))
    db = manhole.AuthorizedKeysFile(str(path))
    for _ in range(50):
        assert db.getAuthorizedKeys(b"anyone") == [ops.public()]
    assert len(reads) == 1
    # An edit takes effect at the next attempt: the old key is refused from then on.
    path.write_bytes(other.public().toString("openssh") + b" someone-else@example\n")
    assert db.getAuthorizedKeys(b"anyone") == [other.public()]
    assert db.getAuthorizedKeys(b"anyone") == [other.public()]
    assert len(reads) == 2
    # So does a replacement by rename (as editors and config tools do), even at the same size.
    new = tmp_path / "authorized_keys.new"
    new.write_bytes(ops.public().toString("openssh") + b" someone-else@example\n")
    os.replace(new, path)
    assert db.getAuthorizedKeys(b"anyone") == [ops.public()]
    assert len(reads) == 3
    # A file that goes away lets nobody in, and is logged once, not at every attempt.
    path.unlink()
    errors: list[dict] = []
    globalLogPublisher.addObserver(errors.append)
    try:
        assert db.getAuthorizedKeys(b"anyone") == []
        assert db.getAuthorizedKeys(b"anyone") == []
    finally:
        globalLogPublisher.removeObserver(errors.append)
    assert len([e for e in errors if e.get("log_namespace") == "chatd.manhole"]) == 1
