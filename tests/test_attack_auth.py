"""Hostile-client tests of token authentication, limits and start-up errors.

Every test runs a real ``twistd -n chatd`` (``tests.daemon.Daemon``) on free
loopback ports and talks to it with real clients (``websockets``, grpcio,
raw sockets). Each test names the defect it shows; each fails today for the
reason it names.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from pathlib import Path

import grpc
import jwt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from chatd import tap
from chatd.grpc.generated import chat_pb2 as pb
from chatd.grpc.generated.chat_pb2_grpc import ChatServiceStub
from tests import grpcservers
from tests.daemon import Daemon
from tests.test_cross_protocol import SignalRClient
from tests.test_websocket import _raw_http
from tests.wsclient import Client

grpc_server = grpcservers.grpc_server  # a test that asks for it runs on both gRPC servers

SECRET = "correct horse battery staple, twice over"
TIMEOUT = 10


def mint(user: str = "alice", ttl: float = 3600, secret: str = SECRET, **claims: object) -> str:
    return jwt.encode({"sub": user, "exp": time.time() + ttl, **claims}, secret, algorithm="HS256")


@pytest.fixture
def secret_file(tmp_path: Path) -> str:
    path = tmp_path / "auth-secret"
    path.write_text(SECRET + "\n")
    return str(path)


def _ws_status(url: str) -> int:
    """101 if the upgrade succeeded (closed again at once), else the HTTP status."""
    try:
        with connect(url, open_timeout=TIMEOUT):
            return 101
    except InvalidStatus as e:
        return e.response.status_code


def _ping(url: str) -> dict:
    with connect(url, open_timeout=TIMEOUT) as ws:
        ws.send('{"type":"ping"}')
        return json.loads(ws.recv(timeout=TIMEOUT))


def _metrics(daemon: Daemon) -> str:
    with urllib.request.urlopen(daemon.url(path="/metrics"), timeout=TIMEOUT) as r:
        return r.read().decode()


# -- limits ---------------------------------------------------------------------------


# DEFECT: --handshake-timeout does not bound the wait for a whole HTTP request. It is
# twisted.web's idle timeout (``Site.timeOut``), which every received byte resets, so a
# slow-header (slowloris) client that trickles one header line at a time holds its socket
# for as long as it likes, outside the per-address limit (nothing is counted before the
# upgrade). README: "--handshake-timeout bounds how long a connection may wait for a
# whole HTTP request on every listener (slow-header clients)".
def test_a_slowloris_client_trickling_headers_is_dropped_after_the_handshake_timeout() -> None:
    with Daemon("--handshake-timeout", "2") as daemon:
        daemon.wait_healthy()
        with socket.create_connection(("127.0.0.1", daemon.ports["ws"]), timeout=TIMEOUT) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never the blank line
            sock.settimeout(0.25)
            started = time.monotonic()
            closed_after = None
            while time.monotonic() - started < 8:
                try:
                    sock.sendall(b"X-Slow: 1\r\n")
                    if sock.recv(1024) == b"":
                        closed_after = time.monotonic() - started
                        break
                except TimeoutError:
                    pass
                except OSError:
                    closed_after = time.monotonic() - started
                    break
                time.sleep(0.25)
        assert closed_after is not None and closed_after < 4, (
            f"a request still unfinished after {time.monotonic() - started:.1f} s with "
            "--handshake-timeout 2 was never dropped (every trickled byte restarts the clock)"
        )


# DEFECT: a connection dropped by --handshake-timeout (waiting for a request) is not
# counted at /metrics, though README promises every limit's refusal is counted as
# chatd_limit_refusals_total{limit,protocol}.
def test_a_request_dropped_by_the_handshake_timeout_is_counted_in_metrics() -> None:
    with Daemon("--handshake-timeout", "1") as daemon:
        daemon.wait_healthy()
        with socket.create_connection(("127.0.0.1", daemon.ports["ws"]), timeout=TIMEOUT) as sock:
            sock.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            assert sock.recv(1024) == b""  # dropped, as promised
        counted = [
            line
            for line in _metrics(daemon).splitlines()
            if line.startswith("chatd_limit_refusals_total{") and 'limit="handshake_timeout"' in line
        ]
        assert counted, "the dropped request is not in chatd_limit_refusals_total"


# DEFECT: gRPC health Watch (and reflection) streams are open to anyone (no token) and
# take slots of --grpc-max-streams, but are not counted against --max-connections-per-ip.
# One unauthenticated client on one address holds every stream slot and every
# authenticated StreamMessages/Chat gets RESOURCE_EXHAUSTED "server full".
def test_unauthenticated_grpc_health_streams_are_held_to_the_per_address_limit(secret_file, grpc_server) -> None:
    with Daemon(
        "--grpc-server", grpc_server,
        "--auth-secret-file", secret_file,
        "--grpc-max-streams", "3", "--grpc-workers", "10", "--max-connections-per-ip", "2",
    ) as daemon:
        daemon.wait_healthy()
        with grpc.insecure_channel(f"127.0.0.1:{daemon.ports['grpc']}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(3)]
            admitted = 0
            try:
                for watch in watches:
                    try:
                        next(watch)
                        admitted += 1
                    except grpc.RpcError as e:
                        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                stream = ChatServiceStub(channel).StreamMessages(
                    pb.StreamRequest(room="lobby"), metadata=[("authorization", "Bearer " + mint())], timeout=5
                )
                try:
                    stream.initial_metadata()
                    locked_out = stream.code() if stream.done() else None
                finally:
                    stream.cancel()
            finally:
                for watch in watches:
                    watch.cancel()
        assert admitted <= 2, (
            f"one address without a token holds {admitted} gRPC streams past --max-connections-per-ip 2 "
            f"(an authenticated stream then gets {locked_out})"
        )


# DEFECT: a SignalR SendToRoom refused by the per-connection rate limit still joins the
# room first (presence goes out, GetUsers lists the sender): ChatHub.send_to_room checks
# only the per-user rate (hub.check_rate without the session) before _ensure_in. README:
# "nothing is published", and a refusal "changes nothing else".
def test_a_signalr_send_refused_by_the_connection_rate_does_not_join_the_room(secret_file) -> None:
    with Daemon(
        "--auth-secret-file", secret_file,
        "--max-message-rate", "0", "--max-connection-rate", "1", "--connection-burst", "1",
    ) as daemon:
        daemon.wait_healthy()
        url = daemon.url("signalr", "ws", "/signalr") + "?access_token=" + mint("alice")
        with SignalRClient(url) as alice:
            assert alice.call("SendToRoom", "first", "alice", "one")["room"] == "first"
            refused_id = alice.invoke("SendToRoom", "elsewhere", "alice", "two")
            while True:
                record = alice.next()
                if record.get("invocationId") == refused_id:
                    break
            assert record.get("error", "").startswith("rate limited: this connection"), record
            users = alice.call("GetUsers", "elsewhere")
        assert users == [], f"the refused send left alice in the room: GetUsers -> {users}"


# DEFECT (auth off): a SignalR SendToRoom refused by --max-rooms-per-connection still
# renames the provisional guest-N connection to the name it gave (presence leave/join in
# every room it is in): ChatHub._name runs before the join that is refused.
def test_a_signalr_send_refused_by_the_room_limit_does_not_rename_the_guest() -> None:
    with Daemon("--max-rooms-per-connection", "2") as daemon:
        daemon.wait_healthy()
        with SignalRClient(daemon.url("signalr", "ws", "/signalr")) as guest:
            before = guest.call("GetUsers", "general")
            assert len(before) == 1 and before[0].startswith("guest-"), before
            guest.call("JoinRoom", "second")  # general + second: the limit
            refused_id = guest.invoke("SendToRoom", "third", "zed", "hi")
            while True:
                record = guest.next()
                if record.get("invocationId") == refused_id:
                    break
            assert record.get("error", "").startswith("too many rooms"), record
            after = guest.call("GetUsers", "general")
        assert after == before, f"the refused send renamed the connection: {before} -> {after}"


# -- tokens ---------------------------------------------------------------------------


# DEFECT: a token whose exp is NaN (PyJWT and Python's json write and read NaN) passes
# ``_number`` and is never "expired" (every comparison with NaN is false). The upgrade is
# accepted, then Hub.connect claims the address slot and fails in callLater(nan) (an
# AssertionError nobody catches): the client hangs with no session, and the slot is
# never given back, so a few such connections lock the address out for good.
def test_a_token_with_exp_nan_is_refused_and_leaks_no_address_slot(secret_file) -> None:
    with Daemon("--auth-secret-file", secret_file, "--max-connections-per-ip", "2") as daemon:
        daemon.wait_healthy()
        nan_token = jwt.encode({"sub": "alice", "exp": float("nan")}, SECRET, algorithm="HS256")
        statuses = [_ws_status(daemon.ws_url + "?token=" + nan_token) for _ in range(2)]
        time.sleep(0.5)
        try:
            after = _ping(daemon.ws_url + "?token=" + mint())
        except ConnectionClosed as e:
            after = {"closed": e.rcvd.code if e.rcvd else None, "reason": e.rcvd.reason if e.rcvd else ""}
        assert statuses == [401, 401] and after == {"type": "pong"}, (
            f"exp=NaN upgrades: {statuses} (want 401); a good token afterwards: {after}"
        )


# DEFECT: an explicitly empty --auth-secret (e.g. ``--auth-secret "$SECRET"`` with the
# variable unset) starts the daemon with token authentication silently OFF: fail-open.
# An empty value given on the command line is a bad option value and should stop the
# start with one line (README: "any bad option value").
def test_an_explicitly_empty_auth_secret_does_not_start_an_open_server() -> None:
    with Daemon("--auth-secret", "") as daemon:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and daemon.proc.poll() is None:
            try:
                with urllib.request.urlopen(daemon.url(path="/health"), timeout=2):
                    break
            except OSError:
                time.sleep(0.2)
        if daemon.proc.poll() is not None:
            assert daemon.proc.returncode != 0
            assert "--auth-secret" in daemon.read_output()
            return
        status = _ws_status(daemon.ws_url)
        assert status != 101, "chatd started with --auth-secret '' and accepts WebSockets without a token"


# DEFECT (fixed): --auth-secret-file's help said the secret is the file's first line,
# but the whole file (less trailing newlines) was used: a login service signing with
# the first line had every token refused. Now a file must hold one line, as the help
# says, and a file of more lines stops the start with one line naming the option.
def test_a_secret_file_of_more_than_one_line_is_a_start_up_error(tmp_path) -> None:
    path = tmp_path / "auth-secret"
    path.write_text(f"{SECRET}\nand a second line, also long enough to be a secret\n")
    help_text = " ".join(tap.Options().getUsage().split())
    assert "one line" in help_text  # what the operator is told
    with Daemon("--auth-secret-file", str(path)) as daemon:
        daemon.proc.wait(30)
        output = daemon.read_output()
    assert daemon.proc.returncode != 0
    assert "--auth-secret-file" in output and "one line" in output
    assert "Traceback" not in output
    path.write_text(SECRET + "\n")  # one line, its newline dropped: works
    with Daemon("--auth-secret-file", str(path)) as daemon:
        daemon.wait_healthy()
        assert _ws_status(daemon.ws_url + "?token=" + mint(secret=SECRET)) == 101


# The deadline must bound only the wait for a request: an upgraded WebSocket
# and a long poll being answered outlive it.
def test_the_handshake_deadline_spares_websockets_and_long_polls() -> None:
    import json
    import urllib.request

    with Daemon("--handshake-timeout", "1") as daemon:
        daemon.wait_healthy()
        with Client(daemon.ws_url) as ws:
            ws.join("r", "alice")
            time.sleep(2.5)
            ws.send(type="ping")
            assert ws.recv_type("pong") == {"type": "pong"}
        base = daemon.url("signalr", path="/signalr")
        negotiate = urllib.request.Request(base + "/negotiate?negotiateVersion=1", data=b"", method="POST")
        with urllib.request.urlopen(negotiate, timeout=10) as r:
            token = json.loads(r.read())["connectionToken"]
        urllib.request.urlopen(f"{base}?id={token}", timeout=10).close()  # activates long polling
        started = time.monotonic()
        handshake = b'{"protocol":"json","version":1}\x1e'
        urllib.request.urlopen(urllib.request.Request(f"{base}?id={token}", data=handshake), timeout=10).close()
        with urllib.request.urlopen(f"{base}?id={token}", timeout=10) as r:  # the handshake answer
            assert r.read().startswith(b"{}")
        from concurrent.futures import ThreadPoolExecutor

        def poll() -> bytes:
            with urllib.request.urlopen(f"{base}?id={token}", timeout=30) as r:  # waits: nothing to say yet
                return r.read()

        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(poll)
            time.sleep(2.5)  # past the 1 s deadline, the poll is still held
            assert not waiting.done()
            with Client(daemon.ws_url) as ws:
                ws.send(user="wes", room="general", message="wake up")
                body = waiting.result(timeout=15)
        assert b"\"target\":\"UserJoined\"" in body  # the first event after the wait, held past the deadline
        assert time.monotonic() - started > 2.5


def _crit_token(extension: str) -> str:
    """An unsigned token whose header lists ``extension`` as critical: PyJWT names it before checking anything."""
    import base64

    def b64(d: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    return b64({"alg": "HS256", "crit": [extension]}) + "." + b64({"sub": "a", "exp": 9e9}) + ".AAAA"


def test_token_text_in_a_refusal_cannot_add_headers_or_log_lines() -> None:
    """A reason built from the token is one printable line: the 401 status line and the log get no CR/LF from it."""
    from twisted.internet.task import Clock

    from chatd.auth import Authenticator, Unauthenticated

    forged = _crit_token("x\r\nSet-Cookie: injected=1\r\nX-Injected: yes")
    with pytest.raises(Unauthenticated) as caught:
        Authenticator(SECRET.encode(), "HS256", Clock()).verify(forged)
    assert "\r" not in caught.value.reason and "\n" not in caught.value.reason
    assert "Unsupported critical extension" in caught.value.reason
    with Daemon("--auth-secret", SECRET) as d:
        d.wait_healthy()
        raw = _raw_http(d.ports["ws"], (
            f"GET /ws?token={forged} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())  # fmt: skip
        log = d.stop()
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"HTTP/1.1 401 "), raw
    assert not any(line.startswith((b"Set-Cookie", b"X-Injected")) for line in head.split(b"\r\n")), raw
    assert not any(line.lstrip().startswith(("Set-Cookie", "X-Injected")) for line in log.splitlines()), log


def test_a_refused_upgrade_costs_one_log_line_within_the_budget() -> None:
    """chatd logs a refusal once (summarised under a flood); Autobahn's own two lines per refusal are not added."""
    with Daemon("--auth-secret", SECRET) as d:
        d.wait_healthy()
        for i in range(3):
            assert _ws_status(d.ws_url + f"?token=bad{i}") == 401
        log = d.stop()
    assert sum(" refused: invalid token" in line for line in log.splitlines()) == 3, log
    assert "failing WebSocket opening handshake" not in log, log
    assert "dropping connection to peer" not in log, log


def test_upgrades_autobahn_refuses_are_logged_once_within_the_budget_too() -> None:
    """A malformed upgrade (no key, a wrong version) is refused by Autobahn: one chatd line, not Autobahn's two."""
    with Daemon() as d:
        d.wait_healthy()
        for version in ("8", "99"):
            s = socket.create_connection(("127.0.0.1", d.ports["ws"]), timeout=10)
            s.sendall((f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                       f"Sec-WebSocket-Version: {version}\r\n\r\n").encode())  # fmt: skip
            assert s.recv(4096).startswith(b"HTTP/1.1 4")
            s.close()
        time.sleep(0.5)
        log = d.stop()
    assert sum(" refused: " in line for line in log.splitlines()) == 2, log
    assert "failing WebSocket opening handshake" not in log, log
    assert "dropping connection to peer" not in log, log
