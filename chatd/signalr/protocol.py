"""The SignalR hub protocols as a sans-IO codec: bytes in, messages out.

Nothing here knows of sockets, HTTP or time. A transport hands whatever
bytes arrived (part of a record, one record, several) to :meth:`Codec.feed`
and gets back the complete messages; :meth:`Codec.encode` turns a message
into the bytes of one record. The connection core (``connection.py``) and
the transports (``transports.py``) sit on top, as Autobahn's Twisted adapter
sits on its protocol core.

A message is a plain ``dict`` in the JSON protocol's shape whatever the wire
format (``{"type": 1, "target": "SendMessage", "arguments": [...]}``), so the
rest of the package never cares which hub protocol a client chose.

Framing (dotnet/aspnetcore ``src/SignalR/docs/specs/HubProtocol.md``):

- the handshake request is always JSON ended by ``0x1E``;
- ``json``: UTF-8 JSON records, each ended by ``0x1E``;
- ``messagepack``: records prefixed by their length as a VarInt (7 bits a
  byte, low group first, high bit = more), each one MessagePack array.
"""

from __future__ import annotations

from typing import Any

import msgpack
import orjson

RECORD_SEPARATOR = b"\x1e"

INVOCATION = 1
STREAM_ITEM = 2
COMPLETION = 3
STREAM_INVOCATION = 4
CANCEL_INVOCATION = 5
PING = 6
CLOSE = 7
ACK = 8
SEQUENCE = 9

#: Messages that count for stateful reconnect's sequence numbers.
SEQUENCED = frozenset({INVOCATION, STREAM_ITEM, COMPLETION, STREAM_INVOCATION, CANCEL_INVOCATION})

#: The highest hub protocol version understood (2 adds Ack and Sequence).
MAX_VERSION = 2

#: ASP.NET Core's default ``MaximumReceiveMessageSize``.
DEFAULT_MAX_MESSAGE_SIZE = 32 * 1024

_MSGPACK_ERROR = 1
_MSGPACK_VOID = 2
_MSGPACK_VALUE = 3


class ProtocolError(Exception):
    """The peer broke the framing or the message grammar; the connection ends.

    ``reason`` is meant for the peer (it goes into a Close message or a
    handshake error).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- handshake -------------------------------------------------------------


class HandshakeReader:
    """Collects the handshake request, the first JSON record of every connection.

    ``feed`` returns ``None`` until the record is complete, then the request
    dict and the bytes that followed it in the same chunk (the first hub
    messages may share a frame with the handshake).
    """

    def __init__(self, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self._buffer = bytearray()
        self._max = max_size

    def feed(self, data: bytes) -> tuple[dict, bytes] | None:
        self._buffer += data
        end = self._buffer.find(RECORD_SEPARATOR)
        if end < 0:
            if len(self._buffer) > self._max:
                raise ProtocolError("handshake request too large")
            return None
        record = bytes(self._buffer[:end])
        rest = bytes(self._buffer[end + 1 :])
        self._buffer.clear()
        try:
            request = orjson.loads(record)
        except orjson.JSONDecodeError:
            raise ProtocolError("the handshake request is not valid JSON") from None
        if not isinstance(request, dict):
            raise ProtocolError("the handshake request must be a JSON object")
        protocol = request.get("protocol")
        version = request.get("version")
        if not isinstance(protocol, str):
            raise ProtocolError("the handshake request needs a 'protocol' string")
        if isinstance(version, bool) or not isinstance(version, int):
            raise ProtocolError("the handshake request needs a 'version' integer")
        return request, rest


def handshake_response(error: str | None = None) -> bytes:
    """``{}`` for success, ``{"error": ...}`` for failure, always JSON."""
    body = {"error": error} if error else {}
    return orjson.dumps(body) + RECORD_SEPARATOR


def check_handshake(request: dict) -> str | None:
    """The spec's error for a handshake this server cannot serve, else None."""
    name = request["protocol"][:64]
    if name not in CODECS:
        return f"The protocol '{name}' is not supported."
    if not 0 <= request["version"] <= MAX_VERSION:
        return f"The server does not support version {request['version']} of the '{name}' protocol."
    return None


# -- message grammar -------------------------------------------------------


def _need_id(message: dict, what: str) -> None:
    value = message.get("invocationId")
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"{what} needs a non-empty invocationId string")


def _optional_id(message: dict, what: str) -> None:
    if "invocationId" in message:
        value = message["invocationId"]
        if value is None:
            del message["invocationId"]
        elif not isinstance(value, str) or not value:
            raise ProtocolError(f"{what}: invocationId must be a non-empty string")


def _invocation_body(message: dict, what: str) -> None:
    target = message.get("target")
    if not isinstance(target, str) or not target:
        raise ProtocolError(f"{what} needs a target string")
    if not isinstance(message.get("arguments"), list):
        raise ProtocolError(f"{what} needs an arguments array")
    stream_ids = message.get("streamIds")
    if stream_ids is None:
        message.pop("streamIds", None)
    elif not isinstance(stream_ids, list) or not all(isinstance(s, str) and s for s in stream_ids):
        raise ProtocolError(f"{what}: streamIds must be an array of strings")
    headers = message.get("headers")
    if headers is not None and not isinstance(headers, dict):
        raise ProtocolError(f"{what}: headers must be a map")


def _sequence_id(message: dict, what: str) -> None:
    value = message.get("sequenceId")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProtocolError(f"{what} needs a non-negative sequenceId integer")


def check_message(message: Any) -> dict | None:
    """Validate one decoded message; ``None`` for a type this server ignores.

    Unknown types are skipped as the spec lets future versions add some.
    """
    if not isinstance(message, dict):
        raise ProtocolError("a hub message must be an object")
    kind = message.get("type")
    if isinstance(kind, bool) or not isinstance(kind, int):
        raise ProtocolError("a hub message needs an integer 'type'")
    if kind == INVOCATION:
        _optional_id(message, "Invocation")
        _invocation_body(message, "Invocation")
    elif kind == STREAM_INVOCATION:
        _need_id(message, "StreamInvocation")
        _invocation_body(message, "StreamInvocation")
    elif kind == STREAM_ITEM:
        _need_id(message, "StreamItem")
        if "item" not in message:
            raise ProtocolError("StreamItem needs an item")
    elif kind == COMPLETION:
        _need_id(message, "Completion")
        if message.get("error") is not None and message.get("result") is not None:
            raise ProtocolError("Completion cannot have both a result and an error")
        if message.get("error") is not None and not isinstance(message["error"], str):
            raise ProtocolError("Completion error must be a string")
    elif kind == CANCEL_INVOCATION:
        _need_id(message, "CancelInvocation")
    elif kind in (ACK, SEQUENCE):
        _sequence_id(message, "Ack" if kind == ACK else "Sequence")
    elif kind == CLOSE:
        if message.get("error") is not None and not isinstance(message["error"], str):
            raise ProtocolError("Close error must be a string")
    elif kind != PING:
        return None
    return message


# -- codecs ----------------------------------------------------------------


class Codec:
    """One connection's hub protocol: a streaming decoder and an encoder.

    ``binary`` says whether records need a binary transport (WebSocket
    binary frames; never Server-Sent Events).
    """

    name = ""
    binary = False

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.max_message_size = max_message_size
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict]:
        """Every message completed by ``data``; partial records wait for more.

        Raises :class:`ProtocolError` for a broken record; what was decoded
        before it in the same chunk is lost with the connection.
        """
        self._buffer += data
        messages = []
        for record in self._records():
            message = check_message(self.decode(record))
            if message is not None:
                messages.append(message)
        return messages

    def reset(self) -> None:
        """Drop a partial record: its transport is gone and the next starts afresh."""
        self._buffer.clear()

    def _records(self) -> list[bytes]:
        raise NotImplementedError

    def decode(self, record: bytes) -> Any:
        raise NotImplementedError

    def encode(self, message: dict) -> bytes:
        """One message as one complete record."""
        raise NotImplementedError

    def _too_large(self, size: int) -> ProtocolError:
        return ProtocolError(f"message too large: {size} bytes, the limit is {self.max_message_size}")


class JsonCodec(Codec):
    """``json``: UTF-8 JSON records, each ended by 0x1E."""

    name = "json"
    binary = False

    def _records(self) -> list[bytes]:
        buffer = self._buffer
        records = []
        start = 0
        while True:
            end = buffer.find(RECORD_SEPARATOR, start)
            if end < 0:
                break
            if end - start > self.max_message_size:
                raise self._too_large(end - start)
            records.append(bytes(buffer[start:end]))
            start = end + 1
        del buffer[:start]
        if len(buffer) > self.max_message_size:
            raise self._too_large(len(buffer))
        return records

    def decode(self, record: bytes) -> Any:
        try:
            return orjson.loads(record)
        except orjson.JSONDecodeError as e:
            if "utf-8" in str(e).lower() or "surrogate" in str(e).lower():
                raise ProtocolError("a JSON record is not valid UTF-8") from None
            raise ProtocolError("a record is not valid JSON") from None

    def encode(self, message: dict) -> bytes:
        return orjson.dumps(message) + RECORD_SEPARATOR


def varint(n: int) -> bytes:
    """A record length as MessagePack framing writes it."""
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _array(value: Any, minimum: int, what: str) -> list:
    if not isinstance(value, list) or len(value) < minimum:
        raise ProtocolError(f"invalid {what} message")
    return value


class MessagePackCodec(Codec):
    """``messagepack``: VarInt length-prefixed MessagePack arrays."""

    name = "messagepack"
    binary = True

    def _records(self) -> list[bytes]:
        buffer = self._buffer
        records = []
        pos = 0
        while pos < len(buffer):
            size = 0
            shift = 0
            i = pos
            complete = False
            while i < len(buffer):
                byte = buffer[i]
                i += 1
                size |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    complete = True
                    break
                shift += 7
                if shift >= 35:
                    raise ProtocolError("invalid MessagePack record length")
            if not complete:
                break  # the length itself is incomplete
            if size > self.max_message_size:
                raise self._too_large(size)
            if i + size > len(buffer):
                break
            records.append(bytes(buffer[i : i + size]))
            pos = i + size
        del buffer[:pos]
        return records

    def decode(self, record: bytes) -> Any:
        try:
            array = msgpack.unpackb(record, raw=False, strict_map_key=False)
        except UnicodeDecodeError:
            raise ProtocolError("a MessagePack string is not valid UTF-8") from None
        except Exception:
            raise ProtocolError("a record is not valid MessagePack") from None
        return self._from_array(array)

    @staticmethod
    def _from_array(a: Any) -> dict:
        if not isinstance(a, list) or not a:
            raise ProtocolError("a MessagePack hub message must be a non-empty array")
        kind = a[0]
        if isinstance(kind, bool) or not isinstance(kind, int):
            raise ProtocolError("a hub message needs an integer type")
        if kind in (INVOCATION, STREAM_INVOCATION):
            name = "Invocation" if kind == INVOCATION else "StreamInvocation"
            _array(a, 5, name)
            message = {"type": kind, "headers": a[1], "target": a[3], "arguments": a[4]}
            if a[2] is not None:
                message["invocationId"] = a[2]
            if len(a) > 5 and a[5]:
                message["streamIds"] = a[5]
            return message
        if kind == STREAM_ITEM:
            _array(a, 4, "StreamItem")
            return {"type": kind, "headers": a[1], "invocationId": a[2], "item": a[3]}
        if kind == COMPLETION:
            _array(a, 4, "Completion")
            message = {"type": kind, "headers": a[1], "invocationId": a[2]}
            result_kind = a[3]
            if result_kind in (_MSGPACK_ERROR, _MSGPACK_VALUE):
                _array(a, 5, "Completion")
                message["error" if result_kind == _MSGPACK_ERROR else "result"] = a[4]
            elif result_kind != _MSGPACK_VOID:
                raise ProtocolError("invalid Completion result kind")
            return message
        if kind == CANCEL_INVOCATION:
            _array(a, 3, "CancelInvocation")
            return {"type": kind, "headers": a[1], "invocationId": a[2]}
        if kind == PING:
            return {"type": PING}
        if kind == CLOSE:
            _array(a, 2, "Close")
            message = {"type": CLOSE, "error": a[1]}
            if len(a) > 2:
                message["allowReconnect"] = a[2]
            return message
        if kind in (ACK, SEQUENCE):
            _array(a, 2, "Ack" if kind == ACK else "Sequence")
            return {"type": kind, "sequenceId": a[1]}
        return {"type": kind}

    def encode(self, message: dict) -> bytes:
        body = msgpack.packb(self._to_array(message), use_bin_type=True)
        return varint(len(body)) + body

    @staticmethod
    def _to_array(m: dict) -> list:
        kind = m["type"]
        headers = m.get("headers") or {}
        if kind in (INVOCATION, STREAM_INVOCATION):
            # streamIds is optional in the spec, but signalrcore reads a sixth
            # element unconditionally; JS and .NET clients accept it empty.
            return [kind, headers, m.get("invocationId"), m["target"], m["arguments"], m.get("streamIds") or []]
        if kind == STREAM_ITEM:
            return [kind, headers, m["invocationId"], m["item"]]
        if kind == COMPLETION:
            if m.get("error") is not None:
                return [kind, headers, m["invocationId"], _MSGPACK_ERROR, m["error"]]
            if "result" in m:
                return [kind, headers, m["invocationId"], _MSGPACK_VALUE, m["result"]]
            return [kind, headers, m["invocationId"], _MSGPACK_VOID]
        if kind == CANCEL_INVOCATION:
            return [kind, headers, m["invocationId"]]
        if kind == PING:
            return [PING]
        if kind == CLOSE:
            array = [CLOSE, m.get("error")]
            if "allowReconnect" in m:
                array.append(bool(m["allowReconnect"]))
            return array
        if kind in (ACK, SEQUENCE):
            return [kind, m["sequenceId"]]
        raise ValueError(f"cannot encode message type {kind!r}")


CODECS: dict[str, type[Codec]] = {JsonCodec.name: JsonCodec, MessagePackCodec.name: MessagePackCodec}


def codec(name: str, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> Codec:
    """A fresh codec for the hub protocol the handshake named."""
    return CODECS[name](max_message_size)


# -- message constructors ----------------------------------------------------


def invocation(target: str, arguments: list, invocation_id: str | None = None) -> dict:
    message: dict = {"type": INVOCATION, "target": target, "arguments": arguments}
    if invocation_id is not None:
        message["invocationId"] = invocation_id
    return message


def completion(invocation_id: str, result: Any = None, error: str | None = None, void: bool = False) -> dict:
    message: dict = {"type": COMPLETION, "invocationId": invocation_id}
    if error is not None:
        message["error"] = error
    elif not void:
        message["result"] = result
    return message


def stream_item(invocation_id: str, item: Any) -> dict:
    return {"type": STREAM_ITEM, "invocationId": invocation_id, "item": item}


def close(error: str | None = None, allow_reconnect: bool = False) -> dict:
    message: dict = {"type": CLOSE}
    if error:
        message["error"] = error
    if allow_reconnect:
        message["allowReconnect"] = True
    return message


PING_MESSAGE = {"type": PING}
