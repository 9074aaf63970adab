"""Token authentication: chatd.auth, the hub's enforcement, and every protocol with real clients.

Unit tests drive :class:`chatd.auth.Authenticator` and the hub with
``task.Clock``; integration tests start chatd with ``--auth-secret`` and
talk to it with ``websockets``, grpcio, the official ``@microsoft/signalr``
client in Node (``tests/node/client.js``) and ``python -m chatd.token``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import grpc
import jwt
import pytest
import pytest_twisted
from grpc_health.v1 import health_pb2, health_pb2_grpc
from twisted.internet import task
from twisted.internet.threads import deferToThread
from twisted.python import usage
from websockets.exceptions import ConnectionClosed, InvalidStatus

from chatd import auth, tap
from chatd.auth import Authenticator, Forbidden, Identity, Unauthenticated
from chatd.grpc.generated import chat_pb2 as pb
from chatd.grpc.generated.chat_pb2_grpc import ChatServiceStub
from chatd.hub import Hub, Session
from tests import grpcservers
from tests.conftest import require, require_tool
from tests.daemon import ROOT
from tests.test_signalr_interop import NodeClient, hub_url, node
from tests.wsclient import Client

grpc_server = grpcservers.grpc_server  # a test that asks for it runs on both gRPC servers

SECRET = "correct horse battery staple, twice over"
OTHER_SECRET = "a different secret of the same good length"
TIMEOUT = 15


def mint(
    user: str = "alice", ttl: float = 3600, rooms: list[str] | None = None, secret: str = SECRET, **extra: Any
) -> str:
    body: dict[str, Any] = {"sub": user, "exp": time.time() + ttl, **extra}
    if rooms is not None:
        body["rooms"] = rooms
    return jwt.encode(body, secret, algorithm="HS256")


def minted_at(clock: task.Clock, user: str = "alice", ttl: float = 60, **claims: Any) -> str:
    return jwt.encode({"sub": user, "exp": clock.seconds() + ttl, **claims}, SECRET, algorithm="HS256")


# -- chatd.auth ---------------------------------------------------------------------


def test_a_token_gives_its_user_rooms_and_expiry() -> None:
    clock = task.Clock()
    clock.advance(1000)
    identity = Authenticator(SECRET.encode(), "HS256", clock).verify(
        minted_at(clock, "alice", 60, rooms=["general", "ops"])
    )
    assert identity == Identity("alice", frozenset({"general", "ops"}), 1060.0)
    assert identity.allows("ops") and not identity.allows("random")


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (None, "a token is required"),
        ("not.a.jwt", "invalid token"),
        (
            jwt.encode({"sub": "alice", "exp": 2000}, OTHER_SECRET, algorithm="HS256"),
            "Signature verification failed",
        ),
        (jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"), 'Token is missing the "exp" claim'),
        (jwt.encode({"exp": 2000}, SECRET, algorithm="HS256"), 'Token is missing the "sub" claim'),
        (jwt.encode({"sub": "alice", "exp": 2000}, None, algorithm="none"), "invalid token"),
        (jwt.encode({"sub": "alice", "exp": 999}, SECRET, algorithm="HS256"), "token expired"),
        (jwt.encode({"sub": "alice", "exp": 2000, "nbf": 1500}, SECRET, algorithm="HS256"), "not valid yet"),
        (jwt.encode({"sub": "a\nb", "exp": 2000}, SECRET, algorithm="HS256"), "sub is not a user name"),
        (
            jwt.encode({"sub": "alice", "exp": 2000, "rooms": "ops"}, SECRET, algorithm="HS256"),
            "rooms must be a list",
        ),
        (jwt.encode({"sub": "alice", "exp": 2000, "rooms": ["a b"]}, SECRET, algorithm="HS256"), "rooms"),
    ],
    ids=[
        "missing",
        "garbage",
        "forged",
        "no-exp",
        "no-sub",
        "alg-none",
        "expired",
        "nbf",
        "bad-sub",
        "rooms-str",
        "bad-room",
    ],
)
def test_bad_tokens_are_refused_with_a_reason(token: str | None, reason: str) -> None:
    clock = task.Clock()
    clock.advance(1000)
    with pytest.raises(Unauthenticated) as caught:
        Authenticator(SECRET.encode(), "HS256", clock).verify(token)
    assert reason in caught.value.reason


def test_an_identity_providers_token_is_checked_for_the_audience_and_issuer_given() -> None:
    """Tokens from an OAuth2/OIDC provider carry ``aud`` and ``iss``: ``--auth-audience``/``--auth-issuer`` check them."""
    clock = task.Clock()
    clock.advance(1000)
    verifier = Authenticator(SECRET.encode(), "HS256", clock, audience="chat", issuer="https://id.example")
    good = minted_at(clock, "alice", aud="chat", iss="https://id.example")
    assert verifier.verify(good) == Identity("alice", None, 1060.0)
    # aud may be a list that names this service among others (RFC 7519 section 4.1.3)
    assert verifier.verify(minted_at(clock, aud=["billing", "chat"], iss="https://id.example")).user == "alice"
    for claims, reason in (
        ({"aud": "billing", "iss": "https://id.example"}, "aud must name 'chat'"),
        ({"iss": "https://id.example"}, '"aud"'),
        ({"aud": "chat", "iss": "https://evil.example"}, "iss must be 'https://id.example'"),
        ({"aud": "chat"}, '"iss"'),
    ):
        with pytest.raises(Unauthenticated) as caught:
            verifier.verify(minted_at(clock, **claims))
        assert reason in caught.value.reason, (claims, caught.value.reason)
    # No audience configured: a token meant for some audience is refused, and the reason says what to set.
    plain = Authenticator(SECRET.encode(), "HS256", clock)
    with pytest.raises(Unauthenticated, match="--auth-audience"):
        plain.verify(good)
    assert plain.verify(minted_at(clock, iss="https://anyone.example")).user == "alice"  # iss unchecked unless asked


def test_audience_and_issuer_options_from_flags_or_environment() -> None:
    for argv, environ in (
        (["--auth-secret", SECRET, "--auth-audience", "chat", "--auth-issuer", "https://id.example"], {}),
        ([], {"AUTH_SECRET": SECRET, "AUTH_AUDIENCE": "chat", "AUTH_ISSUER": "https://id.example"}),
    ):
        options = tap.Options(environ=environ)
        options.parseOptions(argv)
        verifier = auth.from_options(options, task.Clock())
        assert (verifier.audience, verifier.issuer) == ("chat", "https://id.example")
    with pytest.raises(usage.UsageError, match="--auth-audience.*needs token authentication"):
        tap.Options(environ={}).parseOptions(["--auth-audience", "chat"])


def test_expiry_follows_the_injected_clock_not_the_wall_clock() -> None:
    clock = task.Clock()  # at 0: a token that expired in 1970 is still good here
    verifier = Authenticator(SECRET.encode(), "HS256", clock)
    token = jwt.encode({"sub": "alice", "exp": 30}, SECRET, algorithm="HS256")
    assert verifier.verify(token).user == "alice"
    clock.advance(30)
    with pytest.raises(Unauthenticated, match="token expired"):
        verifier.verify(token)


def test_bearer_header_and_query_token() -> None:
    clock = task.Clock()
    verifier = Authenticator(SECRET.encode(), "HS256", clock)
    token = minted_at(clock)
    assert verifier.from_request(f"Bearer {token}", None).user == "alice"
    assert verifier.from_request(b"bearer " + token.encode(), None).user == "alice"
    assert verifier.from_request(None, token).user == "alice"
    with pytest.raises(Unauthenticated):
        verifier.from_request(f"Basic {token}", None)


def test_rs256_with_a_public_key_file(tmp_path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path / "pub.pem"
    pem.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    options = tap.Options(environ={})
    options.parseOptions(["--auth-public-key", str(pem)])
    clock = task.Clock()
    verifier = auth.from_options(options, clock)
    assert verifier is not None and verifier.algorithm == "RS256"
    assert verifier.verify(jwt.encode({"sub": "bob", "exp": 60}, key, algorithm="RS256")).user == "bob"
    # An HS256 token "signed" with the public key must not pass (algorithm confusion).
    with pytest.raises(Unauthenticated):
        verifier.verify(jwt.encode({"sub": "bob", "exp": 60}, SECRET, algorithm="HS256"))


def test_options_read_the_secret_from_flag_env_or_file_and_refuse_weak_or_double(tmp_path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    for argv, environ in (
        (["--auth-secret", SECRET], {}),
        ([], {"AUTH_SECRET": SECRET}),
        (["--auth-secret-file", str(secret_file)], {}),
        ([], {"AUTH_SECRET_FILE": str(secret_file)}),
    ):
        options = tap.Options(environ=environ)
        options.parseOptions(argv)
        assert options["auth-key"] == (SECRET.encode(), "HS256"), (argv, environ)
    off = tap.Options(environ={})
    off.parseOptions([])
    assert off["auth-key"] is None and auth.from_options(off, task.Clock()) is None
    for argv, message in (
        (["--auth-secret", "short"], "at least 32 bytes"),
        (["--auth-secret", SECRET, "--auth-secret-file", str(secret_file)], "not both"),
        (["--auth-secret-file", str(tmp_path / "missing")], "cannot read"),
    ):
        with pytest.raises(usage.UsageError, match=message):
            tap.Options(environ={}).parseOptions(argv)


def test_secrets_stay_off_a_workers_command_line() -> None:
    options = tap.Options(environ={})
    options.parseOptions(["--auth-secret", SECRET, "--metrics-token", "scrape-me"])
    argv = tap.worker_argv(options)
    assert SECRET not in argv and "scrape-me" not in argv
    assert auth.secret_environment(options) == {"AUTH_SECRET": SECRET, "METRICS_TOKEN": "scrape-me"}


# -- the hub enforces the identity, and closes at expiry (task.Clock) ------------------


class Recorder(Session):
    protocol = "test"

    def __init__(self, identity: Identity | None) -> None:
        super().__init__("peer", identity)
        self.events: list[Any] = []
        self.expired = 0

    def deliver(self, event: Any) -> None:
        self.events.append(event)

    def close(self, reason: str) -> None:
        self.events.append(("closed", reason))

    def token_expired(self) -> None:
        self.expired += 1


def test_the_hub_fixes_the_name_limits_rooms_and_ends_the_session_at_expiry() -> None:
    clock = task.Clock()
    hub = Hub(clock)
    hub.startService()
    session = Recorder(Identity("alice", frozenset({"ops"}), 30.0))
    hub.connect(session)
    assert session.user == "alice"
    assert hub.identify(session, None) == "alice"
    with pytest.raises(Forbidden, match="the token is for user alice, not mallory"):
        hub.identify(session, "mallory")
    with pytest.raises(Forbidden, match="not allowed in room general"):
        hub.join(session, "general")
    assert session.rooms == set() and hub.rooms() == {}
    hub.join(session, "ops")
    with pytest.raises(Forbidden, match="not allowed in room general"):
        hub.publish("general", "alice", "hi", "test", identity=session.identity)
    with pytest.raises(Forbidden):
        hub.publish("ops", "mallory", "hi", "test", identity=session.identity)
    with pytest.raises(Forbidden):
        hub.history("general", identity=session.identity)
    clock.advance(29.9)
    assert session.expired == 0 and session.id in hub.sessions
    clock.advance(0.1)
    assert session.expired == 1
    assert session.id not in hub.sessions and hub.rooms() == {}


def test_a_session_that_leaves_cancels_its_expiry_and_an_expired_one_cannot_connect() -> None:
    clock = task.Clock()
    hub = Hub(clock)
    hub.startService()
    session = Recorder(Identity("alice", None, 30.0))
    hub.connect(session)
    hub.disconnect(session)
    assert clock.getDelayedCalls() == [] or all(
        not c.active() for c in clock.getDelayedCalls() if c.func == hub._token_expired
    )
    clock.advance(60)
    assert session.expired == 0
    with pytest.raises(Unauthenticated, match="token expired"):
        hub.connect(Recorder(Identity("alice", None, 30.0)))
    assert hub.sessions == {}


def test_a_websocket_session_closes_with_4001_when_its_token_expires() -> None:
    from chatd import websocket

    class FakeProto:
        def __init__(self, hub: Hub) -> None:
            self.factory = type("F", (), {"hub": hub})()
            self.closed: list[tuple[int, bytes]] = []

        def sendCloseFrame(self, code: int, reasonUtf8: bytes, isReply: bool) -> None:
            self.closed.append((code, reasonUtf8))

    clock = task.Clock()
    hub = Hub(clock)
    hub.startService()
    proto = FakeProto(hub)
    session = websocket.WebSocketSession(proto, "peer", 1 << 20, Identity("alice", None, 5.0))  # type: ignore[arg-type]
    hub.connect(session)
    clock.advance(5)
    assert proto.closed == [(4001, b"token expired")]
    assert session.id not in hub.sessions


def test_a_signalr_connection_is_closed_with_allow_reconnect_when_its_token_expires() -> None:
    from chatd.signalr.chat import ChatHub
    from chatd.signalr.connection import CLOSED, HubConnection

    clock = task.Clock()
    hub = Hub(clock)
    hub.startService()
    written: list[bytes] = []

    class Transport:
        name = "WebSockets"
        supports_binary = True
        inherent_keep_alive = False
        supports_reconnect = False

        def write(self, data: bytes, binary: bool) -> None:
            written.append(data)

        def close(self) -> None:
            pass

    connection = HubConnection(
        clock, lambda c: ChatHub(hub, c), identity=Identity("alice", frozenset({"ops"}), 10.0)
    )
    connection.attach(Transport())
    connection.data_received(b'{"protocol":"json","version":1}\x1e')
    assert written[0] == b"{}\x1e"
    assert hub.rooms() == {}  # "general" is outside the token's rooms: not joined
    clock.advance(10)
    assert connection.state == CLOSED
    assert json.loads(written[-1].rstrip(b"\x1e")) == {
        "type": 7,
        "error": "token expired",
        "allowReconnect": True,
    }


# -- WebSocket, live --------------------------------------------------------------------


def _status(url: str, **kwargs: Any) -> int:
    try:
        Client(url, **kwargs).close()
    except InvalidStatus as e:
        return e.response.status_code
    return 101


@pytest_twisted.ensureDeferred
async def test_websocket_takes_a_token_in_the_query_or_a_header_and_refuses_bad_ones(start) -> None:
    running = await start("--auth-secret", SECRET)

    def scenario() -> None:
        url = running.ws_url
        assert _status(url) == 401
        assert _status(url + "?token=" + mint(secret=OTHER_SECRET)) == 401
        assert _status(url + "?token=" + mint(ttl=-5)) == 401
        assert (
            _status(url, additional_headers={"Authorization": "Bearer " + mint(secret=OTHER_SECRET)}) == 401
        )
        with (
            Client(url + "?token=" + mint("alice")) as a,
            Client(url, additional_headers={"Authorization": "Bearer " + mint("bob")}) as b,
        ):
            # The name comes from the token: join without one.
            assert a.join("lobby", "alice")["user"] == "alice"
            b.send(type="join", room="lobby")
            assert b.recv_type("joined")["user"] == "bob"
            b.send(type="message", room="lobby", message="hi from bob", ref=1)
            assert b.recv_type("sent")["ref"] == 1
            frame = a.recv_until(lambda f: f.get("type") == "message")
            assert (frame["user"], frame["message"]) == ("bob", "hi from bob")
            # Claiming another name: an error reply, the connection stays.
            a.send(type="join", room="lobby2", user="mallory", ref="x")
            error = a.recv_type("error")
            assert error["error"] == "the token is for user alice, not mallory" and error["ref"] == "x"
            a.send(user="mallory", room="lobby", message="forged")
            assert a.recv_type("error")["error"] == "the token is for user alice, not mallory"
            a.send(type="ping")
            assert a.recv_type("pong") == {"type": "pong"}

    await deferToThread(scenario)
    assert [m.user for m in await running.hub.history("lobby")] == ["bob"]


@pytest_twisted.ensureDeferred
async def test_websocket_takes_an_identity_providers_token_for_its_audience(start) -> None:
    running = await start("--auth-secret", SECRET, "--auth-audience", "chat", "--auth-issuer", "https://id.example")

    def scenario() -> None:
        url = running.ws_url
        assert _status(url + "?token=" + mint(aud="billing", iss="https://id.example")) == 401
        assert _status(url + "?token=" + mint(aud="chat")) == 401
        with Client(url + "?token=" + mint("alice", aud="chat", iss="https://id.example")) as a:
            assert a.join("lobby", "alice")["user"] == "alice"

    await deferToThread(scenario)


@pytest_twisted.ensureDeferred
async def test_websocket_rooms_claim_limits_join_send_and_history(start) -> None:
    running = await start(environ={"AUTH_SECRET": SECRET})

    def scenario() -> list[str]:
        with Client(running.ws_url + "?token=" + mint("carol", rooms=["ops"])) as c:
            errors = []
            for request in (
                {"type": "join", "room": "general"},
                {"user": "carol", "room": "general", "message": "sneaky"},
                {"type": "history", "room": "general"},
            ):
                c.send(**request)
                errors.append(c.recv_type("error")["error"])
            assert c.join("ops", "carol")["room"] == "ops"
            return errors

    errors = await deferToThread(scenario)
    assert errors == ["not allowed in room general"] * 3
    assert (await running.hub.history("general")) == []


@pytest_twisted.ensureDeferred
async def test_a_live_websocket_is_closed_with_4001_when_its_2s_token_expires(start) -> None:
    running = await start("--auth-secret", SECRET)

    def scenario() -> tuple[int, str, float]:
        token = mint("dave", ttl=2)
        began = time.monotonic()
        with Client(running.ws_url + "?token=" + token) as d:
            d.join("lobby", "dave")
            try:
                while True:
                    d.recv(timeout=10)
            except ConnectionClosed as e:
                assert e.rcvd is not None
                return e.rcvd.code, e.rcvd.reason, time.monotonic() - began
        raise AssertionError("not closed")

    code, reason, took = await deferToThread(scenario)
    assert (code, reason) == (4001, "token expired")
    assert 0.5 < took < 5
    assert running.hub.sessions == {}


# -- HTTP: health, metrics, config --------------------------------------------------------


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest_twisted.ensureDeferred
async def test_health_page_and_config_stay_open_and_metrics_wants_its_own_token(start) -> None:
    running = await start("--auth-secret", SECRET, "--metrics-token", "scrape-me")

    def scenario() -> None:
        assert _get(running.http_url + "/health")[0] == 200
        assert _get(running.url("signalr", path="/signalr/health"))[0] == 200
        assert _get(running.url("web", path="/"))[0] == 200
        status, body = _get(running.url("web", path="/config.json"))
        assert status == 200 and json.loads(body)["auth"] is True
        assert _get(running.http_url + "/metrics")[0] == 401
        assert _get(running.http_url + "/metrics", {"Authorization": "Bearer wrong"})[0] == 401
        # A chat token is not the metrics token.
        assert _get(running.http_url + "/metrics", {"Authorization": "Bearer " + mint()})[0] == 401
        status, body = _get(running.http_url + "/metrics", {"Authorization": "Bearer scrape-me"})
        assert status == 200 and b"chatd_errors" in body

    await deferToThread(scenario)


@pytest_twisted.ensureDeferred
async def test_without_auth_config_says_so_and_metrics_are_open(chatd) -> None:
    def scenario() -> None:
        assert json.loads(_get(chatd.url("web", path="/config.json"))[1])["auth"] is False
        assert _get(chatd.http_url + "/metrics")[0] == 200

    await deferToThread(scenario)


# -- SignalR ----------------------------------------------------------------------------


def _post(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=b"", method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest_twisted.ensureDeferred
async def test_signalr_negotiate_and_transport_requests_need_the_token(start) -> None:
    running = await start("--auth-secret", SECRET)

    def scenario() -> None:
        base = hub_url(running)
        assert _post(base + "/negotiate?negotiateVersion=1")[0] == 401
        assert _post(base + "/negotiate?negotiateVersion=1&access_token=" + mint(ttl=-1))[0] == 401
        status, body = _post(base + "/negotiate?negotiateVersion=1", {"Authorization": "Bearer " + mint()})
        assert status == 200
        token = json.loads(body)["connectionToken"]
        # The connection's own transport requests need it too...
        assert _post(f"{base}?id={token}")[0] == 401
        assert _get(f"{base}?id={token}")[0] == 401
        # ...and from the same user: another user's valid token is not enough.
        assert _get(f"{base}?id={token}&access_token=" + mint("mallory"))[0] == 403
        assert _get(f"{base}?id={token}&access_token=" + mint("alice"))[0] == 200  # the first poll
        # Asking for another name at negotiate is refused in negotiate's own form.
        status, body = _post(
            base + "/negotiate?negotiateVersion=1&user=mallory", {"Authorization": "Bearer " + mint()}
        )
        assert json.loads(body) == {"error": "the token is for user alice, not mallory"}

    await deferToThread(scenario)


SIGNALR_TRANSPORTS = ["WebSockets", "ServerSentEvents", "LongPolling"]


@pytest.mark.parametrize("transport", SIGNALR_TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_official_signalr_client_with_access_token_factory(start, transport) -> None:
    node_path = node()
    running = await start("--auth-secret", SECRET)

    def scenario() -> None:
        with NodeClient(node_path) as refused:
            event = refused.start(hub_url(running), transport)
            assert event["event"] == "startFailed" and "401" in event["error"], event
        with NodeClient(node_path) as js, Client(running.ws_url + "?token=" + mint("bob")) as ws:
            js.connect(hub_url(running), transport, accessToken=mint("alice", rooms=["general", "ops"]))
            ws.join("ops", "bob")
            sent = js.call("SendToRoom", "ops", "alice", f"hello over {transport}")
            assert (sent["user"], sent["room"]) == ("alice", "ops")
            frame = ws.recv_until(lambda f: f.get("type") == "message")
            assert (frame["user"], frame["message"]) == ("alice", f"hello over {transport}")
            assert js.invoke("SendToRoom", "ops", "mallory", "forged")["error"].endswith(
                "the token is for user alice, not mallory"
            )
            assert js.invoke("JoinRoom", "random")["error"].endswith("not allowed in room random")
            assert js.invoke("GetHistory", "random", 10)["error"].endswith("not allowed in room random")

    await deferToThread(scenario)


@pytest_twisted.ensureDeferred
async def test_signalr_client_reconnects_with_a_fresh_token_when_its_token_expires(start) -> None:
    node_path = node()
    running = await start("--auth-secret", SECRET)

    def scenario() -> None:
        with NodeClient(node_path) as js:
            js.connect(
                hub_url(running), "WebSockets", accessToken=mint("erin", ttl=2), automaticReconnect=True
            )
            js.wait(lambda e: e["event"] == "tokenAsked")
            js.command(op="token", token=mint("erin", ttl=3600))
            js.wait(lambda e: e["event"] == "tokenSet")
            js.wait(lambda e: e["event"] == "reconnecting", timeout=10)
            js.wait(lambda e: e["event"] == "reconnected", timeout=10)
            assert js.call("SendToRoom", "general", "erin", "back with a new token")["user"] == "erin"

    await deferToThread(scenario)


# -- gRPC -------------------------------------------------------------------------------


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", "Bearer " + token)]


@pytest_twisted.ensureDeferred
async def test_grpc_needs_authorization_metadata_for_every_chat_method(start, grpc_server) -> None:
    running = await start("--auth-secret", SECRET, "--grpc-server", grpc_server)

    def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        with grpc.insecure_channel(running.grpc_target) as channel:
            chat = ChatServiceStub(channel)
            request = pb.MessageRequest(user="alice", message="hi", room="lobby")
            for name, call in (
                ("send", lambda md: chat.SendMessage(request, timeout=TIMEOUT, metadata=md)),
                ("stats", lambda md: chat.GetStats(pb.StatsRequest(), timeout=TIMEOUT, metadata=md)),
                (
                    "stream",
                    lambda md: next(
                        chat.StreamMessages(
                            pb.StreamRequest(room="lobby", user="alice"), timeout=TIMEOUT, metadata=md
                        )
                    ),
                ),
                ("chat", lambda md: next(chat.Chat(iter([]), timeout=TIMEOUT, metadata=md))),
            ):
                for label, md in (("none", None), ("forged", _bearer(mint(secret=OTHER_SECRET)))):
                    with pytest.raises(grpc.RpcError) as caught:
                        call(md)
                    out[f"{name}-{label}"] = caught.value.code()
            reply = chat.SendMessage(request, timeout=TIMEOUT, metadata=_bearer(mint("alice")))
            out["ok"] = (reply.user, reply.room)
            # No user in the request: the token's.
            reply = chat.SendMessage(
                pb.MessageRequest(message="hi", room="lobby"),
                timeout=TIMEOUT,
                metadata=_bearer(mint("alice")),
            )
            out["implicit"] = reply.user
            with pytest.raises(grpc.RpcError) as caught:
                chat.SendMessage(request, timeout=TIMEOUT, metadata=_bearer(mint("mallory")))
            out["other-user"] = (caught.value.code(), caught.value.details())
            # Health stays open.
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=TIMEOUT
            )
            out["health"] = health.status
        return out

    out = await deferToThread(scenario)
    for key in ("send", "stats", "stream", "chat"):
        assert out[f"{key}-none"] == grpc.StatusCode.UNAUTHENTICATED, key
        assert out[f"{key}-forged"] == grpc.StatusCode.UNAUTHENTICATED, key
    assert out["ok"] == ("alice", "lobby") and out["implicit"] == "alice"
    assert out["other-user"] == (
        grpc.StatusCode.PERMISSION_DENIED,
        "the token is for user mallory, not alice",
    )
    assert out["health"] == health_pb2.HealthCheckResponse.SERVING
    assert running.service.getServiceNamed("grpc").streams.open == 0


@pytest_twisted.ensureDeferred
async def test_grpc_rooms_claim_and_a_stream_ends_unauthenticated_when_its_token_expires(start, grpc_server) -> None:
    running = await start("--auth-secret", SECRET, "--grpc-server", grpc_server)

    def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        with grpc.insecure_channel(running.grpc_target) as channel:
            chat = ChatServiceStub(channel)
            md = _bearer(mint("frank", rooms=["ops"]))
            for name, call in (
                (
                    "send",
                    lambda: chat.SendMessage(
                        pb.MessageRequest(message="x", room="general"), timeout=TIMEOUT, metadata=md
                    ),
                ),
                (
                    "stream",
                    lambda: next(
                        chat.StreamMessages(pb.StreamRequest(room="general"), timeout=TIMEOUT, metadata=md)
                    ),
                ),
            ):
                with pytest.raises(grpc.RpcError) as caught:
                    call()
                out[name] = (caught.value.code(), caught.value.details())
            chat_call = chat.Chat(
                iter([pb.ChatEvent(ref="1", join=pb.Join(room="general"))]), timeout=TIMEOUT, metadata=md
            )
            event = next(chat_call)
            out["chat"] = (event.error.code, event.error.reason)
            chat_call.cancel()
            stream = chat.StreamMessages(
                pb.StreamRequest(room="ops"),
                timeout=TIMEOUT,
                metadata=_bearer(mint("frank", ttl=2, rooms=["ops"])),
            )
            with pytest.raises(grpc.RpcError) as caught:
                for _ in stream:
                    pass
            out["expired"] = (caught.value.code(), caught.value.details())
        return out

    out = await deferToThread(scenario)
    assert out["send"] == (grpc.StatusCode.PERMISSION_DENIED, "not allowed in room general")
    assert out["stream"] == (grpc.StatusCode.PERMISSION_DENIED, "not allowed in room general")
    assert out["chat"] == ("PERMISSION_DENIED", "not allowed in room general")
    assert out["expired"] == (grpc.StatusCode.UNAUTHENTICATED, "token expired")
    assert (await running.hub.history("general")) == []


# -- python -m chatd.token ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_chatd_token_mints_what_the_daemon_accepts(start, tmp_path) -> None:
    running = await start("--auth-secret", SECRET)
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")

    def mint_cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "chatd.token", *argv],
            cwd=ROOT,
            env={"PATH": "/usr/bin:/bin", **(env or {})},
            capture_output=True,
            text=True,
            timeout=60,
        )

    def scenario() -> None:
        by_env = mint_cli("alice", "--rooms", "general,ops", "--ttl", "1h", env={"AUTH_SECRET": SECRET})
        assert by_env.returncode == 0, by_env.stderr
        token = by_env.stdout.strip()
        claims = jwt.decode(token, SECRET, algorithms=["HS256"])
        assert claims["sub"] == "alice" and claims["rooms"] == ["general", "ops"]
        assert claims["exp"] - claims["iat"] == 3600
        with Client(running.ws_url + "?token=" + token) as a:
            assert a.join("ops", "alice")["user"] == "alice"
            a.send(type="join", room="random")
            assert a.recv_type("error")["error"] == "not allowed in room random"
        by_file = mint_cli("bob", "--secret-file", str(secret_file), "--ttl", "90s")
        assert by_file.returncode == 0, by_file.stderr
        assert running.hub.auth.verify(by_file.stdout.strip()).user == "bob"
        assert "rooms" not in jwt.decode(by_file.stdout.strip(), SECRET, algorithms=["HS256"])
        no_secret = mint_cli("carol")
        assert no_secret.returncode == 2 and "no secret" in no_secret.stderr
        bad_ttl = mint_cli("carol", "--ttl", "soon", env={"AUTH_SECRET": SECRET})
        assert bad_ttl.returncode == 2 and "--ttl" in bad_ttl.stderr

    await deferToThread(scenario)


# -- the browser client -------------------------------------------------------------------


@pytest.fixture
def chromium() -> str:
    from tests.test_browser import sync_playwright

    path = require_tool("chromium")
    require(sync_playwright is not None, "playwright is not installed (pip install '.[test]')")
    return path


@pytest_twisted.ensureDeferred
async def test_browser_pages_with_a_token_in_their_url_chat_over_websocket_and_signalr(
    start, chromium
) -> None:
    from playwright.sync_api import expect

    from tests.test_browser import ChatPage, assert_no_console_errors, in_browser, web_url

    running = await start("--auth-secret", SECRET)

    def scenario(browser: Any) -> None:
        # Without a token the page asks for one and connects nowhere.
        anonymous = ChatPage(browser, web_url(running))
        expect(anonymous.page.get_by_label("Token")).to_be_visible()
        anonymous.page.get_by_label("Name").fill("nobody")
        anonymous.page.get_by_label("Name").press("Enter")
        expect(anonymous.page.locator("#notice")).to_contain_text("This server needs a token")
        expect(anonymous.page.locator("#status")).not_to_have_attribute("data-state", "online")

        alice = ChatPage(browser, web_url(running) + "#token=" + mint("alice", rooms=["lobby"]))
        assert "token=" not in alice.page.url  # taken out of the address bar
        expect(alice.page.get_by_label("Name")).to_have_value("alice")
        expect(alice.page.get_by_label("Name")).not_to_be_editable()
        alice.connect("alice", "lobby", "websocket")

        bob = ChatPage(browser, web_url(running) + "#token=" + mint("bob"))
        bob.connect("bob", "lobby", "signalr")
        alice.send("Token-carrying hello over WebSocket")
        bob.expect_message("Token-carrying hello over WebSocket", "alice", "websocket")
        bob.send("And back over SignalR")
        alice.expect_message("And back over SignalR", "bob", "signalr")
        # A room outside alice's token is refused, in words.
        alice.page.get_by_label("Join another room").fill("ops")
        alice.page.get_by_label("Join another room").press("Enter")
        expect(alice.page.locator("#notice")).to_contain_text("not allowed in room ops")
        assert_no_console_errors(alice, bob)

    await in_browser(chromium, scenario)
