"""The least a Twisted server can do for the kit's chat protocol: a floor to measure chatd against.

Not a chat server: no validation beyond what keeps it running, no ids,
history, presence, limits, TLS, logging or metrics, and no Autobahn. It
accepts with Twisted's reactor, answers the upgrade from a fixed template,
reads the plain frames a load client sends (masked, unfragmented, text,
short), adds a connection to its room on a join and, on a chat message,
builds one frame and ``send``s it straight to every socket of the room (as
``chatd.fastwrite`` does, falling back to Twisted's buffered write only
when the kernel does not take it all). A close frame is answered and the
connection closed.

With ``--presence`` it also does the work chatd's protocol asks of a join
and a close, in the least code: a presence frame to every member of the
room (the joiner too) and a ``joined`` frame to the joiner, and a presence
frame to those left when a member goes. W5 then compares like with like:
the kit's Go peer answers a join with nothing.

What it is for: ``python -m bench W1 W5 --peer floor='python -m bench.floor {PORT}'``
beside ``go-gorilla`` shows how much of the gap between chatd and Go is
CPython and Twisted themselves, per delivery and per connection, measured
in the same run. Whatever chatd costs above this floor is chatd's; what
the floor costs above Go is the interpreter's and the reactor's.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import sys
import time

import orjson
from twisted.internet import protocol, reactor, tcp

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_RESPONSE = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: %s\r\n\r\n"
)
_BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_from_bytes = int.from_bytes


def _frame(payload: bytes, opcode: int = 0x1) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, n) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, n) + payload


class Floor(protocol.Protocol):
    """One connection: the upgrade, then frames."""

    def __init__(self, rooms: dict[str, dict[int, Floor]], presence: bool = False) -> None:
        self.rooms = rooms
        self.presence = presence
        self.user = None
        self.buf = b""
        self.open = False
        self.room: str | None = None

    def connectionMade(self) -> None:  # noqa: N802 (Twisted's name)
        # as chatd and Go do: a small frame after another must not wait for an ACK
        self.transport.setTcpNoDelay(True)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        buf = self.buf + data if self.buf else data
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            key = None
            for line in buf[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"sec-websocket-key":
                    key = value.strip()
            if key is None:
                self.transport.write(_BAD)
                self.transport.loseConnection()
                return
            accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
            self.open = True
            self.send(_RESPONSE % accept)
            buf = buf[end + 4 :]
        while len(buf) >= 6:
            b0, b1 = buf[0], buf[1]
            n = b1 & 0x7F
            at = 2
            if n == 126:
                if len(buf) < 8:
                    break
                n = (buf[2] << 8) | buf[3]
                at = 4
            elif n == 127:
                self.transport.loseConnection()
                return
            if len(buf) < at + 4 + n:
                break
            mask = buf[at : at + 4]
            masked = buf[at + 4 : at + 4 + n]
            buf = buf[at + 4 + n :]
            payload = (_from_bytes(masked, "little") ^ _from_bytes((mask * (n // 4 + 1))[:n], "little")).to_bytes(
                n, "little"
            )
            opcode = b0 & 0x0F
            if opcode == 0x8:
                self.send(_frame(payload[:2], 0x8))
                self.transport.loseConnection()
                return
            if opcode == 0x1:
                self.message(payload)
        self.buf = buf

    def message(self, payload: bytes) -> None:
        try:
            body = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        room = body.get("room")
        if body.get("type") == "join":
            self.leave()
            self.room = room
            members = self.rooms.setdefault(room, {})
            members[id(self)] = self
            if self.presence:
                self.user = body.get("user")
                self.announce("join")
                names = [m.user for m in members.values()]
                self.send(_frame(orjson.dumps({"type": "joined", "room": room, "user": self.user, "members": names})))
        elif "message" in body and room == self.room:
            data = _frame(orjson.dumps({"user": body.get("user"), "room": room, "message": body["message"]}))
            for member in list(self.rooms.get(room, {}).values()):
                member.send(data)

    def send(self, data: bytes) -> None:
        t = self.transport
        if t.dataBuffer or t._tempDataLen or t.disconnecting:
            t.write(data)
            return
        try:
            sent = t.socket.send(data)
        except OSError:
            sent = 0
        if sent < len(data):
            tcp.Server.write(t, data[sent:])

    def announce(self, action: str) -> None:
        """A presence frame shaped like chatd's, to every member of the room."""
        members = self.rooms.get(self.room, {})
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        presence = {"type": "presence", "action": action, "room": self.room, "user": self.user,
                    "timestamp": stamp, "protocol": "websocket", "count": len(members)}  # fmt: skip
        data = _frame(orjson.dumps(presence))
        for member in list(members.values()):
            member.send(data)

    def leave(self) -> None:
        if self.room is not None:
            members = self.rooms.get(self.room)
            if members is not None:
                members.pop(id(self), None)
                if not members:
                    del self.rooms[self.room]
                elif self.presence:
                    self.announce("leave")
            self.room = None

    def connectionLost(self, reason: object = None) -> None:  # noqa: N802 (Twisted's name)
        self.leave()


class FloorFactory(protocol.Factory):
    def __init__(self, presence: bool = False) -> None:
        self.rooms: dict[str, dict[int, Floor]] = {}
        self.presence = presence

    def buildProtocol(self, addr: object) -> Floor:  # noqa: N802 (Twisted's name)
        return Floor(self.rooms, self.presence)


def main(argv: list[str]) -> None:
    """``python -m bench.floor PORT [--presence]``: listen on 127.0.0.1:PORT with a backlog of 4,096 until killed."""
    args = [a for a in argv[1:] if a != "--presence"]
    port = int(args[0]) if args else 9400
    reactor.listenTCP(port, FloorFactory("--presence" in argv), backlog=4096, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main(sys.argv)
