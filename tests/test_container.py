"""The container image and the compose file, built and run with podman.

The image is built from ``docker/Dockerfile`` on a local Debian base
(``docker/make-base-image``: debootstrap, then ``podman import``; kept
between runs), started with its ports published on loopback, and used as an
operator would: its own health check, a WebSocket and a gRPC client through
the published ports, ``podman stop`` (SIGTERM). The compose file runs two
replicas on one Redis, and a message sent to one reaches a client of the
other.

Marked ``container``: ``pytest -m "not container"`` leaves it out on a
laptop. Without podman (or as non-root, where ``scripts/install-test-deps``
cannot install it) it skips, unless ``CHATD_REQUIRE_ALL=1``.

Facts of the CI machine this relies on: ``crun`` refuses its cgroup layout,
so every podman command runs with ``--runtime runc``; podman's default
rlimits exceed its hard limits, so builds and runs get ``--ulimit`` values
under this process's own hard limits; pip inside the build checks TLS
against the system CA bundle, handed to the build as a secret.
"""

from __future__ import annotations

import os
import queue
import resource
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from websockets.exceptions import ConnectionClosed

from chatd.grpc.generated import chat_pb2 as pb
from chatd.grpc.generated.chat_pb2_grpc import ChatServiceStub
from tests.conftest import require
from tests.daemon import free_port
from tests.wsclient import Client

# A first run makes the base image and builds every layer: more than the suite's 300 s per test may be needed.
pytestmark = [pytest.mark.container, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
BASE = "localhost/debian:bookworm"
IMAGE = "localhost/chatd:test"
REDIS_IMAGE = "localhost/chatd-test-redis:bookworm"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
WAIT = 30.0  # the bound on each wait for a container, seconds
BUILD_TIMEOUT = 900

# Redis for the compose test, from the same local base (no registry to pull redis:7 from).
REDIS_CONTAINERFILE = f"""\
FROM {BASE}
RUN apt-get update && apt-get install -y --no-install-recommends redis-server \\
 && rm -rf /var/lib/apt/lists/*
WORKDIR /data
CMD ["redis-server"]
"""


def ulimits() -> list[str]:
    """``--ulimit`` flags at or under this process's hard limits (podman's defaults are above them)."""
    flags = []
    for name, limit, wanted in (("nofile", resource.RLIMIT_NOFILE, 65536), ("nproc", resource.RLIMIT_NPROC, 4096)):
        hard = resource.getrlimit(limit)[1]
        value = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        flags += ["--ulimit", f"{name}={value}:{value}"]
    return flags


def podman(*args: str, timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["podman", "--runtime", "runc", *args], capture_output=True, text=True, timeout=timeout, **kwargs
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def build(tag: str, *args: str) -> None:
    secret = ["--secret", f"id=ca,src={CA_BUNDLE}"] if CA_BUNDLE.exists() else []
    podman("build", "--format", "docker", *ulimits(), *secret, "-t", tag, *args, timeout=BUILD_TIMEOUT)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    """The chatd image, built on the local Debian base (made first if missing)."""
    require(shutil.which("podman") is not None, "podman is not installed (scripts/install-test-deps, as root)")
    require(shutil.which("runc") is not None, "runc is not installed (scripts/install-test-deps, as root)")
    require(os.geteuid() == 0, "the container tests run podman as root")
    if podman("image", "exists", BASE, check=False).returncode != 0:
        require(shutil.which("debootstrap") is not None, "debootstrap is not installed (scripts/install-test-deps)")
        subprocess.run([str(ROOT / "docker/make-base-image"), BASE], check=True, timeout=600)
    build(IMAGE, "--build-arg", f"BASE_IMAGE={BASE}", "-f", str(ROOT / "docker/Dockerfile"), str(ROOT))
    return IMAGE


class Container:
    """One ``podman run -d`` of the image (removed by the test), or a running one by name."""

    def __init__(self, image: str, *run_args: str, args: tuple[str, ...] = ()) -> None:
        self.name = f"chatd-test-{os.getpid()}-{time.monotonic_ns()}"
        podman("run", "-d", "--name", self.name, *ulimits(), *run_args, image, *args)

    @classmethod
    def named(cls, name: str) -> Container:
        """A container someone else started (compose)."""
        container = cls.__new__(cls)
        container.name = name
        return container

    def state(self, field: str) -> str:
        return podman("inspect", "--format", "{{" + field + "}}", self.name).stdout.strip()

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def wait_healthy(self) -> float:
        """Run the image's own HEALTHCHECK until it passes (bounded); seconds it took.

        podman schedules health checks with systemd timers, and CI runs no
        systemd, so the test runs the check itself as the timer would.
        """
        start = time.monotonic()
        while time.monotonic() - start < WAIT:
            if podman("healthcheck", "run", self.name, check=False).returncode == 0:
                assert self.state(".State.Health.Status") == "healthy"
                return time.monotonic() - start
            if self.state(".State.Status") != "running":
                raise AssertionError(f"the container stopped:\n{self.logs()}")
            time.sleep(0.2)
        raise AssertionError(f"never healthy:\n{self.logs()}")

    def remove(self) -> None:
        podman("rm", "--force", "--volumes", self.name, check=False)


def stream_room(target: str, room: str, user: str) -> tuple[queue.Queue, grpc.Channel]:
    """A gRPC ``StreamMessages`` of ``room`` read into a queue by a thread."""
    channel = grpc.insecure_channel(target)
    call = ChatServiceStub(channel).StreamMessages(pb.StreamRequest(room=room, user=user), timeout=WAIT * 2)
    received: queue.Queue = queue.Queue()

    def read() -> None:
        try:
            for message in call:
                received.put(message)
        except grpc.RpcError as e:
            received.put(e)

    threading.Thread(target=read, daemon=True).start()
    return received, channel


def next_message(received: queue.Queue, text: str) -> pb.MessageResponse:
    while True:
        item = received.get(timeout=WAIT)
        assert not isinstance(item, grpc.RpcError), item
        if item.message == text:
            return item


def test_image_is_healthy_chats_over_websocket_and_grpc_and_drains_on_sigterm(image) -> None:
    ports = {name: free_port() for name in ("ws", "grpc", "web")}
    container = Container(
        image,
        "-p", f"127.0.0.1:{ports['ws']}:8080",
        "-p", f"127.0.0.1:{ports['grpc']}:50051",
        "-p", f"127.0.0.1:{ports['web']}:3000",
        # No IPv6 in the container: gRPC's default [::]:50051 must still take IPv4.
        "--sysctl", "net.ipv6.conf.all.disable_ipv6=1",
    )  # fmt: skip
    try:
        container.wait_healthy()
        assert podman("exec", container.name, "id", "-u").stdout.strip() != "0"
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['web']}/", timeout=WAIT) as page:
            assert b"<html" in page.read()

        target = f"127.0.0.1:{ports['grpc']}"
        streamed, channel = stream_room(target, "lobby", "sam")
        with channel, Client(f"ws://127.0.0.1:{ports['ws']}/ws") as alice:
            alice.join("lobby", "alice")
            ChatServiceStub(channel).SendMessage(
                pb.MessageRequest(user="deploybot", message="from grpc", room="lobby"), timeout=WAIT
            )
            got = alice.recv_until(lambda m: m.get("type") == "message")
            assert (got["user"], got["message"], got["protocol"]) == ("deploybot", "from grpc", "grpc")
            alice.send(type="message", room="lobby", message="from websocket", ref=1)
            assert alice.recv_type("sent")["ref"] == 1
            assert next_message(streamed, "from websocket").user == "alice"

            # SIGTERM (the image's STOPSIGNAL) with clients still connected: they are told, then let go.
            podman("stop", "--time", str(int(WAIT)), container.name, timeout=WAIT * 2)
            with pytest.raises(ConnectionClosed) as closed:
                alice.recv_until(lambda m: False)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert container.state(".State.ExitCode") == "0", container.logs()
        log = container.logs()
        assert "draining 2 sessions" in log and "drained" in log and "Server Shut Down." in log, log
    finally:
        container.remove()


@pytest.fixture
def compose(image, tmp_path) -> dict[str, int]:
    """``docker/compose.yml`` up (Redis and two chatd replicas) on free loopback ports; down afterwards."""
    require(shutil.which("podman-compose") is not None, "podman-compose is not installed (scripts/install-test-deps)")
    (tmp_path / "Containerfile").write_text(REDIS_CONTAINERFILE)
    build(REDIS_IMAGE, "-f", str(tmp_path / "Containerfile"), str(tmp_path))
    ports = {f"CHATD_{r}_{name}": free_port() for r in "AB" for name in ("WEB", "WS", "SIGNALR", "GRPC")}
    env = {**os.environ, "CHATD_IMAGE": image, "REDIS_IMAGE": REDIS_IMAGE, **{k: str(v) for k, v in ports.items()}}
    project = f"chatdtest{os.getpid()}"
    command = [
        "podman-compose", "-p", project, "-f", str(ROOT / "docker/compose.yml"),
        # (=: argparse would take a value starting with -- for an option of its own)
        "--podman-args=--runtime runc",
        "--podman-run-args=" + " ".join(ulimits()),
        "--podman-rm-args=--volumes",
    ]  # fmt: skip

    def run(*args: str) -> str:
        result = subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    run("up", "-d", "--no-build")
    try:
        yield {"project": project, **ports}
    finally:
        run("down", "--volumes")
        podman("network", "rm", "--force", f"{project}_default", check=False)


def test_compose_runs_two_replicas_on_one_redis_and_a_message_crosses_them(compose) -> None:
    project = compose["project"]
    replicas = [Container.named(f"{project}_{service}_1") for service in ("redis", "chatd-a", "chatd-b")]
    for container in replicas:
        container.wait_healthy()
    with (
        Client(f"ws://127.0.0.1:{compose['CHATD_A_WS']}/ws") as alice,
        Client(f"ws://127.0.0.1:{compose['CHATD_B_WS']}/ws") as bob,
    ):
        alice.join("lobby", "alice")
        bob.join("lobby", "bob")
        alice.send(type="message", room="lobby", message="through redis", ref=1)
        assert alice.recv_type("sent")["ref"] == 1
        got = bob.recv_until(lambda m: m.get("type") == "message")
        assert (got["user"], got["message"]) == ("alice", "through redis")
        # And back, from replica b's gRPC to replica a's WebSocket client.
        with grpc.insecure_channel(f"127.0.0.1:{compose['CHATD_B_GRPC']}") as channel:
            ChatServiceStub(channel).SendMessage(
                pb.MessageRequest(user="deploybot", message="via b", room="lobby"), timeout=WAIT
            )
        got = alice.recv_until(lambda m: m.get("type") == "message" and m["message"] == "via b")
        assert (got["user"], got["protocol"]) == ("deploybot", "grpc")
    # Both served the one history in Redis.
    with urllib.request.urlopen(f"http://127.0.0.1:{compose['CHATD_B_WS']}/stats", timeout=WAIT) as r:
        assert r.status == 200


def test_image_reads_options_from_the_environment_and_a_bad_one_stops_the_start(image) -> None:
    result = podman("run", "--rm", *ulimits(), "-e", "MAX_CONNECTIONS=many", image, check=False, timeout=WAIT * 2)
    assert result.returncode == 1
    assert "chatd: --max-connections must be a whole number, not 'many'" in result.stdout + result.stderr
