"""The browser client end to end: Debian's Chromium, driven by Playwright.

chatd runs on the test reactor (or as a ``twistd -n chatd`` process for the
restart test); each scenario drives the browser from a worker thread with
Playwright's sync API, so the server keeps serving while the page waits.
Waits are Playwright's ``expect`` polls on what the page shows, bounded.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from chatd import tap
from tests.conftest import require, require_tool
from tests.daemon import TWISTD, free_port
from tests.wsclient import Client

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - the test extra brings it
    sync_playwright = None  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 20_000  # the bound on each wait for the page to show something
NAMES = {"websocket": "WebSocket", "signalr": "SignalR", "grpc": "gRPC"}


@pytest.fixture
def chromium() -> str:
    path = require_tool("chromium")
    require(sync_playwright is not None, "playwright is not installed (pip install '.[test]')")
    return path


def in_browser(chromium: str, scenario: Callable[[Browser], Any]):
    """Run ``scenario(browser)`` in a worker thread; a Deferred of its result."""

    def run() -> Any:
        expect.set_options(timeout=WAIT_MS)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                return scenario(browser)
            finally:
                browser.close()

    return deferToThread(run)


class ChatPage:
    """One browser tab on the chat page, recording console errors and dialogs."""

    def __init__(
        self, browser: Browser, url: str, width: int = 1280, height: int = 800, **options: Any
    ) -> None:
        self.context = browser.new_context(
            viewport={"width": width, "height": height}, locale="en-GB", **options
        )
        self.page: Page = self.context.new_page()
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.on("dialog", self._dialog)
        self.page.goto(url)
        expect(self.page.locator("html")).to_have_attribute("data-ready", "true")

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.errors.append(message.text)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def connect(self, name: str, room: str, protocol: str) -> None:
        """Fill the form with the keyboard alone and submit it with Enter."""
        page = self.page
        page.get_by_label("Protocol").select_option(protocol)
        page.get_by_label("Name").focus()
        page.keyboard.press("Control+A")
        page.keyboard.type(name)
        page.keyboard.press("Tab")
        page.keyboard.press("Control+A")
        page.keyboard.type(room)
        page.keyboard.press("Enter")
        self.expect_online()
        expect(page.locator("#room-title")).to_have_text("#" + room)
        expect(page.locator("#members li", has_text=name)).to_have_count(1)

    def expect_online(self, timeout: float = WAIT_MS) -> None:
        expect(self.page.locator("#status")).to_have_attribute("data-state", "online", timeout=timeout)

    def send(self, text: str) -> None:
        """Type into the message box and press Enter (the box keeps focus after connecting)."""
        box = self.page.get_by_label("Message", exact=True)
        expect(box).to_be_enabled()
        box.fill(text)
        box.press("Enter")
        expect(box).to_have_value("")

    def message(self, text: str) -> Any:
        """The (one) shown message whose text is exactly ``text``."""
        return self.page.locator(".msg").filter(has=self.page.locator(".text", has_text=text))

    def expect_message(self, text: str, user: str, protocol: str) -> None:
        shown = self.message(text)
        expect(shown).to_have_count(1)
        expect(shown.locator(".text")).to_have_text(text)
        expect(shown.locator(".user")).to_have_text(user)
        expect(shown.locator(".proto")).to_have_text(NAMES[protocol])
        expect(shown.locator("time")).to_have_attribute("datetime", _ISO_UTC)

    def members(self) -> Any:
        return self.page.locator("#members li")

    def join_room(self, room: str) -> None:
        box = self.page.get_by_label("Join another room")
        box.fill(room)
        box.press("Enter")
        expect(self.page.locator("#room-title")).to_have_text("#" + room)

    def room_button(self, room: str) -> Any:
        return self.page.locator("#room-list button", has_text="#" + room)

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        self.page.screenshot(path=str(path))
        return path


_ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def assert_no_console_errors(*pages: ChatPage) -> None:
    for page in pages:
        assert page.errors == [], page.errors
        assert page.dialogs == [], page.dialogs


def web_url(running: Any) -> str:
    return running.url("web", path="/")


# -- chat over both browser protocols ---------------------------------------


@pytest_twisted.ensureDeferred
async def test_websocket_and_signalr_pages_chat_both_ways(chatd, chromium) -> None:
    def scenario(browser: Browser) -> None:
        # Something said before anyone opened the page: it is history.
        with Client(chatd.ws_url) as early:
            early.join("lobby", "carol")
            early.send(type="message", room="lobby", message="Welcome to the lobby!", ref=1)
            early.recv_type("sent")

        alice = ChatPage(browser, web_url(chatd))
        alice.connect("alice", "lobby", "websocket")
        alice.expect_message("Welcome to the lobby!", "carol", "websocket")

        bob = ChatPage(browser, web_url(chatd))
        bob.connect("bob", "lobby", "signalr")
        bob.expect_message("Welcome to the lobby!", "carol", "websocket")
        expect(alice.members()).to_have_text(["alice(you)", "bob"])
        expect(bob.members()).to_have_text(["alice", "bob(you)"])
        expect(alice.page.locator(".event", has_text="bob joined")).to_have_count(1)

        alice.send("Hi Bob, this came over a plain WebSocket.")
        bob.expect_message("Hi Bob, this came over a plain WebSocket.", "alice", "websocket")
        alice.expect_message("Hi Bob, this came over a plain WebSocket.", "alice", "websocket")

        bob.send("Hello Alice! Mine went through SignalR.")
        alice.expect_message("Hello Alice! Mine went through SignalR.", "bob", "signalr")
        bob.expect_message("Hello Alice! Mine went through SignalR.", "bob", "signalr")

        # Each page shows every message once, in the room's order.
        order = [
            "Welcome to the lobby!",
            "Hi Bob, this came over a plain WebSocket.",
            "Hello Alice! Mine went through SignalR.",
        ]
        expect(alice.page.locator(".msg .text")).to_have_text(order)
        expect(bob.page.locator(".msg .text")).to_have_text(order)
        expect(alice.page.locator("#status-text")).to_have_text("Connected · WebSocket")
        expect(bob.page.locator("#status-text")).to_have_text("Connected · SignalR")
        alice.screenshot("browser-chat.png")
        assert_no_console_errors(alice, bob)

    await in_browser(chromium, scenario)


@pytest_twisted.ensureDeferred
async def test_grpc_send_message_shows_on_both_pages(chatd, chromium) -> None:
    # require(), not pytest.importorskip: with CHATD_REQUIRE_ALL=1 a missing piece fails CI.
    try:
        import grpc

        from chatd.grpc.generated import chat_pb2 as pb
        from chatd.grpc.generated import chat_pb2_grpc as pb_grpc
    except ImportError as e:
        require(False, f"the gRPC client cannot be imported: {e}")
        raise  # not reached: require() skips, or fails under CHATD_REQUIRE_ALL
    require("grpc" in chatd.ports, "this chatd has no gRPC listener")
    target = f"127.0.0.1:{chatd.ports['grpc']}"

    def grpc_send(user: str, text: str, room: str) -> None:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.ChatServiceStub(channel)
            stub.SendMessage(pb.MessageRequest(user=user, message=text, room=room), timeout=10)

    def scenario(browser: Browser) -> None:
        with Client(chatd.ws_url) as carol:
            carol.join("lobby", "carol")
            carol.send(type="message", room="lobby", message="Morning all! Stand-up in five minutes.", ref=1)
            carol.recv_type("sent")
            alice = ChatPage(browser, web_url(chatd))
            alice.connect("alice", "lobby", "websocket")
            alice.join_room("deploys")
            alice.room_button("lobby").click()
            bob = ChatPage(browser, web_url(chatd))
            bob.connect("bob", "lobby", "signalr")
            bob.send("On my way, joining from the SignalR side.")
            alice.expect_message("On my way, joining from the SignalR side.", "bob", "signalr")

            grpc_send("deploybot", "Build 1.4.2 is live on staging.", "lobby")
            for page in (alice, bob):
                page.expect_message("Build 1.4.2 is live on staging.", "deploybot", "grpc")
            # A room that is not on screen counts what it missed.
            grpc_send("deploybot", "Rolling out 1.4.2 to production (3 of 12 hosts done).", "deploys")
            expect(alice.room_button("deploys").locator(".badge")).to_have_text("1")
            alice.send("Great, see you there.")
            bob.expect_message("Great, see you there.", "alice", "websocket")
            expect(alice.members()).to_have_text(["alice(you)", "bob", "carol"])
            expect(alice.page.locator('#stats [data-stat="messages.total"]')).to_have_text("5")
            alice.screenshot("browser-three-protocols.png")
            alice.room_button("deploys").click()
            alice.expect_message("Rolling out 1.4.2 to production (3 of 12 hosts done).", "deploybot", "grpc")
            assert_no_console_errors(alice, bob)

    await in_browser(chromium, scenario)


@pytest_twisted.ensureDeferred
async def test_over_tls_the_page_uses_wss_and_https_everywhere(start, chromium, tmp_path) -> None:
    from tests.tlscert import make_certificate

    key, cert = make_certificate(tmp_path)
    running = await start(
        *[
            arg
            for name in tap.LISTENERS
            for arg in (f"--{name}", f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}")
        ]
    )
    url = f"https://127.0.0.1:{running.ports['web']}/"

    def scenario(browser: Browser) -> None:
        # The certificate is self-signed: the browser is told to accept it, nothing else changes.
        alice = ChatPage(browser, url, ignore_https_errors=True)
        config = alice.page.evaluate("fetch('config.json').then(r => r.json())")
        assert config["websocket"] == f"wss://127.0.0.1:{running.ports['ws']}/ws"
        assert config["signalr"] == f"https://127.0.0.1:{running.ports['signalr']}/signalr"
        alice.connect("alice", "secure", "websocket")
        bob = ChatPage(browser, url, ignore_https_errors=True)
        bob.connect("bob", "secure", "signalr")
        alice.send("sealed")
        bob.expect_message("sealed", "alice", "websocket")
        bob.send("delivered")
        alice.expect_message("delivered", "bob", "signalr")
        assert_no_console_errors(alice, bob)

    await in_browser(chromium, scenario)


# -- safety and layout -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_markup_in_a_message_is_shown_as_text_and_runs_nothing(chatd, chromium) -> None:
    payloads = [
        "<img src=x onerror=alert(1)>",
        "<script>window.pwned = 1</script>",
        '<a href="javascript:alert(2)">click</a> & <b>bold</b>',
    ]

    def scenario(browser: Browser) -> None:
        alice = ChatPage(browser, web_url(chatd))
        alice.connect("alice", "lobby", "websocket")
        bob = ChatPage(browser, web_url(chatd))
        bob.connect("bob", "lobby", "signalr")
        for i, text in enumerate(payloads):
            sender = alice if i % 2 == 0 else bob
            sender.send(text)
            for page in (alice, bob):
                expect(page.message(text).locator(".text")).to_have_text(text)
        for page in (alice, bob):
            messages = page.page.locator("#messages")
            expect(messages.locator("img, script, a, b")).to_have_count(0)
            assert page.page.evaluate("window.pwned") is None
        # The page's own policy forbids inline script even if something slipped through.
        csp = alice.page.evaluate("fetch('/').then(r => r.headers.get('content-security-policy'))")
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert_no_console_errors(alice, bob)

    await in_browser(chromium, scenario)


@pytest_twisted.ensureDeferred
async def test_a_phone_width_page_wraps_long_messages_without_sideways_scrolling(chatd, chromium) -> None:
    unbroken = "x" * 600
    long_words = " ".join(["supercalifragilistic"] * 40)

    def scenario(browser: Browser) -> None:
        phone = ChatPage(browser, web_url(chatd), width=390, height=844)
        phone.connect("pat", "lobby", "signalr")
        phone.send(unbroken)
        phone.send(long_words)
        for text in (unbroken, long_words):
            expect(phone.message(text).locator(".text")).to_have_text(text)
        width = phone.page.evaluate("document.documentElement.clientWidth")
        assert phone.page.evaluate("document.documentElement.scrollWidth") <= width
        for text in (unbroken, long_words):
            box = phone.message(text).bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width
            assert box["height"] > 100  # wrapped onto many lines
        for label in ("Name", "Room", "Protocol", "Message", "Join another room"):
            expect(phone.page.get_by_label(label, exact=True)).to_have_count(1)
        phone.page.evaluate("window.scrollTo(0, 0)")
        phone.screenshot("browser-phone.png")
        assert_no_console_errors(phone)

    await in_browser(chromium, scenario)


@pytest_twisted.ensureDeferred
async def test_a_refused_name_is_explained_and_not_retried(chatd, chromium) -> None:
    def scenario(browser: Browser) -> None:
        for protocol in ("websocket", "signalr"):
            page = ChatPage(browser, web_url(chatd))
            page.page.get_by_label("Protocol").select_option(protocol)
            page.page.get_by_label("Name").fill("<b>no</b>")
            page.page.get_by_label("Name").press("Enter")
            expect(page.page.locator("#notice")).to_contain_text("invalid user name")
            expect(page.page.locator("#status")).to_have_attribute("data-state", "error")
            expect(page.page.get_by_role("button", name="Connect")).to_be_enabled()
            expect(page.page.get_by_label("Name")).to_be_editable()
            expect(page.page.get_by_role("button", name="Retry now")).to_be_hidden()
            assert_no_console_errors(page)

    await in_browser(chromium, scenario)


# -- rooms and presence ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_rooms_switch_and_presence_follows_a_page_that_leaves(chatd, chromium) -> None:
    def scenario(browser: Browser) -> None:
        alice = ChatPage(browser, web_url(chatd))
        alice.connect("alice", "lobby", "websocket")
        bob = ChatPage(browser, web_url(chatd))
        bob.connect("bob", "lobby", "signalr")
        expect(alice.members()).to_have_text(["alice(you)", "bob"])

        # A second room for each; a message in a room not on screen shows as unread.
        alice.join_room("random")
        bob.join_room("random")
        expect(alice.members()).to_have_text(["alice(you)", "bob"])
        bob.room_button("lobby").click()
        bob.send("back in the lobby")
        expect(alice.room_button("lobby").locator(".badge")).to_have_text("1")
        alice.room_button("lobby").click()
        alice.expect_message("back in the lobby", "bob", "signalr")
        expect(alice.room_button("lobby").locator(".badge")).to_have_count(0)

        # Leaving one room: only that room's members change.
        bob.room_button("random").click()
        bob.page.get_by_role("button", name="Leave room").click()
        expect(bob.page.locator("#room-list button")).to_have_text(["#lobby"])
        alice.room_button("random").click()
        expect(alice.members()).to_have_text(["alice(you)"])
        alice.room_button("lobby").click()
        expect(alice.members()).to_have_text(["alice(you)", "bob"])

        # Disconnecting (keyboard: focus the button, press Enter) leaves every room.
        bob.page.get_by_role("button", name="Disconnect").focus()
        bob.page.keyboard.press("Enter")
        expect(bob.page.locator("#status")).to_have_attribute("data-state", "offline")
        expect(alice.members()).to_have_text(["alice(you)"])
        expect(alice.page.locator(".event", has_text="bob left")).to_have_count(1)

        # Closing a tab does the same.
        carol = ChatPage(browser, web_url(chatd))
        carol.connect("carol", "lobby", "websocket")
        expect(alice.members()).to_have_text(["alice(you)", "carol"])
        carol.context.close()
        expect(alice.members()).to_have_text(["alice(you)"])
        assert_no_console_errors(alice, bob)

    await in_browser(chromium, scenario)


@pytest_twisted.ensureDeferred
async def test_a_full_server_is_retried_with_backoff_until_there_is_room(start, chromium) -> None:
    running = await start("--max-connections", "1")

    def scenario(browser: Browser) -> None:
        alice = ChatPage(browser, web_url(running))
        alice.connect("alice", "lobby", "websocket")
        bob = ChatPage(browser, web_url(running))
        bob.page.get_by_label("Name").fill("bob")
        bob.page.get_by_label("Name").press("Enter")
        expect(bob.page.locator("#status")).to_have_attribute("data-state", "reconnecting")
        expect(bob.page.get_by_role("button", name="Retry now")).to_be_visible()
        expect(bob.page.get_by_label("Message", exact=True)).to_be_disabled()
        alice.page.get_by_role("button", name="Disconnect").click()
        bob.expect_online(timeout=60_000)
        expect(bob.members()).to_have_text(["bob(you)"])
        assert_no_console_errors(alice, bob)

    await in_browser(chromium, scenario)


# -- the daemon restarts ----------------------------------------------------


class RestartableDaemon:
    """``twistd -n chatd`` on fixed free ports, so a restart comes back at the same address."""

    def __init__(self) -> None:
        self.ports = {name: free_port() for name in tap.LISTENERS}
        self.argv = [str(TWISTD), "--nodaemon", "--pidfile=", "chatd"]
        for name, port in self.ports.items():
            self.argv += [f"--{name}", f"tcp:{port}:interface=127.0.0.1"]
        if any(o[0] == "grpc" for o in tap.Options.optParameters):
            self.argv += ["--grpc", f"127.0.0.1:{free_port()}"]
        # Its own history, kept across its restarts (as a real deployment's is), never ./data.
        self._data = tempfile.TemporaryDirectory(prefix="chatd-data-")
        self.argv += ["--data-dir", self._data.name]
        self.env = {k: v for k, v in os.environ.items() if not k.endswith("_PORT") and k != "MANHOLE"}
        self.env["PYTHONPATH"] = str(ROOT)
        self.proc: subprocess.Popen | None = None
        self.log = ""

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv,
            cwd=str(ROOT),
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self.log += out or ""
        self.proc = None

    def url(self, name: str, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.ports[name]}{path}"


def _network_noise(text: str) -> bool:
    """What Chromium logs by itself while the server is down (not the page's doing)."""
    return "ERR_CONNECTION_REFUSED" in text or (
        text.startswith("WebSocket connection to") and "failed" in text
    )


@pytest_twisted.ensureDeferred
async def test_the_page_reconnects_by_itself_after_the_daemon_restarts(chromium) -> None:
    daemon = RestartableDaemon()

    def wait_listening() -> None:
        """Poll the web listener's /health (a real request each time), bounded."""
        for _ in range(300):
            try:
                urllib.request.urlopen(daemon.url("web", "/health"), timeout=2).close()
                return
            except OSError:
                assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log
                time.sleep(0.1)
        raise AssertionError("chatd did not start")

    def scenario(browser: Browser) -> None:
        daemon.start()
        wait_listening()
        alice = ChatPage(browser, daemon.url("web"))
        alice.connect("alice", "lobby", "websocket")
        bob = ChatPage(browser, daemon.url("web"))
        bob.connect("bob", "lobby", "signalr")

        daemon.stop()
        for page in (alice, bob):
            expect(page.page.locator("#status")).to_have_attribute("data-state", "reconnecting")
            expect(page.page.get_by_label("Message", exact=True)).to_be_disabled()

        daemon.start()
        wait_listening()
        for page in (alice, bob):
            # The backoff may have grown to 30 s while the daemon was down.
            page.expect_online(timeout=60_000)
            expect(page.members()).to_have_count(2)
        alice.send("still here after the restart")
        bob.expect_message("still here after the restart", "alice", "websocket")
        bob.send("me too")
        alice.expect_message("me too", "bob", "signalr")
        for page in (alice, bob):
            unexpected = [e for e in page.errors if not _network_noise(e)]
            assert unexpected == [], unexpected
            assert page.dialogs == []

    try:
        await in_browser(chromium, scenario)
    finally:
        await deferToThread(daemon.stop)
