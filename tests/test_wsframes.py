"""Inbound WebSocket frames read the short way (chatd.wsframes) answer exactly as Autobahn's parser did."""

from __future__ import annotations

import json
import os

import pytest
import pytest_twisted
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.xormasker import create_xor_masker
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.threads import deferToThread

from chatd.wsframes import unmask
from tests.test_websocket import _RawWebSocket

MASK = b"\x37\xfa\x21\x3d"


def client_frame(
    payload: bytes, opcode: int = 0x1, fin: bool = True, masked: bool = True, long_form: bool = False
) -> bytes:
    """One client frame as RFC 6455 lays it out (``long_form``: a 16-bit length even if it fits in 7 bits)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    bit = 0x80 if masked else 0
    n = len(payload)
    if n < 126 and not long_form:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    return head + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))


def request(**body) -> bytes:
    return client_frame(json.dumps(body).encode())


def read_until_close(ws: _RawWebSocket) -> tuple[list[dict], int]:
    """Every JSON reply until the server's close frame, and the close code."""
    replies = []
    while True:
        opcode, payload = ws.read_frame()
        if opcode == 0x8:
            return replies, int.from_bytes(payload[:2], "big")
        if opcode == 0x1:
            replies.append(json.loads(payload))


@given(st.binary(max_size=300), st.binary(min_size=4, max_size=4))
def test_unmask_is_the_rfc_xor_and_agrees_with_autobahn(payload: bytes, mask: bytes) -> None:
    expected = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert unmask(payload, mask) == expected
    if payload:
        assert create_xor_masker(mask, len(payload)).process(payload) == expected


@pytest.fixture
def parsed_by_autobahn(monkeypatch) -> list[int]:
    """How many times Autobahn's own frame parser ran (it runs in this process)."""
    calls: list[int] = []
    original = WebSocketProtocol.processData

    def counted(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(WebSocketProtocol, "processData", counted)
    return calls


@pytest_twisted.ensureDeferred
async def test_whole_plain_frames_skip_autobahns_parser_and_keep_their_order(chatd, parsed_by_autobahn) -> None:
    def scenario():
        ws = _RawWebSocket(chatd.ports["ws"])
        try:
            # three requests in one write: small, a 16-bit length, and one with UTF-8 text
            ws.sock.sendall(
                request(type="join", room="fast", user="ann", ref=1)
                + request(type="message", room="fast", message="y" * 300, ref=2)
                + request(type="message", room="fast", message="grüße ✓", ref=3)
            )
            replies = [json.loads(ws.read_frame()[1])]
            while replies[-1].get("ref") != 3:
                replies.append(json.loads(ws.read_frame()[1]))
            assert [r.get("ref") for r in replies if r["type"] in ("joined", "sent")] == [1, 2, 3]
            assert [r["message"] for r in replies if r["type"] == "message"] == ["y" * 300, "grüße ✓"]
        finally:
            ws.close()

    await deferToThread(scenario)
    assert parsed_by_autobahn == []


@pytest_twisted.ensureDeferred
async def test_control_frames_and_cut_frames_in_a_read_go_to_autobahn_in_order(chatd, parsed_by_autobahn) -> None:
    def scenario():
        ws = _RawWebSocket(chatd.ports["ws"])
        try:
            last = request(type="ping", ref=6)
            ws.sock.sendall(
                request(type="ping", ref=1)
                + request(type="ping", ref=2)
                + client_frame(b"hello", opcode=0x9)  # a WebSocket ping: Autobahn answers with a pong
                + request(type="ping", ref=4)
                + request(type="ping", ref=5, pad="z" * 200)  # a 16-bit length
                + last[:5]
            )
            got = [ws.read_frame() for _ in range(5)]
            ws.sock.sendall(last[5:])
            got.append(ws.read_frame())
            assert got[2] == (0xA, b"hello")
            assert [json.loads(p)["ref"] for op, p in got if op == 0x1] == [1, 2, 4, 5, 6]
        finally:
            ws.close()

    await deferToThread(scenario)
    assert parsed_by_autobahn, "the control frame and the cut frame were Autobahn's"


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (client_frame(b'{"type": "ping", "x": "\xff\xfe"}'), 1007),  # invalid UTF-8 in a text frame
        (client_frame(b'{"type": "ping"}', masked=False), 1002),  # client frames must be masked
        (client_frame(b'{"type": "ping"}', long_form=True)[:2] + b"\x00\x10" + MASK + b"x" * 16, 1002),
        (client_frame(b'{"type": "ping"}', fin=False, opcode=0x0), 1002),  # continuation with nothing to continue
        (client_frame(b'{"type": "ping"}', opcode=0x3), 1002),  # reserved opcode
        (bytes([0xC1, 0x80]) + MASK, 1002),  # RSV1 without an extension
        (client_frame(b"x" * 70000, opcode=0x2), 1009),  # over the read limit (64-bit length form)
        (client_frame(json.dumps({"type": "ping", "pad": "x" * 2000}).encode()), 1009),
    ],
    ids=["utf8", "unmasked", "non-minimal-length", "stray-continuation", "reserved-opcode", "rsv", "huge", "too-big"],
)
@pytest_twisted.ensureDeferred
async def test_a_bad_frame_after_good_ones_is_refused_as_before(start, bad: bytes, code: int) -> None:
    running = await start("--read-buffer-size", "1024")

    def scenario():
        ws = _RawWebSocket(running.ports["ws"])
        try:
            ws.sock.sendall(request(type="ping", ref=1) + request(type="ping", ref=2) + bad)
            replies, closed = read_until_close(ws)
            assert [r.get("ref") for r in replies] == [1, 2]
            assert closed == code
        finally:
            ws.close()

    await deferToThread(scenario)


@pytest_twisted.ensureDeferred
async def test_many_frames_in_random_cuts_arrive_whole_and_in_order(chatd) -> None:
    """A stream of frames of every size, written in random slices, is answered frame by frame in order."""
    import random

    rng = random.Random(os.getpid())
    bodies = [{"type": "ping", "ref": i, "pad": "é" * rng.randrange(0, 400)} for i in range(300)]
    stream = b"".join(client_frame(json.dumps(b, ensure_ascii=False).encode()) for b in bodies)

    def scenario():
        ws = _RawWebSocket(chatd.ports["ws"])
        try:
            pos = 0
            while pos < len(stream):
                step = rng.choice([1, 7, 100, 1000, 5000])
                ws.sock.sendall(stream[pos : pos + step])
                pos += step
            refs = [json.loads(ws.read_frame()[1])["ref"] for _ in bodies]
            assert refs == list(range(300))
        finally:
            ws.close()

    await deferToThread(scenario)


def _close_answer(port: int, close: bytes, after_a_ping: bool) -> tuple[int, bytes, bool]:
    """The server's answer to ``close`` (opcode, payload), and whether it then closed the TCP connection."""
    ws = _RawWebSocket(port)
    try:
        ws.send_json({"type": "ping", "ref": 1})
        assert json.loads(ws.read_frame()[1])["ref"] == 1  # the read below holds only what follows
        if after_a_ping:  # a WebSocket ping first: the whole read is Autobahn's parser's
            ws.sock.sendall(client_frame(b"p", opcode=0x9) + close)
            assert ws.read_frame() == (0xA, b"p")
        else:
            ws.sock.sendall(close)
        answer = ws.read_frame()
        try:
            ws._take(1)
            ended = False
        except (EOFError, ConnectionResetError):
            ended = True
        return (*answer, ended)
    finally:
        ws.close()


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        (1000).to_bytes(2, "big"),
        (1000).to_bytes(2, "big") + "goodbye ✓".encode(),
        (1001).to_bytes(2, "big") + b"going",
        (4321).to_bytes(2, "big"),
        (999).to_bytes(2, "big"),  # not a code a peer may send: 1002
        (1005).to_bytes(2, "big"),  # reserved: 1002
        (1000).to_bytes(2, "big") + b"\xff\xfe",  # a reason that is not UTF-8: 1007
        b"\x03",  # one byte: 1002 (Autobahn's parser, on either path)
    ],
    ids=["empty", "1000", "reason", "1001", "4321", "999", "1005", "bad-utf8", "one-byte"],
)
@pytest_twisted.ensureDeferred
async def test_a_close_frame_read_the_short_way_is_answered_as_autobahns_parser_answers_it(
    chatd, parsed_by_autobahn, payload: bytes
) -> None:
    port = chatd.ports["ws"]
    short = await deferToThread(_close_answer, port, client_frame(payload, opcode=0x8), False)
    took_short = not parsed_by_autobahn
    long = await deferToThread(_close_answer, port, client_frame(payload, opcode=0x8), True)
    assert short == long
    assert short[0] == 0x8 and short[2], "a close frame, then the server ends the TCP connection"
    assert took_short == (len(payload) != 1)


@pytest_twisted.ensureDeferred
async def test_a_close_frame_with_bytes_after_it_in_the_read_is_autobahns(chatd, parsed_by_autobahn) -> None:
    close = client_frame((1000).to_bytes(2, "big"), opcode=0x8)
    answer = await deferToThread(_close_answer, chatd.ports["ws"], close + request(type="ping", ref=9), False)
    assert answer == (0x8, (1000).to_bytes(2, "big"), True)
    assert parsed_by_autobahn
