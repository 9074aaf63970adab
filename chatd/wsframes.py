"""Read the plain case of inbound WebSocket frames without Autobahn's per-frame machinery.

A chat client sends small, whole, masked, unfragmented text frames, and a
read from the socket usually holds one or a few of them whole. Autobahn
reads every frame through a general state machine: the frame header
checked field by field, a CFFI XOR masker object created per frame, an
incremental UTF-8 validator reset and fed per frame, eight nested
callbacks (``onFrameBegin`` ... ``onMessageEnd``), traffic counters nobody
here reads and an observable ``message`` event fired through a Deferred.
Profiled in the chat workload (W2, 5,000 messages a second into one
process), that was about a fifth of the server's CPU, the CFFI masker's
construction alone 7 %.

:class:`FastReceive` takes, at the start of a read, every frame that is
whole in it and plain: FIN set, no RSV bits, text or binary, masked, a
payload of at most 65,535 bytes (the 7- or 16-bit length forms) and within
``maxFramePayloadSize`` and ``maxMessagePayloadSize``, text that is valid
UTF-8. It unmasks with one big-integer XOR (in C) and hands the payload to
``onMessage`` as Autobahn would. A close frame that ends the read (how
every client says goodbye) is unmasked the same way and handed to
Autobahn's ``onCloseFrame``, which answers it. The first frame that is
anything else (a ping, a fragment, a frame cut by the read, an oversized
or invalid one) and everything after it in the read go to Autobahn's own
parser, so every protocol error, close code (1002, 1007,
1009) and control frame is handled exactly as before. Nothing is taken
while the connection is not open, Autobahn holds buffered bytes, a
fragmented message is in progress, compression is on, or frame logging or
timing is on.
"""

from __future__ import annotations

from autobahn.websocket.protocol import WebSocketProtocol

__all__ = ["FastReceive", "unmask"]

_OPEN = WebSocketProtocol.STATE_OPEN
_from_bytes = int.from_bytes


def unmask(payload: bytes, mask: bytes) -> bytes:
    """``payload`` XORed with the 4-byte ``mask`` repeated (RFC 6455 section 5.3)."""
    n = len(payload)
    if n == 0:
        return b""
    key = (mask * ((n >> 2) + 1))[:n]
    return (_from_bytes(payload, "little") ^ _from_bytes(key, "little")).to_bytes(n, "little")


class FastReceive:
    """Mixin for an Autobahn server protocol: plain data frames read here (see the module docstring).

    Must come before Autobahn's protocol class in the bases.
    """

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        if (
            self.state != _OPEN
            or self.data
            or self.current_frame is not None
            or self.inside_message
            or self._perMessageCompress is not None
            or self.logOctets
            or self.logFrames
            or self.trackedTimings
        ):
            self._dataReceived(data)
            return
        end = len(data)
        pos = 0
        limit = self.maxFramePayloadSize
        message_limit = self.maxMessagePayloadSize
        if 0 < message_limit and (limit <= 0 or message_limit < limit):
            limit = message_limit
        while pos < end and self.state == _OPEN:
            if end - pos < 6:
                break
            b0 = data[pos]
            if b0 != 0x81 and b0 != 0x82:  # FIN, no RSV, text or binary; anything else is Autobahn's
                if b0 == 0x88 and self._close_frame(data, pos):  # but for the usual close frame
                    return
                break
            b1 = data[pos + 1]
            if not b1 & 0x80:  # unmasked: a protocol error Autobahn reports
                break
            length = b1 & 0x7F
            start = pos + 2
            if length == 126:
                if end - pos < 8:
                    break
                length = (data[start] << 8) | data[start + 1]
                if length < 126:  # not the minimal encoding: Autobahn's error
                    break
                start += 2
            elif length == 127:
                break
            if 0 < limit < length:  # too big: Autobahn closes with 1009
                break
            stop = start + 4 + length
            if stop > end:  # cut by this read: Autobahn buffers it
                break
            payload = unmask(data[start + 4 : stop], data[start : start + 4])
            binary = b0 == 0x82
            if not binary and not payload.isascii():
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError:  # Autobahn closes with 1007
                    break
            pos = stop
            if self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
                self._cancelAutoPingTimeoutCall()
            self.onMessage(payload, binary)
        if pos < end:
            self._dataReceived(data[pos:] if pos else data)

    def _close_frame(self, data: bytes, pos: int) -> bool:
        """A whole, masked close frame that ends the read, handed to ``onCloseFrame``; False if not that.

        What Autobahn's parser checks first (masked, a payload of 0 or 2 to
        125 bytes) is checked here; what it then does is call
        ``onCloseFrame(code, reason)`` with the unmasked payload split in
        two, which checks the code and the reason's UTF-8 and answers, and
        that is called here the same way. A close frame with anything after
        it in the read, or any other shape, is left to Autobahn.
        """
        b1 = data[pos + 1]
        length = b1 & 0x7F
        if not b1 & 0x80 or length == 1 or length > 125 or pos + 6 + length != len(data):
            return False
        payload = unmask(data[pos + 6 :], data[pos + 2 : pos + 6])
        code = (payload[0] << 8 | payload[1]) if length else None
        self.onCloseFrame(code, payload[2:] if length > 2 else None)
        return True
