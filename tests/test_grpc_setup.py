"""gRPC set-up: generated code in step with the .proto, options, TLS, binding."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.python import usage

from chatd import tap
from chatd.grpc.generated import chat_pb2 as pb
from chatd.grpc.generated.chat_pb2_grpc import ChatServiceStub
from chatd.grpc.service import grpc_address
from chatd.startup import StartupError
from tests import grpcservers
from tests.conftest import listener_args, start_chatd
from tests.tlscert import make_certificate

grpc_server = grpcservers.grpc_server  # a test that asks for it runs on both gRPC servers

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "chatd" / "grpc" / "generated"


def test_committed_generated_modules_match_the_proto(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run([str(ROOT / "scripts" / "gen-proto"), str(tmp_path)], check=True, env=env, timeout=120)
    fresh = tmp_path / "chatd" / "grpc" / "generated"
    names = sorted(p.name for p in fresh.iterdir())
    assert names == ["chat_pb2.py", "chat_pb2.pyi", "chat_pb2_grpc.py"]
    stale = [n for n in names if (fresh / n).read_bytes() != (GENERATED / n).read_bytes()]
    assert stale == [], f"run scripts/gen-proto: {stale} differ from proto/chat.proto"


def test_generated_stub_imports_its_messages_from_the_package() -> None:
    text = (GENERATED / "chat_pb2_grpc.py").read_text()
    assert "from chatd.grpc.generated import chat_pb2" in text
    assert pb.DESCRIPTOR.package == "chat"
    assert list(pb.DESCRIPTOR.services_by_name) == ["ChatService"]


@pytest.mark.parametrize(
    "value, expected",
    [
        ("50051", "[::]:50051"),
        (" 127.0.0.1:0 ", "127.0.0.1:0"),
        ("[::1]:9000", "[::1]:9000"),
        ("localhost:50051", "localhost:50051"),
    ],
)
def test_grpc_address_accepts_host_port_and_bare_numbers(value: str, expected: str) -> None:
    assert grpc_address(value) == expected


def parse(*argv: str, **environ: str) -> tap.Options:
    options = tap.Options(environ=environ)
    options.parseOptions(list(argv))
    return options


def test_grpc_options_default_and_fall_back_to_the_environment() -> None:
    options = parse()
    assert options["grpc"] == "[::]:50051"
    assert (options["grpc-workers"], options["grpc-max-streams"]) == (1100, 1000)
    assert parse(GRPC_PORT="6000")["grpc"] == "[::]:6000"
    assert parse("--grpc", "127.0.0.1:7000", GRPC_PORT="6000")["grpc"] == "127.0.0.1:7000"
    assert parse()["grpc-server"] == "aio"
    assert parse(GRPC_SERVER="threaded")["grpc-server"] == "threaded"


def test_the_aio_server_holds_no_worker_per_stream_so_streams_may_pass_grpc_workers() -> None:
    options = parse("--grpc-server", "aio", "--grpc-workers", "10", "--grpc-max-streams", "10000")
    assert options["grpc-max-streams"] == 10000


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--grpc", "tcp:50051"], "--grpc: expected host:port"),
        (["--grpc", "host:99999"], "--grpc: expected host:port"),
        (["--grpc", "no-port"], "--grpc: expected host:port"),
        (["--grpc-tls-cert", "/etc/hostname"], "go together"),
        (["--grpc-tls-cert", "/nonexistent.pem", "--grpc-tls-key", "/nonexistent.key"], "no such file"),
        (["--grpc-server", "threaded", "--grpc-workers", "10", "--grpc-max-streams", "10"], "less than --grpc-workers"),
        (["--grpc-server", "uvloop"], "--grpc-server: expected one of aio, threaded"),
    ],
)
def test_bad_grpc_options_fail_at_start_with_one_line(argv: list[str], message: str) -> None:
    with pytest.raises(usage.UsageError) as info:
        parse(*argv)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_the_service_tree_has_a_grpc_service() -> None:
    from twisted.internet.testing import MemoryReactorClock

    service = tap.makeService(parse("--grpc", "127.0.0.1:0"), reactor=MemoryReactorClock())
    grpc_service = service.getServiceNamed("grpc")
    assert grpc_service.address == "127.0.0.1:0"
    assert not grpc_service.running


@pytest_twisted.ensureDeferred
async def test_tls_serves_clients_that_trust_the_certificate_and_only_them(tmp_path: Path, grpc_server: str) -> None:
    key_path, cert_path = make_certificate(tmp_path)
    cert_pem = cert_path.read_bytes()
    running = await start_chatd(
        "--grpc-tls-cert", str(cert_path), "--grpc-tls-key", str(key_path), "--grpc-server", grpc_server
    )
    try:

        def scenario() -> tuple[pb.MessageResponse, grpc.RpcError]:
            request = pb.MessageRequest(user="alice", message="over TLS", room="lobby")
            credentials = grpc.ssl_channel_credentials(root_certificates=cert_pem)
            with grpc.secure_channel(running.grpc_target, credentials) as channel:
                reply = ChatServiceStub(channel).SendMessage(request, timeout=15)
            with grpc.insecure_channel(running.grpc_target) as channel:
                with pytest.raises(grpc.RpcError) as info:
                    ChatServiceStub(channel).SendMessage(request, timeout=15)
            return reply, info.value

        reply, plaintext = await deferToThread(scenario)
        assert (reply.seq, reply.message) == (1, "over TLS")
        assert plaintext.code() is grpc.StatusCode.UNAVAILABLE
        assert running.hub.messages_total == 1
    finally:
        await defer.maybeDeferred(running.service.stopService)


@pytest_twisted.ensureDeferred
async def test_a_busy_grpc_port_fails_the_start_loudly(grpc_server: str) -> None:
    first = await start_chatd()
    try:
        options = tap.Options(environ={})
        options.parseOptions([*listener_args(), "--grpc", first.grpc_target, "--grpc-server", grpc_server])
        from twisted.internet import reactor

        service = tap.makeService(options, reactor=reactor)
        grpc_service = service.getServiceNamed("grpc")
        with pytest.raises(StartupError, match=r"--grpc: cannot listen on 127\.0\.0\.1:\d+: Address already in use"):
            grpc_service.startService()
    finally:
        await defer.maybeDeferred(first.service.stopService)
