"""WebSocket keep-alive pings (``--ws-keep-alive``): only silent clients are pinged, and never all at once."""

from __future__ import annotations

import gc
import threading
import time

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread

from chatd import websocket
from chatd.events import Message
from tests.test_websocket import _RawWebSocket
from tests.test_wsframes import client_frame

PING, PONG, CLOSE, TEXT = 0x9, 0xA, 0x8, 0x1


def _frames_for(ws: _RawWebSocket, seconds: float, *, chat_every: float = 0, answer: bool = True) -> list[int]:
    """The opcodes of every frame the server sends in ``seconds`` (EOF ends it early).

    ``chat_every``: the client sends an application-level ping that often;
    ``answer``: pongs answer the server's pings.
    """
    seen: list[int] = []
    deadline = time.monotonic() + seconds
    next_chat = time.monotonic()
    while time.monotonic() < deadline:
        if chat_every and time.monotonic() >= next_chat:
            ws.send_json({"type": "ping"})
            next_chat += chat_every
        ws.sock.settimeout(0.05)
        try:
            opcode, payload = ws.read_frame()
        except TimeoutError:
            continue
        except (EOFError, ConnectionResetError):
            seen.append(-1)  # the server closed the TCP connection
            return seen
        finally:
            ws.sock.settimeout(10)
        seen.append(opcode)
        if opcode == PING and answer:
            ws.sock.sendall(client_frame(payload, opcode=PONG))
    return seen


@pytest_twisted.ensureDeferred
async def test_a_chatting_client_is_never_pinged_and_a_silent_one_is(start) -> None:
    running = await start("--ws-keep-alive", "1")
    port = running.ports["ws"]

    def scenario() -> tuple[list[int], list[int]]:
        chatty, silent = _RawWebSocket(port), _RawWebSocket(port)
        try:
            # 4.5 s: the silent client's first ping is due within 1-2 s (whole-second timer buckets).
            frames = {}

            def watch(name, ws, every):
                frames[name] = _frames_for(ws, 4.5, chat_every=every)

            t = threading.Thread(target=watch, args=("silent", silent, 0))
            t.start()
            watch("chatty", chatty, 0.3)
            t.join()
            return frames["chatty"], frames["silent"]
        finally:
            chatty.close()
            silent.close()

    chatty, silent = await deferToThread(scenario)
    assert PING in silent, silent
    assert -1 not in silent, "a client answering its pings was closed"
    assert PING not in chatty, chatty
    assert chatty.count(TEXT) >= 10  # its pongs (application level) came back: it was served all along


@pytest_twisted.ensureDeferred
async def test_a_client_that_does_not_answer_its_ping_is_dropped(start) -> None:
    running = await start("--ws-keep-alive", "1")

    def scenario() -> list[int]:
        ws = _RawWebSocket(running.ports["ws"])
        try:
            return _frames_for(ws, 8, answer=False)
        finally:
            ws.close()

    frames = await deferToThread(scenario)
    assert PING in frames
    assert frames[-1] == -1 or frames[-1] == CLOSE, frames


@pytest_twisted.ensureDeferred
async def test_zero_turns_the_pings_off(start) -> None:
    running = await start("--ws-keep-alive", "0")

    def scenario() -> list[int]:
        ws = _RawWebSocket(running.ports["ws"])
        try:
            return _frames_for(ws, 3, answer=False)
        finally:
            ws.close()

    assert await deferToThread(scenario) == []


@pytest_twisted.ensureDeferred
async def test_a_bucket_of_timer_calls_is_spread_over_several_reactor_turns(chatd) -> None:
    """A second's worth of pings runs ``KEEP_ALIVE_CHUNK`` per turn, not all in one."""
    factory = websocket.ChatWebSocketFactory(chatd.hub)
    calls = 3 * websocket.KEEP_ALIVE_CHUNK + 1
    turns: list[int] = []
    turn = [0]

    def tick() -> None:
        turn[0] += 1
        if len(turns) < calls:
            reactor.callLater(0, tick)

    done = defer.Deferred()

    def called() -> None:
        turns.append(turn[0])
        if len(turns) == calls:
            done.callback(None)

    for _ in range(calls):
        factory._batched_timer.call_later(0.5, called)
    reactor.callLater(0, tick)
    await done
    per_turn = {t: turns.count(t) for t in set(turns)}
    assert max(per_turn.values()) <= websocket.KEEP_ALIVE_CHUNK
    assert len(per_turn) >= 4


def test_kept_messages_are_outside_the_cyclic_collector(chatd) -> None:
    """What a room's window keeps is never walked by a collection (see ``chatd.events.Message``)."""
    message = Message("id", 1, "room", "user", "text", 1.0, "websocket")
    assert not gc.is_tracked(message)
    message.encoded("json", lambda m: b"frame")
    message.client_id = "c1"
    assert not gc.is_tracked(message)
