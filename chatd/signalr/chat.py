"""The chat hub: SignalR hub methods mapped onto :class:`chatd.hub.Hub`.

Client to server (method names match case-insensitively, as in ASP.NET Core)::

    SendMessage(user, message)          publish to the default room ("general") -> message dict
    SendToRoom(room, user, message[, client_id])
                                        join ``room`` if needed, then publish -> message dict
    JoinRoom(room[, user[, since]])     -> the room's users; with ``since``, see below
    LeaveRoom(room)
    GetHistory(room[, limit])           -> [message dict, ...], oldest first
    GetUsers(room)                      -> [user, ...]
    StreamRoom(room[, since])           stream: each new message of ``room`` as a message dict
    UploadMessages(room, user, stream)  client-to-server stream: each item is a message -> count

A send completes once the message is stored (a store failure completes
with an error, never a result); its result is the stored message dict. A
retry of ``SendToRoom`` with the same ``client_id`` in the same room
completes with the original's dict (same ``id`` and ``seq``) and is not
delivered again.

Resume: ``StreamRoom(room, since)`` streams every kept message after seq
``since`` first, then live ones, with no gap and no duplicate; if some of
what was missed is no longer kept, the first item is ``{"type":
"truncated", "room", "first_seq"}``. ``JoinRoom(room, user, since)`` replays
the missed messages as ``ReceiveMessage`` calls and returns ``{"users",
"truncated", "first_seq", "last_seq"}`` instead of the plain user list.

Server to client::

    ReceiveMessage(user, message, room)
    UserJoined(user, room)
    UserLeft(user, room)
    HistoryTruncated(room, first_seq)   messages before first_seq were missed and are gone

A message dict is the WebSocket protocol's shape (``id``, ``seq``, ``room``,
``user``, ``message``, ``timestamp``, ``protocol``).

User names: a connection is in the default room from the start so that the
ASP.NET Core chat tutorial works unmodified. It is named by the ``user``
query parameter of its URL if there is one; otherwise it is listed as
``guest-N`` until the first ``SendMessage``/``SendToRoom``/``JoinRoom``/
``UploadMessages`` that names a user, which renames it once (presence shows
the guest leaving and the user joining). After that the name is fixed.
With a token (``chatd.auth``) the name is the token's from the start; a
call naming anyone else completes with an error, and so does one for a room
outside the token's ``rooms`` (the default room is joined only if allowed).
When the token expires the server sends Close with ``allowReconnect``, so
the official clients reconnect and ask ``accessTokenFactory`` for a new one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from autobahn.websocket.protocol import PreparedMessage
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatd import validate
from chatd.events import Event, Message
from chatd.hub import Hub, Joined, Session
from chatd.logs import printable
from chatd.ordered import InOrder
from chatd.signalr import protocol as p
from chatd.signalr.connection import CLOSED, OPEN, HubConnection
from chatd.validate import ChatError
from chatd.websocket import frame

log = Logger()

PROTOCOL = "signalr"
DEFAULT_ROOM = "general"
#: open StreamRooms, and open uploads, one connection may have: each holds an
#: entry until the client ends it, so without a bound a client grows them forever
MAX_OPEN_STREAMS = 100
#: records a connection may send while a read from history is answered (see :mod:`chatd.ordered`)
MAX_WAITING = 1000

_JSON = p.JsonCodec()
_MSGPACK = p.MessagePackCodec()
#: the per-event encoding cache key of each hub protocol
_CACHE_KEYS = {"json": "signalr-json", "messagepack": "signalr-msgpack"}
_CODECS = {"json": _JSON, "messagepack": _MSGPACK}
_ENCODERS = {name: codec.encode for name, codec in _CODECS.items()}


def event_invocation(event: Event) -> dict:
    """The client method call that tells a client about ``event``."""
    if event.kind == "message":
        return p.invocation("ReceiveMessage", [event.user, event.text, event.room])  # type: ignore[attr-defined]
    if event.kind == "truncated":
        return p.invocation("HistoryTruncated", [event.room, event.first_seq])  # type: ignore[attr-defined]
    target = "UserJoined" if event.action == "join" else "UserLeft"  # type: ignore[attr-defined]
    return p.invocation(target, [event.user, event.room])  # type: ignore[attr-defined]


def _encoder(codec_name: str) -> Callable[[Event], bytes]:
    encode = _ENCODERS[codec_name]
    return lambda event: encode(event_invocation(event))


_EVENT_ENCODERS = {name: _encoder(name) for name in _ENCODERS}


def _framer(codec_name: str) -> Callable[[Event], PreparedMessage]:
    key, encode, binary = _CACHE_KEYS[codec_name], _EVENT_ENCODERS[codec_name], _CODECS[codec_name].binary
    return lambda event: frame(event.encoded(key, encode), binary)


#: the per-event cache key and builder of each hub protocol's WebSocket frame
_FRAMES = {name: (f"{_CACHE_KEYS[name]}-frame", _framer(name)) for name in _ENCODERS}
_DELIVERED = frozenset(("message", "presence", "truncated"))


class SignalRSession(Session):
    """The hub's handle on one SignalR connection."""

    protocol = PROTOCOL
    # The connection's address slot is held from negotiate on (ConnectionManager.create).
    counts_address = False

    def __init__(self, connection: HubConnection, chat: ChatHub) -> None:
        super().__init__(connection.peer, connection.identity)
        self.connection = connection
        self._chat = chat

    def deliver(self, event: Event) -> None:
        if event.kind not in _DELIVERED:
            return
        self._send(event)
        if event.kind != "presence" and self._chat.streams:
            self._chat.stream_event(event)

    def replay(self, message: Message) -> None:
        # A JoinRoom(room, user, since) replay is for the client's ReceiveMessage
        # handlers alone: an open StreamRoom of the room carried these messages
        # already (or never promised them: a stream replays with its own since).
        self._send(message)

    def _send(self, event: Event) -> None:
        connection = self.connection
        codec = connection.codec
        if codec is None:
            return
        # The common case first, as the WebSocket session does (this runs once
        # per recipient): a WebSocket with nothing buffered and no close under
        # way sends the event's one shared frame straight to its socket. A
        # stateful connection keeps each record for a resend, so it takes the
        # general path; so does every other transport.
        transport = connection.transport
        out = getattr(transport, "direct", None)
        if out is not None and out.direct and connection.state == OPEN and not connection.stateful:
            key, build = _FRAMES[codec.name]
            out.send_direct(event.encoded(key, build).payloadHybi)
            connection.last_sent = connection.clock.seconds()
        else:
            connection.send_record(event.encoded(_CACHE_KEYS[codec.name], _EVENT_ENCODERS[codec.name]))

    def close(self, reason: str) -> None:
        self.connection.close(error=reason)

    def going_away(self, reason: str) -> None:
        self.connection.close(error=reason, allow_reconnect=True)

    def token_expired(self) -> None:
        self.connection.close(error="token expired", allow_reconnect=True)


def _as_dict(event: Event) -> dict:
    return event.as_dict()  # type: ignore[attr-defined]


class _Upload:
    """A client-to-server stream feeding ``UploadMessages``."""

    __slots__ = ("invocation_id", "room", "count", "error", "pending")

    def __init__(self, invocation_id: str | None, room: str) -> None:
        self.invocation_id = invocation_id
        self.room = room
        self.count = 0
        self.error: str | None = None
        #: items sent to the store and not yet stored: the completion waits for them
        self.pending: set[defer.Deferred] = set()


class ChatHub:
    """The dispatcher of one connection: invocations in, hub calls, replies out."""

    def __init__(self, hub: Hub, connection: HubConnection, default_room: str = DEFAULT_ROOM) -> None:
        self.hub = hub
        self.connection = connection
        self.default_room = default_room
        self.session = SignalRSession(connection, self)
        #: records wait here while a join or history is read from the store
        self._in_order: InOrder[dict] = InOrder(self._handle, MAX_WAITING, self._too_many)
        self._read: defer.Deferred | None = None
        #: invocation id -> room of each running StreamRoom
        self.streams: dict[str, str] = {}
        #: rooms joined only on behalf of a StreamRoom (left again when it ends)
        self._stream_rooms: set[str] = set()
        #: stream id -> upload
        self._uploads: dict[str, _Upload] = {}
        self._provisional = False
        hub.connect(self.session)
        identity = self.session.identity
        try:
            if connection.user is not None:
                hub.identify(self.session, connection.user)
            elif identity is None:
                hub.identify(self.session, f"guest-{self.session.id}")
                self._provisional = True
            if identity is None or identity.allows(default_room):
                hub.join(self.session, default_room)
        except ChatError:
            hub.disconnect(self.session)
            raise

    # -- dispatch ------------------------------------------------------------

    def on_too_slow(self) -> None:
        self.hub.metrics.too_slow(PROTOCOL)

    def on_message(self, message: dict) -> None:
        self._in_order.submit(message)

    def _too_many(self, message: dict) -> None:
        self.connection.close(
            error=f"Too many messages while a read from history is answered: at most {MAX_WAITING}."
        )

    def _handle(self, message: dict) -> defer.Deferred | None:
        """Handle one record; the Deferred of a read from the store it started, if any (see :mod:`chatd.ordered`)."""
        self._read = None
        self._dispatch(message)
        read, self._read = self._read, None
        return read

    def _reading(self, answer: defer.Deferred) -> defer.Deferred:
        """Mark ``answer`` as read from the store: this connection's next records wait for it."""
        if not answer.called:
            self._read = answer
        return answer

    def _dispatch(self, message: dict) -> None:
        kind = message["type"]
        if kind in (p.INVOCATION, p.STREAM_INVOCATION):
            self._invoke(message)
        elif kind == p.STREAM_ITEM:
            self._upload_item(message["invocationId"], message["item"])
        elif kind == p.COMPLETION:
            self._upload_done(message["invocationId"], message.get("error"))
        elif kind == p.CANCEL_INVOCATION:
            self._cancel(message["invocationId"])

    def on_close(self) -> None:
        self.streams.clear()
        self._uploads.clear()
        self.hub.disconnect(self.session)

    def _invoke(self, message: dict) -> None:
        target = message["target"]
        invocation_id = message.get("invocationId")
        streaming = message["type"] == p.STREAM_INVOCATION
        stream_ids = message.get("streamIds") or []
        try:
            spec = _METHODS.get(target.lower())
            if spec is None:
                raise ChatError(f"Unknown hub method '{target}'")
            if spec.kind == "stream" and not streaming:
                raise ChatError(
                    f"The client attempted to invoke the streaming '{target}' method with a non-streaming invocation."
                )
            if spec.kind != "stream" and streaming:
                raise ChatError(
                    f"The client attempted to invoke the non-streaming '{target}' method with a streaming invocation."
                )
            expected_streams = 1 if spec.kind == "upload" else 0
            if len(stream_ids) != expected_streams:
                raise ChatError(f"Client sent {len(stream_ids)} stream(s), Hub method expects {expected_streams}.")
            args = message["arguments"]
            if not spec.min_args <= len(args) <= spec.max_args:
                expects = (
                    str(spec.max_args) if spec.min_args == spec.max_args else f"{spec.min_args} to {spec.max_args}"
                )
                raise ChatError(f"Invocation provides {len(args)} argument(s) but target expects {expects}.")
            if spec.kind == "upload":
                result = spec.handler(self, invocation_id, stream_ids[0], *args)
            elif spec.kind == "stream":
                result = spec.handler(self, invocation_id, *args)
            else:
                result = spec.handler(self, *args)
        except ChatError as e:
            self.hub.metrics.error("bad_request", PROTOCOL)
            log.debug(
                "{peer}: {target} failed: {reason}",
                peer=self.session.peer,
                target=printable(target),
                reason=printable(e.reason),
            )
            if invocation_id is not None:
                self.connection.send(p.completion(invocation_id, error=e.reason))
            return
        except Exception:
            log.failure("{peer}: {target} failed", peer=self.session.peer, target=printable(target))
            if invocation_id is not None:
                error = f"An unexpected error occurred invoking '{target}' on the server."
                self.connection.send(p.completion(invocation_id, error=error))
            return
        if spec.kind != "call":
            return
        if isinstance(result, defer.Deferred):
            result.addCallbacks(self._complete, self._failed, (invocation_id,), None, (invocation_id, target))
        elif invocation_id is not None:
            self._complete(result, invocation_id)

    def _complete(self, result: Any, invocation_id: str | None) -> None:
        if invocation_id is None or self.connection.state == CLOSED:
            return
        if result is _VOID:
            self.connection.send(p.completion(invocation_id, void=True))
        else:
            self.connection.send(p.completion(invocation_id, result))

    def _failed(self, failure: Failure, invocation_id: str | None, target: str) -> None:
        """A call that failed once the store answered (the message was not stored)."""
        if failure.check(ChatError):
            error = failure.value.reason
        else:
            log.failure("{peer}: {target} failed", failure, peer=self.session.peer, target=printable(target))
            error = f"An unexpected error occurred invoking '{target}' on the server."
        if invocation_id is not None and self.connection.state != CLOSED:
            self.connection.send(p.completion(invocation_id, error=error))

    # -- naming --------------------------------------------------------------

    def _name(self, user: Any) -> str:
        name = validate.user(user)
        session = self.session
        if not self._provisional:
            return self.hub.identify(session, name)
        self._provisional = False
        if name != session.user:
            rooms = sorted(session.rooms)
            for room in rooms:
                self.hub.leave(session, room)
            session.user = None
            self.hub.identify(session, name)
            for room in rooms:
                self.hub.join(session, room)
        return name

    def _ensure_in(self, room: str) -> None:
        self._stream_rooms.discard(room)
        if room not in self.session.rooms:
            self.hub.join(self.session, room)

    # -- hub methods ---------------------------------------------------------

    def send_message(self, user: Any, message: Any) -> object:
        return self.send_to_room(self.default_room, user, message)

    def send_to_room(self, room: Any, user: Any, message: Any, client_id: Any = None) -> defer.Deferred:
        room = validate.room(room)
        name = validate.user(user)
        validate.message(message, self.hub.limits)
        validate.client_id(client_id)
        # Every refusal before the first change (naming a guest, joining):
        self.hub.check_rate(name, self.session, PROTOCOL)
        self.hub.check_join(self.session, room)
        self._name(user)
        self._ensure_in(room)
        d = self.hub.publish(room, self.session.user, message, PROTOCOL, client_id, source=self.session)
        return d.addCallback(_as_dict)

    def join_room(self, room: Any, user: Any = None, since: Any = None) -> list[str] | dict:
        room = validate.room(room)
        resume = validate.since_seq(since, "since") if since is not None else None
        if user is not None:
            self._name(user)
        self._stream_rooms.discard(room)
        if resume is None:
            return list(self.hub.join(self.session, room))

        def reply(joined: Joined) -> dict:
            return {
                "users": list(joined),
                "truncated": joined.truncated,
                "first_seq": joined.first_seq,
                "last_seq": joined.last_seq,
            }

        # A Deferred: the room's history may have to be read back from the store first.
        return self._reading(self.hub.join(self.session, room, since_seq=resume).addCallback(reply))

    def leave_room(self, room: Any) -> object:
        self.hub.leave(self.session, room)
        self._stream_rooms.discard(room)
        for invocation_id, watched in list(self.streams.items()):
            if watched == room:
                self._end_stream(invocation_id)
        return _VOID

    def get_history(self, room: Any, limit: Any = None) -> defer.Deferred:
        messages = self._reading(self.hub.history(room, limit, self.session.identity))
        return messages.addCallback(lambda kept: [m.as_dict() for m in kept])

    def get_users(self, room: Any) -> list[str]:
        return self.hub.members(room, self.session.identity)

    # -- server-to-client streams -------------------------------------------

    def stream_room(self, invocation_id: str, room: Any, since: Any = None) -> None:
        room = validate.room(room)
        resume = validate.since_seq(since, "since") if since is not None else None
        if invocation_id in self.streams:
            raise ChatError(f"Invocation ID '{invocation_id}' is already in use.")
        if len(self.streams) >= MAX_OPEN_STREAMS:
            raise ChatError(f"Too many open streams: at most {MAX_OPEN_STREAMS} per connection.")
        if room not in self.session.rooms:
            self.hub.join(self.session, room)
            self._stream_rooms.add(room)
        if resume is None:
            self.streams[invocation_id] = room
            return
        # Reserved ("" is no room) until the replay: it goes to this stream
        # only, in the same reactor turn as the stream goes live (once the
        # room's history is in memory): no gap, no duplicate, and the room's
        # ReceiveMessage handlers do not see old messages again.
        self.streams[invocation_id] = ""

        def replay() -> None:
            if self.streams.get(invocation_id) != "":
                return  # cancelled, or the connection closed, meanwhile
            missed = self.hub.store.since(room, resume)
            if missed.truncated:
                item = {"type": "truncated", "room": room, "first_seq": missed.first_kept}
                self.connection.send(p.stream_item(invocation_id, item))
            for message in missed.messages:
                self.connection.send(p.stream_item(invocation_id, message.as_dict()))
            self.streams[invocation_id] = room

        def failed(failure: Failure) -> None:
            if self.streams.get(invocation_id) != "":
                return
            del self.streams[invocation_id]
            reason = failure.value.reason if failure.check(ChatError) else "history not available"
            self.connection.send(p.completion(invocation_id, error=reason))

        self._reading(self.hub.store.using(room, replay).addErrback(failed))

    def stream_event(self, event: Event) -> None:
        item = None
        for invocation_id, room in list(self.streams.items()):
            if room == event.room:
                if item is None:
                    # The item is the same for every subscriber; only the
                    # invocation id around it differs per client.
                    item = event.encoded("dict", _as_dict)
                self.connection.send(p.stream_item(invocation_id, item))

    def _cancel(self, invocation_id: str) -> None:
        if invocation_id in self.streams:
            self._end_stream(invocation_id)

    def _end_stream(self, invocation_id: str) -> None:
        room = self.streams.pop(invocation_id)
        self.connection.send(p.completion(invocation_id, void=True))
        if room in self._stream_rooms and room not in self.streams.values():
            self._stream_rooms.discard(room)
            if room in self.session.rooms:
                self.hub.leave(self.session, room)

    # -- client-to-server streams -------------------------------------------

    def upload_messages(self, invocation_id: str | None, stream_id: str, room: Any, user: Any) -> None:
        room = validate.room(room)
        if stream_id in self._uploads:
            raise ChatError(f"Stream ID '{stream_id}' is already in use.")
        if len(self._uploads) >= MAX_OPEN_STREAMS:
            raise ChatError(f"Too many open uploads: at most {MAX_OPEN_STREAMS} per connection.")
        self._name(user)
        self._ensure_in(room)
        self._uploads[stream_id] = _Upload(invocation_id, room)

    def _upload_item(self, stream_id: str, item: Any) -> None:
        upload = self._uploads.get(stream_id)
        if upload is None or upload.error is not None:
            return
        try:
            if upload.room not in self.session.rooms:
                raise ChatError(f"not in room {upload.room}")
            d = self.hub.publish(upload.room, self.session.user, item, PROTOCOL, source=self.session)
        except ChatError as e:
            self.hub.metrics.error("bad_request", PROTOCOL)
            upload.error = e.reason
            return
        upload.pending.add(d)

        def stored(_: Any) -> None:
            upload.pending.discard(d)
            upload.count += 1

        def failed(failure: Failure) -> None:
            upload.pending.discard(d)
            upload.error = upload.error or (failure.value.reason if failure.check(ChatError) else "internal error")

        d.addCallbacks(stored, failed)

    def _upload_done(self, stream_id: str, error: str | None) -> None:
        upload = self._uploads.pop(stream_id, None)
        if upload is None or upload.invocation_id is None:
            return
        if upload.pending:
            # Complete once every item sent is stored (or failed), with the true count.
            waiting = defer.DeferredList(list(upload.pending), consumeErrors=True)
            waiting.addCallback(lambda _: self._upload_complete(upload, error))
            return
        self._upload_complete(upload, error)

    def _upload_complete(self, upload: _Upload, error: str | None) -> None:
        assert upload.invocation_id is not None
        if self.connection.state == CLOSED:
            return
        if upload.error is not None:
            self.connection.send(p.completion(upload.invocation_id, error=upload.error))
        elif error:
            self.connection.send(p.completion(upload.invocation_id, error=f"the client stream failed: {error}"))
        else:
            self.connection.send(p.completion(upload.invocation_id, upload.count))


_VOID = object()


class _Method:
    __slots__ = ("handler", "min_args", "max_args", "kind")

    def __init__(self, handler: Callable[..., Any], min_args: int, max_args: int, kind: str = "call") -> None:
        self.handler = handler
        self.min_args = min_args
        self.max_args = max_args
        self.kind = kind  # "call" | "stream" (server to client) | "upload" (client to server)


_METHODS: dict[str, _Method] = {
    "sendmessage": _Method(ChatHub.send_message, 2, 2),
    "sendtoroom": _Method(ChatHub.send_to_room, 3, 4),
    "joinroom": _Method(ChatHub.join_room, 1, 3),
    "leaveroom": _Method(ChatHub.leave_room, 1, 1),
    "gethistory": _Method(ChatHub.get_history, 1, 2),
    "getusers": _Method(ChatHub.get_users, 1, 1),
    "streamroom": _Method(ChatHub.stream_room, 1, 2, "stream"),
    "uploadmessages": _Method(ChatHub.upload_messages, 2, 2, "upload"),
}
