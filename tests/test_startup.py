"""Start-up errors as users see them: ``twistd -n chatd`` exits non-zero with one line.

Each case starts a real ``twistd`` process that cannot start (a busy port,
an unreadable certificate, a data directory that cannot be written...) and
checks the exit status, that the output holds the one line naming the
option and the cause exactly once, and that there is no traceback.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatd import tap
from tests import grpcservers
from tests.daemon import TWISTD, free_ports, listener_args, source_env
from tests.tlscert import make_certificate

grpc_server = grpcservers.grpc_server  # a test that asks for it runs on both gRPC servers


def any_ports(**fixed: int) -> list[str]:
    """Every listener on a port the kernel picks (tcp:0), except those given."""
    args: list[str] = []
    for name in (*tap.LISTENERS, "grpc"):
        if name == "grpc":
            args += ["--grpc", f"127.0.0.1:{fixed.get(name, 0)}"]
        else:
            args += [f"--{name}", f"tcp:{fixed.get(name, 0)}:interface=127.0.0.1"]
    return args


def run_chatd(*extra: str, ports: dict[str, int] | None = None) -> str:
    """Run ``twistd -n chatd`` until it exits; its whole output (asserting a non-zero exit).

    ``ports`` fixes every listener's port (``--workers`` needs that); by
    default each listens on a port the kernel picks.
    """
    listeners = listener_args(ports) if ports is not None else any_ports()
    argv = [str(TWISTD), "--nodaemon", "--pidfile=", "chatd", *listeners, *extra]
    if "--data-dir" not in extra:
        argv += ["--data-dir", ""]
    result = subprocess.run(argv, env=source_env(), capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    return output


def one_line(output: str, text: str) -> str:
    lines = [line for line in output.splitlines() if text in line]
    assert len(lines) == 1, output
    return lines[0]


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port some other program is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("listener", ["ws", "signalr", "web"])
def test_a_busy_listener_port_is_one_line(busy_port, listener) -> None:
    output = run_chatd(*any_ports(**{listener: busy_port}))
    one_line(output, f"chatd: --{listener}: cannot listen on 127.0.0.1:{busy_port}: Address already in use")


def test_a_busy_grpc_port_is_one_line(busy_port, grpc_server) -> None:
    output = run_chatd(*any_ports(grpc=busy_port), "--grpc-server", grpc_server)
    one_line(output, f"chatd: --grpc: cannot listen on 127.0.0.1:{busy_port}: Address already in use")
    assert "Failed to add port" not in output  # grpcio's own complaint is not printed


def test_a_busy_manhole_port_is_one_line(busy_port, tmp_path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    public = ed25519.Ed25519PrivateKey.generate().public_key()
    keys = tmp_path / "keys"
    keys.write_bytes(public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    output = run_chatd(
        "--manhole", f"tcp:{busy_port}:interface=127.0.0.1", "--manhole-keys", str(keys),
        "--manhole-host-key", str(tmp_path / "host_key"),
    )
    one_line(output, f"chatd: --manhole: cannot listen on 127.0.0.1:{busy_port}: Address already in use")


@pytest.mark.parametrize("listener", ["ws", "grpc"])
def test_a_busy_port_under_workers_is_one_line(busy_port, listener) -> None:
    ports = {**free_ports(), listener: busy_port}
    output = run_chatd("--workers", "2", "--redis", "redis://127.0.0.1:1/0", ports=ports)
    one_line(output, f"chatd: --{listener}: cannot listen on 127.0.0.1:{busy_port}: Address already in use")


def _ssl(key: Path, cert: Path) -> str:
    return f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"


def test_an_unreadable_tls_key_of_an_ssl_listener_is_one_line(tmp_path) -> None:
    key, cert = make_certificate(tmp_path)
    output = run_chatd("--ws", _ssl(tmp_path / "missing.pem", cert))
    one_line(output, f"chatd: --ws: cannot read the TLS private key '{tmp_path / 'missing.pem'}': No such file")


def test_a_garbage_certificate_of_an_ssl_listener_is_one_line(tmp_path) -> None:
    key, _ = make_certificate(tmp_path)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    output = run_chatd("--signalr", _ssl(key, garbage))
    one_line(output, f"chatd: --signalr: '{garbage}' holds no PEM certificate")


def test_a_key_that_is_not_the_certificates_is_one_line(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    key, _ = make_certificate(tmp_path / "a")
    _, cert = make_certificate(tmp_path / "b")
    output = run_chatd("--grpc-tls-cert", str(cert), "--grpc-tls-key", str(key))
    one_line(output, f"chatd: --grpc-tls-key: the private key '{key}' does not belong to the certificate '{cert}'")


def test_an_unreadable_grpc_certificate_is_one_line(tmp_path) -> None:
    key, _ = make_certificate(tmp_path)
    output = run_chatd("--grpc-tls-cert", str(tmp_path), "--grpc-tls-key", str(key))  # a directory
    one_line(output, "chatd: --grpc-tls-cert: no such file")


def test_a_garbage_grpc_key_is_one_line(tmp_path) -> None:
    _, cert = make_certificate(tmp_path)
    garbage = tmp_path / "garbage.key"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    output = run_chatd("--grpc-tls-cert", str(cert), "--grpc-tls-key", str(garbage))
    one_line(output, f"chatd: --grpc-tls-key: '{garbage}' holds no PEM private key")


def test_an_unreadable_redis_ca_is_one_line(tmp_path) -> None:
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a CA\n")
    output = run_chatd("--redis", "rediss://127.0.0.1:1/0", "--redis-ca", str(garbage))
    one_line(output, f"chatd: --redis-ca: '{garbage}' holds no PEM certificate")


def test_a_data_dir_that_is_a_file_is_one_line(tmp_path) -> None:
    taken = tmp_path / "file"
    taken.write_text("")
    output = run_chatd("--data-dir", str(taken))
    one_line(output, f"chatd: --data-dir: '{taken}' is not a directory")


def test_a_data_dir_that_cannot_be_created_is_one_line(tmp_path) -> None:
    (tmp_path / "file").write_text("")
    below_a_file = tmp_path / "file" / "data"
    output = run_chatd("--data-dir", str(below_a_file))
    one_line(output, f"chatd: --data-dir: cannot write the history file '{below_a_file / 'chatd.sqlite3'}': ")


def test_a_history_file_sqlite_cannot_open_is_one_line(tmp_path) -> None:
    (tmp_path / "chatd.sqlite3").mkdir()  # in the way of the file
    output = run_chatd("--data-dir", str(tmp_path))
    one_line(output, f"chatd: --data-dir: cannot write the history file '{tmp_path / 'chatd.sqlite3'}': ")


def test_a_bad_value_under_twistd_is_one_line_without_the_whole_help() -> None:
    output = run_chatd("--max-connections-per-ip", "-1")
    assert output.strip() == "chatd: --max-connections-per-ip must be at least 0, not -1"
