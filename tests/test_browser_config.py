"""The web listener without a browser: the page's files, /config.json, headers.

Real HTTP against a chatd on free ports (urllib in a worker thread), plus
unit tests of the URL rules with fake listeners.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.threads import deferToThread
from twisted.python import usage
from twisted.web.test.requesthelper import DummyRequest

from chatd import tap, webclient
from tests.conftest import require

ROOT = Path(__file__).resolve().parent.parent


def fetch(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET with exactly these headers (``Host`` included), as a browser or a proxy would send."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest("GET", path, skip_host="Host" in (headers or {}))
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def config(running: Any, headers: dict[str, str] | None = None) -> dict:
    status, _, body = fetch(running.ports["web"], "/config.json", headers)
    assert status == 200
    return json.loads(body)


# -- /config.json ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_config_names_each_protocol_at_the_host_the_browser_used(chatd) -> None:
    ws, sr, web = chatd.ports["ws"], chatd.ports["signalr"], chatd.ports["web"]

    def scenario() -> None:
        got = config(chatd, {"Host": f"chat.example.org:{web}"})
        assert got["websocket"] == f"ws://chat.example.org:{ws}/ws"
        assert got["signalr"] == f"http://chat.example.org:{sr}/signalr"
        assert got["protocols"] == ["websocket", "signalr"]
        assert got["stats"] == "/stats"
        assert got["maxMessageLength"] == chatd.hub.limits.max_message_length

        assert config(chatd, {"Host": f"127.0.0.1:{web}"})["websocket"] == f"ws://127.0.0.1:{ws}/ws"
        assert config(chatd, {"Host": f"[::1]:{web}"})["signalr"] == f"http://[::1]:{sr}/signalr"

    await deferToThread(scenario)


@pytest_twisted.ensureDeferred
async def test_config_asks_for_tls_when_the_page_came_over_https(chatd) -> None:
    ws, sr = chatd.ports["ws"], chatd.ports["signalr"]

    def scenario() -> None:
        got = config(chatd, {"Host": "chat.example.org", "X-Forwarded-Proto": "https"})
        assert got["websocket"] == f"wss://chat.example.org:{ws}/ws"
        assert got["signalr"] == f"https://chat.example.org:{sr}/signalr"

    await deferToThread(scenario)


@pytest_twisted.ensureDeferred
async def test_a_forged_host_header_cannot_reach_the_config_or_the_policy(chatd) -> None:
    ws, web = chatd.ports["ws"], chatd.ports["web"]
    forged = "evil.example'; script-src *; x=\"<"

    def scenario() -> None:
        got = config(chatd, {"Host": forged})
        assert got["websocket"] == f"ws://127.0.0.1:{ws}/ws"
        status, headers, _ = fetch(web, "/", {"Host": forged})
        assert status == 200
        assert "evil" not in headers["content-security-policy"]
        assert "script-src 'self';" in headers["content-security-policy"]

    await deferToThread(scenario)


@pytest_twisted.ensureDeferred
async def test_behind_a_reverse_proxy_the_configured_urls_win(start) -> None:
    running = await start("--web-ws-url", "/chat/ws", "--web-signalr-url", "https://sr.example.org/signalr")

    def scenario() -> None:
        headers = {"Host": "chat.example.org", "X-Forwarded-Proto": "https"}
        got = config(running, headers)
        assert got["websocket"] == "wss://chat.example.org/chat/ws"
        assert got["signalr"] == "https://sr.example.org/signalr"
        _, response, _ = fetch(running.ports["web"], "/", headers)
        policy = response["content-security-policy"]
        assert (
            "connect-src 'self' wss://chat.example.org https://sr.example.org wss://sr.example.org;" in policy
        )
        assert response["strict-transport-security"].startswith("max-age=")

    await deferToThread(scenario)


def test_a_malformed_public_url_stops_the_start() -> None:
    for name, value in (
        ("--web-ws-url", "http://chat.example.org/ws"),
        ("--web-ws-url", "wss://chat.example.org;x/ws"),
        ("--web-signalr-url", "https://chat.example.org/signalr?x=1"),
        ("--web-signalr-url", "signalr"),
    ):
        options = tap.Options(environ={})
        with pytest.raises(usage.UsageError, match=name):
            options.parseOptions([name, value])
    options = tap.Options(environ={"WEB_WS_URL": " /ws "})
    options.parseOptions([])
    assert options["web-ws-url"] == "/ws"


class _Port:
    def __init__(self, address: Any) -> None:
        self._address = address

    def getHost(self) -> Any:
        return self._address


def _request(host: bytes = b"chat.example.org:3000", secure: bool = False) -> DummyRequest:
    request = DummyRequest([b""])
    request.requestHeaders.setRawHeaders(b"host", [host])
    request.isSecure = lambda: secure  # type: ignore[method-assign]
    return request


def test_an_ssl_listener_is_reached_with_wss_and_https() -> None:
    port = _Port(IPv4Address("TCP", "0.0.0.0", 8443))
    found = ("ssl:8443:privateKey=key.pem:certKey=cert.pem", port)
    assert webclient.protocol_url("websocket", found, _request()) == "wss://chat.example.org:8443/ws"
    assert webclient.protocol_url("signalr", found, _request()) == "https://chat.example.org:8443/signalr"
    plain = ("tcp:8080", _Port(IPv4Address("TCP", "0.0.0.0", 8080)))
    assert webclient.protocol_url("websocket", plain, _request()) == "ws://chat.example.org:8080/ws"
    assert (
        webclient.protocol_url("websocket", plain, _request(secure=True)) == "wss://chat.example.org:8080/ws"
    )


def test_a_unix_socket_listener_is_reached_through_the_pages_own_origin() -> None:
    found = ("unix:/run/chatd/ws.sock", _Port(UNIXAddress("/run/chatd/ws.sock")))
    assert (
        webclient.protocol_url("websocket", found, _request(b"chat.example.org"))
        == "ws://chat.example.org/ws"
    )
    assert (
        webclient.protocol_url(
            "signalr", ("unix:/run/s.sock", None), _request(b"chat.example.org", secure=True)
        )
        == "https://chat.example.org/signalr"
    )


def test_a_protocol_without_a_listener_is_null_and_not_offered() -> None:
    class Services:
        def getServiceNamed(self, name: str) -> Any:
            if name == "ws":
                return type("L", (), {"port": _Port(IPv4Address("TCP", "0.0.0.0", 8080))})()
            raise KeyError(name)

    listeners = webclient.ListenerMap(Services(), {"ws": "tcp:8080"}.get)
    got = webclient.client_config(listeners, _request())
    assert got["websocket"] == "ws://chat.example.org:8080/ws"
    assert got["signalr"] is None
    assert got["protocols"] == ["websocket"]
    csp = webclient.content_security_policy(got)
    assert "connect-src 'self' ws://chat.example.org:8080;" in csp


# -- the page and its headers ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_page_carries_a_strict_policy_that_allows_exactly_the_configured_listeners(chatd) -> None:
    ws, sr, web = chatd.ports["ws"], chatd.ports["signalr"], chatd.ports["web"]

    def scenario() -> None:
        status, headers, body = fetch(web, "/", {"Host": f"127.0.0.1:{web}"})
        assert status == 200
        assert headers["content-type"] == "text/html; charset=utf-8"
        assert b'<script src="app.js" defer></script>' in body
        assert b"<script>" not in body and b" on" + b"click=" not in body  # nothing inline
        policy = dict(
            (part.split(" ", 1) + [""])[:2] for part in headers["content-security-policy"].split("; ")
        )
        assert policy["default-src"] == "'none'"
        assert policy["script-src"] == "'self'"
        assert policy["style-src"] == "'self'"
        assert policy["frame-ancestors"] == "'none'"
        assert policy["connect-src"].split() == [
            "'self'",
            f"ws://127.0.0.1:{ws}",
            f"http://127.0.0.1:{sr}",
            f"ws://127.0.0.1:{sr}",
        ]
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"
        assert headers["referrer-policy"] == "no-referrer"
        assert "strict-transport-security" not in headers  # plain HTTP: no HSTS

        for path, kind in (
            ("/app.js", "text/javascript"),
            ("/style.css", "text/css"),
            ("/favicon.svg", "image/svg"),
        ):
            status, headers, _ = fetch(web, path)
            assert status == 200, path
            assert headers["content-type"].startswith(kind)
            assert headers["x-content-type-options"] == "nosniff"

        assert fetch(web, "/index.html")[2] == body

    await deferToThread(scenario)


@pytest_twisted.ensureDeferred
async def test_only_the_pages_files_are_served(chatd) -> None:
    web = chatd.ports["web"]

    def scenario() -> None:
        for path in (
            "/../setup.cfg",
            "/..%2fsetup.cfg",
            "/chatd/tap.py",
            "/web/",
            "/app.js/x",
            "/.hidden",
            "/nope",
        ):
            assert fetch(web, path)[0] == 404, path

    await deferToThread(scenario)


@pytest_twisted.ensureDeferred
async def test_an_unchanged_file_revalidates_with_304(chatd) -> None:
    web = chatd.ports["web"]

    def scenario() -> None:
        status, headers, _ = fetch(web, "/app.js")
        assert status == 200 and headers["cache-control"] == "no-cache"
        assert fetch(web, "/app.js", {"Host": "x", "If-None-Match": headers["etag"]})[0] == 304
        assert fetch(web, "/app.js", {"Host": "x", "If-None-Match": '"other"'})[0] == 200

    await deferToThread(scenario)


@pytest_twisted.ensureDeferred
async def test_stats_and_health_are_served_same_origin(chatd) -> None:
    web = chatd.ports["web"]

    def scenario() -> tuple[dict, dict]:
        status, headers, body = fetch(web, "/stats")
        assert status == 200 and headers["content-type"] == "application/json"
        status, _, health = fetch(web, "/health")
        assert status == 200
        return json.loads(body), json.loads(health)

    stats, health = await deferToThread(scenario)
    assert stats.keys() == chatd.hub.stats().keys()
    assert health["service"] == "web" and health["status"] == "healthy"


# -- packaging ---------------------------------------------------------------


def test_the_files_ship_in_the_package(tmp_path) -> None:
    """``pip install .`` installs web/ as chatd/web, where the daemon looks first."""
    require(importlib.util.find_spec("setuptools") is not None, "setuptools is not installed")
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("chatd", "twisted", "web"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # build_py is the step that lays out a wheel's files (package_dir, package_data);
    # run alone it needs neither the network nor the wheel package.
    built = tmp_path / "lib"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from setuptools import setup; setup()",
            "-q",
            "build_py",
            "--build-lib",
            str(built),
        ],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("index.html", "app.js", "style.css", "favicon.svg"):
        assert (built / "chatd" / "web" / name).read_bytes() == (ROOT / "web" / name).read_bytes()
    assert (built / "chatd" / "webclient.py").is_file()
    assert webclient.static_dir() == ROOT / "web"


def test_the_page_names_no_host_or_port_of_its_own() -> None:
    """Everything the page connects to comes from /config.json."""
    for name in ("app.js", "index.html"):
        text = (ROOT / "web" / name).read_text()
        for literal in ("localhost", "127.0.0.1", ":8080", ":8081", ":3000", "ws://", "wss://", "http://"):
            assert literal not in text, (name, literal)
