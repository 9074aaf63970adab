"""The sans-IO SignalR codec: framing, partial and batched records, bad input."""

from __future__ import annotations

import msgpack
import pytest

from chatd.signalr import protocol as p


def json_records(*bodies: bytes) -> bytes:
    return b"".join(body + b"\x1e" for body in bodies)


def mp_record(array: list) -> bytes:
    body = msgpack.packb(array, use_bin_type=True)
    return p.varint(len(body)) + body


INVOKE = b'{"type":1,"invocationId":"0","target":"SendMessage","arguments":["ada","hi"]}'


# -- handshake -------------------------------------------------------------------


def test_handshake_in_pieces_with_a_message_behind_it():
    reader = p.HandshakeReader()
    assert reader.feed(b'{"protocol":"js') is None
    request, rest = reader.feed(b'on","version":1}\x1e{"type":6}\x1e')
    assert request == {"protocol": "json", "version": 1}
    assert rest == b'{"type":6}\x1e'


@pytest.mark.parametrize(
    ("request_", "error"),
    [
        ({"protocol": "xml", "version": 1}, "The protocol 'xml' is not supported."),
        ({"protocol": "json", "version": 3}, "The server does not support version 3 of the 'json' protocol."),
        ({"protocol": "messagepack", "version": 2}, None),
        ({"protocol": "json", "version": 0}, None),
    ],
)
def test_handshake_errors_use_the_spec_wording(request_, error):
    assert p.check_handshake(request_) == error


@pytest.mark.parametrize("body", [b"{nope", b"[1]", b'{"protocol":"json"}', b'{"version":1}'])
def test_bad_handshake_request_is_a_protocol_error(body):
    with pytest.raises(p.ProtocolError):
        p.HandshakeReader().feed(body + b"\x1e")


def test_handshake_responses():
    assert p.handshake_response() == b"{}\x1e"
    assert p.handshake_response("nope") == b'{"error":"nope"}\x1e'


# -- JSON ------------------------------------------------------------------------


def test_json_partial_records_wait_for_the_rest():
    codec = p.JsonCodec()
    data = json_records(INVOKE)
    for i in range(len(data) - 1):
        assert codec.feed(data[i : i + 1]) == []
    (message,) = codec.feed(data[-1:])
    assert message["target"] == "SendMessage" and message["arguments"] == ["ada", "hi"]


def test_json_several_records_in_one_chunk_and_a_tail():
    codec = p.JsonCodec()
    chunk = json_records(b'{"type":6}', INVOKE, b'{"type":5,"invocationId":"3"}') + b'{"type":'
    messages = codec.feed(chunk)
    assert [m["type"] for m in messages] == [p.PING, p.INVOCATION, p.CANCEL_INVOCATION]
    assert codec.feed(b"6}\x1e") == [{"type": p.PING}]


def test_json_unknown_types_are_ignored():
    assert p.JsonCodec().feed(json_records(b'{"type":99,"x":1}', b'{"type":6}')) == [{"type": 6}]


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (b'{"type":1,"target":"\xff\xfe"}', "UTF-8"),
        (b'{"type":1,"target":', "not valid JSON"),
        (b"[1,2]", "must be an object"),
        (b'{"target":"x"}', "integer 'type'"),
        (b'{"type":1,"arguments":[]}', "target"),
        (b'{"type":1,"target":"x"}', "arguments"),
        (b'{"type":1,"target":"x","arguments":[],"invocationId":""}', "invocationId"),
        (b'{"type":4,"target":"x","arguments":[]}', "invocationId"),
        (b'{"type":2,"invocationId":"1"}', "item"),
        (b'{"type":3,"invocationId":"1","result":1,"error":"e"}', "both"),
        (b'{"type":8,"sequenceId":"1"}', "sequenceId"),
    ],
)
def test_json_bad_records_are_protocol_errors(record, reason):
    with pytest.raises(p.ProtocolError) as e:
        p.JsonCodec().feed(json_records(record))
    assert reason in e.value.reason


def test_json_oversized_records_are_refused_even_before_they_end():
    codec = p.JsonCodec(max_message_size=100)
    with pytest.raises(p.ProtocolError, match="too large"):
        codec.feed(b'{"type":1,"target":"' + b"x" * 200)
    with pytest.raises(p.ProtocolError, match="too large"):
        p.JsonCodec(max_message_size=100).feed(json_records(b'{"a":"' + b"x" * 200 + b'"}'))
    # At the limit is fine.
    body = b'{"type":6,"pad":"' + b"x" * (100 - 19) + b'"}'
    assert len(body) == 100
    assert p.JsonCodec(max_message_size=100).feed(json_records(body))[0]["type"] == 6


def test_json_encode_round_trips():
    codec = p.JsonCodec()
    message = p.completion("7", [{"user": "ada"}])
    data = codec.encode(message)
    assert data.endswith(b"\x1e") and data.count(b"\x1e") == 1
    assert p.JsonCodec().feed(data) == [message]
    assert b'"result"' not in codec.encode(p.completion("7", void=True))
    assert codec.encode(p.close("bye", allow_reconnect=True)) == b'{"type":7,"error":"bye","allowReconnect":true}\x1e'


# -- MessagePack -------------------------------------------------------------------


def test_varint_lengths():
    assert p.varint(0) == b"\x00"
    assert p.varint(127) == b"\x7f"
    assert p.varint(128) == b"\x80\x01"
    assert p.varint(16384) == b"\x80\x80\x01"


def test_msgpack_partial_records_including_a_split_length():
    codec = p.MessagePackCodec()
    record = mp_record([1, {}, "0", "SendToRoom", ["r", "u", "x" * 200]])
    assert record[0] & 0x80  # a two-byte length
    assert codec.feed(record[:1]) == []
    assert codec.feed(record[1:50]) == []
    (message,) = codec.feed(record[50:])
    assert message == {
        "type": 1,
        "headers": {},
        "invocationId": "0",
        "target": "SendToRoom",
        "arguments": ["r", "u", "x" * 200],
    }


def test_msgpack_several_records_in_one_frame():
    codec = p.MessagePackCodec()
    frame = (
        mp_record([6])
        + mp_record([1, {}, None, "SendMessage", ["a", "b"]])
        + mp_record([1, {}, "1", "UploadMessages", ["r", "u"], ["2"]])
        + mp_record([2, {}, "2", "item"])
        + mp_record([3, {}, "2", 2])
        + mp_record([5, {}, "4"])
        + mp_record([8, 3])
        + mp_record([9, 1])
        + mp_record([7, None])
    )
    messages = codec.feed(frame)
    assert [m["type"] for m in messages] == [6, 1, 1, 2, 3, 5, 8, 9, 7]
    assert "invocationId" not in messages[1]
    assert messages[2]["streamIds"] == ["2"]
    assert messages[3]["item"] == "item"
    assert "result" not in messages[4] and "error" not in messages[4]
    assert messages[6]["sequenceId"] == 3


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (p.varint(3) + b"\xc1\xc1\xc1", "not valid MessagePack"),
        (p.varint(2) + b"\x91\xa1", "not valid MessagePack"),  # truncated inside the record
        (p.varint(4) + b"\x91\xa2\xff\xfe", "UTF-8"),
        (mp_record({"type": 1}), "array"),
        (mp_record([1, {}, "0", "x"]), "Invocation"),
        (mp_record([3, {}, "0", 9]), "result kind"),
        (p.varint(1) + msgpack.packb(5), "array"),
        (b"\xff\xff\xff\xff\xff\x01", "length"),
    ],
)
def test_msgpack_bad_records_are_protocol_errors(record, reason):
    with pytest.raises(p.ProtocolError) as e:
        p.MessagePackCodec().feed(record)
    assert reason in e.value.reason


def test_msgpack_oversized_record_is_refused_by_its_length():
    codec = p.MessagePackCodec(max_message_size=1000)
    with pytest.raises(p.ProtocolError, match="too large"):
        codec.feed(p.varint(5000) + b"\x00")


def test_msgpack_encode_is_what_the_js_client_reads():
    codec = p.MessagePackCodec()

    def decode(data: bytes):
        length = data[0]
        assert len(data) == length + 1
        return msgpack.unpackb(data[1:], raw=False)

    assert codec.encode(p.PING_MESSAGE) == b"\x02\x91\x06"
    assert decode(codec.encode(p.invocation("ReceiveMessage", ["a", "b", "c"]))) == [
        1, {}, None, "ReceiveMessage", ["a", "b", "c"], [],
    ]
    assert decode(codec.encode(p.completion("1", void=True))) == [3, {}, "1", 2]
    assert decode(codec.encode(p.completion("1", None))) == [3, {}, "1", 3, None]
    assert decode(codec.encode(p.completion("1", error="bad"))) == [3, {}, "1", 1, "bad"]
    assert decode(codec.encode(p.stream_item("1", {"a": 1}))) == [2, {}, "1", {"a": 1}]
    assert decode(codec.encode(p.close("bye", True))) == [7, "bye", True]
    assert decode(codec.encode(p.close())) == [7, None]
    assert decode(codec.encode({"type": p.SEQUENCE, "sequenceId": 4})) == [9, 4]
