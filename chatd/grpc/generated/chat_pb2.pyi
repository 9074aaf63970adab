from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MessageRequest(_message.Message):
    __slots__ = ("user", "message", "room", "client_id")
    USER_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ROOM_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    user: str
    message: str
    room: str
    client_id: str
    def __init__(self, user: _Optional[str] = ..., message: _Optional[str] = ..., room: _Optional[str] = ..., client_id: _Optional[str] = ...) -> None: ...

class MessageResponse(_message.Message):
    __slots__ = ("id", "seq", "user", "message", "room", "timestamp", "protocol")
    ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ROOM_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    id: str
    seq: int
    user: str
    message: str
    room: str
    timestamp: str
    protocol: str
    def __init__(self, id: _Optional[str] = ..., seq: _Optional[int] = ..., user: _Optional[str] = ..., message: _Optional[str] = ..., room: _Optional[str] = ..., timestamp: _Optional[str] = ..., protocol: _Optional[str] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("room", "user", "since_seq")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    SINCE_SEQ_FIELD_NUMBER: _ClassVar[int]
    room: str
    user: str
    since_seq: int
    def __init__(self, room: _Optional[str] = ..., user: _Optional[str] = ..., since_seq: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("connections", "connections_by_protocol", "connections_accepted", "rooms", "messages_total", "messages_per_second", "deliveries", "uptime")
    class ConnectionsByProtocolEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_BY_PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ROOMS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    UPTIME_FIELD_NUMBER: _ClassVar[int]
    connections: int
    connections_by_protocol: _containers.ScalarMap[str, int]
    connections_accepted: int
    rooms: int
    messages_total: int
    messages_per_second: float
    deliveries: int
    uptime: float
    def __init__(self, connections: _Optional[int] = ..., connections_by_protocol: _Optional[_Mapping[str, int]] = ..., connections_accepted: _Optional[int] = ..., rooms: _Optional[int] = ..., messages_total: _Optional[int] = ..., messages_per_second: _Optional[float] = ..., deliveries: _Optional[int] = ..., uptime: _Optional[float] = ...) -> None: ...

class ChatEvent(_message.Message):
    __slots__ = ("join", "leave", "send", "message", "presence", "joined", "left", "error", "sent", "ref")
    JOIN_FIELD_NUMBER: _ClassVar[int]
    LEAVE_FIELD_NUMBER: _ClassVar[int]
    SEND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_FIELD_NUMBER: _ClassVar[int]
    JOINED_FIELD_NUMBER: _ClassVar[int]
    LEFT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SENT_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    join: Join
    leave: Leave
    send: Send
    message: MessageResponse
    presence: Presence
    joined: Joined
    left: Left
    error: Error
    sent: Sent
    ref: str
    def __init__(self, join: _Optional[_Union[Join, _Mapping]] = ..., leave: _Optional[_Union[Leave, _Mapping]] = ..., send: _Optional[_Union[Send, _Mapping]] = ..., message: _Optional[_Union[MessageResponse, _Mapping]] = ..., presence: _Optional[_Union[Presence, _Mapping]] = ..., joined: _Optional[_Union[Joined, _Mapping]] = ..., left: _Optional[_Union[Left, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., sent: _Optional[_Union[Sent, _Mapping]] = ..., ref: _Optional[str] = ...) -> None: ...

class Join(_message.Message):
    __slots__ = ("room", "user", "since_seq")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    SINCE_SEQ_FIELD_NUMBER: _ClassVar[int]
    room: str
    user: str
    since_seq: int
    def __init__(self, room: _Optional[str] = ..., user: _Optional[str] = ..., since_seq: _Optional[int] = ...) -> None: ...

class Leave(_message.Message):
    __slots__ = ("room",)
    ROOM_FIELD_NUMBER: _ClassVar[int]
    room: str
    def __init__(self, room: _Optional[str] = ...) -> None: ...

class Send(_message.Message):
    __slots__ = ("room", "message", "client_id")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    room: str
    message: str
    client_id: str
    def __init__(self, room: _Optional[str] = ..., message: _Optional[str] = ..., client_id: _Optional[str] = ...) -> None: ...

class Sent(_message.Message):
    __slots__ = ("room", "id", "seq", "client_id")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    room: str
    id: str
    seq: int
    client_id: str
    def __init__(self, room: _Optional[str] = ..., id: _Optional[str] = ..., seq: _Optional[int] = ..., client_id: _Optional[str] = ...) -> None: ...

class Presence(_message.Message):
    __slots__ = ("room", "action", "user", "timestamp", "protocol", "count")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    room: str
    action: str
    user: str
    timestamp: str
    protocol: str
    count: int
    def __init__(self, room: _Optional[str] = ..., action: _Optional[str] = ..., user: _Optional[str] = ..., timestamp: _Optional[str] = ..., protocol: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class Joined(_message.Message):
    __slots__ = ("room", "user", "members", "truncated", "first_seq")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEQ_FIELD_NUMBER: _ClassVar[int]
    room: str
    user: str
    members: _containers.RepeatedScalarFieldContainer[str]
    truncated: bool
    first_seq: int
    def __init__(self, room: _Optional[str] = ..., user: _Optional[str] = ..., members: _Optional[_Iterable[str]] = ..., truncated: _Optional[bool] = ..., first_seq: _Optional[int] = ...) -> None: ...

class Left(_message.Message):
    __slots__ = ("room",)
    ROOM_FIELD_NUMBER: _ClassVar[int]
    room: str
    def __init__(self, room: _Optional[str] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "reason", "request")
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    code: str
    reason: str
    request: str
    def __init__(self, code: _Optional[str] = ..., reason: _Optional[str] = ..., request: _Optional[str] = ...) -> None: ...
