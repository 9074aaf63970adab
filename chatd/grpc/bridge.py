"""The bridge between grpcio's worker threads and the hub.

grpcio calls the servicer on its own worker threads; the hub belongs to the
reactor thread. The rules that keep the two apart:

- A worker reaches the hub only through ``blockingCallFromThread`` (a request
  that needs an answer) or ``callFromThread`` (tidying up after a call).
- A stream is a hub :class:`~chatd.hub.Session` whose :meth:`GrpcSession.deliver`
  runs on the reactor and puts ready-encoded bytes into a bounded
  ``queue.Queue``; the call's worker thread drains that queue. The reactor never
  waits on a worker: when a stream's queue is full the stream is ended with
  ``RESOURCE_EXHAUSTED`` and the room carries on.
- Each event is encoded to protobuf once, whatever the number of gRPC
  recipients (``event.encoded("grpc", encode)``), and handed to grpcio as
  bytes; that is why :func:`method_handlers` registers the methods with no
  response serializer instead of using the generated ``add_..._to_server``.

Unary calls (``SendMessage``, ``GetStats``) hold a worker for one reactor
round trip. A stream holds one worker for its lifetime; ``Chat`` also holds a
reader thread that feeds client events to the reactor one at a time. How many
streams may be open is not counted here but in
:class:`chatd.grpc.streams.StreamLimit`, which sees every service's streams.

``--grpc-server aio`` (:mod:`chatd.grpc.aio`) keeps these rules with
coroutines on one asyncio loop in place of worker threads, reusing the
session, the hub work and the error mapping defined here.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import grpc
from twisted.internet import defer
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatd import validate
from chatd.auth import Authenticator, Forbidden, Identity, Unauthenticated, bearer
from chatd.events import Event, Message, Presence, Truncated, rfc3339
from chatd.grpc.generated import chat_pb2 as pb
from chatd.hub import Hub, Joined, ServerFull, Session, SessionClosed, ShuttingDown
from chatd.store import StoreUnavailable
from chatd.validate import ChatError, RateLimited

log = Logger()

PROTOCOL = "grpc"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ChatService"].full_name
Code = grpc.StatusCode


class Wire(NamedTuple):
    """One event's protobuf encodings, shared by every gRPC recipient."""

    stream: bytes | None  # a MessageResponse, for StreamMessages (messages only)
    chat: bytes | None  # a ChatEvent, for Chat


def message_response(m: Message) -> pb.MessageResponse:
    return pb.MessageResponse(
        id=m.id,
        seq=m.seq,
        user=m.user,
        message=m.text,
        room=m.room,
        timestamp=m.timestamp,
        protocol=m.protocol,
    )


def encode(event: Event) -> Wire:
    """The ``event.encoded("grpc", ...)`` encoder."""
    if isinstance(event, Message):
        m = message_response(event)
        return Wire(m.SerializeToString(), pb.ChatEvent(message=m).SerializeToString())
    if isinstance(event, Presence):
        p = pb.Presence(
            room=event.room,
            action=event.action,
            user=event.user,
            timestamp=rfc3339(event.time),
            protocol=event.protocol,
            count=event.count,
        )
        return Wire(None, pb.ChatEvent(presence=p).SerializeToString())
    return Wire(None, None)


class _End(NamedTuple):
    """The last item of a stream's queue: how the call ends."""

    code: grpc.StatusCode
    details: str


def status_for(error: ChatError, hub: Hub) -> tuple[grpc.StatusCode, str]:
    """The status that fits a refused request, counted once; both servers end the call with it."""
    if isinstance(error, Forbidden):
        code, kind = Code.PERMISSION_DENIED, "forbidden"
    elif isinstance(error, Unauthenticated):
        code, kind = Code.UNAUTHENTICATED, "unauthenticated"
    elif isinstance(error, ShuttingDown):
        code, kind = Code.UNAVAILABLE, "shutting_down"
    elif isinstance(error, StoreUnavailable):
        code, kind = Code.UNAVAILABLE, "not_stored"
    elif isinstance(error, SessionClosed):
        code, kind = Code.RESOURCE_EXHAUSTED, "too_slow"
    elif isinstance(error, ServerFull):
        code, kind = Code.RESOURCE_EXHAUSTED, "server_full"
    elif isinstance(error, RateLimited):
        code, kind = Code.RESOURCE_EXHAUSTED, "rate_limited"
    else:
        code, kind = Code.INVALID_ARGUMENT, "bad_request"
    hub.metrics.error(kind, PROTOCOL)
    return code, error.reason


def abort(context: grpc.ServicerContext, error: ChatError, hub: Hub) -> None:
    """End the call with the status that fits a refused request (raises)."""
    context.abort(*status_for(error, hub))


class GrpcSession(Session):
    """The hub's handle on one gRPC stream (``StreamMessages`` or ``Chat``).

    ``deliver``, ``put``, ``end``, ``close`` and ``going_away`` run on the
    reactor; ``drain`` runs on the call's worker thread and ``cancelled`` on
    whichever grpcio thread ends the call. The queue holds at most ``limit``
    items plus one place kept for the end of the stream, so ending never
    blocks or fails.
    """

    protocol = PROTOCOL

    def __init__(
        self, hub: Hub, reactor: Any, peer: str, limit: int, chat: bool, identity: Identity | None = None
    ) -> None:
        super().__init__(peer, identity)
        self.limit = limit
        self.chat = chat
        self.hears_presence = chat  # StreamMessages carries messages only
        self.close_reason: str | None = None
        self._hub = hub
        self._reactor = reactor
        self._queue: Any = self._new_queue(limit)
        self._lock = threading.Lock()
        self._ended = False
        self._replaying = False
        #: sends of a ``Chat`` call whose replies wait for the store (reactor; see ``ChatServicer._finished``)
        self.unanswered: set[defer.Deferred] = set()

    def _new_queue(self, limit: int) -> Any:
        """Where the reactor leaves responses for the call; needs ``qsize`` and ``put_nowait``."""
        return queue.Queue(limit + 1)

    @property
    def ended(self) -> bool:
        return self._ended

    # -- reactor thread ----------------------------------------------------

    def deliver(self, event: Event) -> None:
        if isinstance(event, Truncated):
            reason = (
                f"messages of {event.room} before seq {event.first_seq} are gone; "
                f"resume with since_seq={event.first_seq - 1} to get what is kept"
            )
            if self.chat:
                error = pb.Error(code=Code.DATA_LOSS.name, reason=reason, request="")
                self.put(pb.ChatEvent(error=error).SerializeToString())
            else:
                self.end(Code.DATA_LOSS, reason)
            return
        # A replay hands kept messages to this session alone: caching their
        # encodings would only leave protobuf copies on every kept message.
        wire = encode(event) if self._replaying else event.encoded(PROTOCOL, encode)
        data = wire.chat if self.chat else wire.stream
        if data is not None and self.put(data) and isinstance(event, Message):
            self.delivered(event)

    def replay(self, message: Message) -> None:
        with self.replaying():
            self.deliver(message)

    @contextmanager
    def replaying(self) -> Iterator[None]:
        """Deliveries in this block replay history to this session only (see :meth:`deliver`).

        ``Hub.join`` with ``since_seq`` replays the kept messages straight to
        the joining session (:meth:`replay`): they are encoded without being
        cached on the stored message.
        """
        self._replaying = True
        try:
            yield
        finally:
            self._replaying = False

    def put(self, data: bytes) -> bool:
        """Queue ``data`` for the client; past the limit the stream is ended instead."""
        if self._ended:
            return False
        if self._queue.qsize() >= self.limit:
            self._hub.metrics.too_slow(PROTOCOL)
            self.end(Code.RESOURCE_EXHAUSTED, self._too_slow())
            return False
        self._queue.put_nowait(data)
        return True

    def _too_slow(self) -> str:
        reason = f"too slow: more than {self.limit} events waiting to be sent"
        if self.last_seqs:
            resume = ", ".join(f"{room} since_seq={seq}" for room, seq in sorted(self.last_seqs.items()))
            reason += f"; resume with {resume}"
        return reason

    def end(self, code: grpc.StatusCode, reason: str) -> None:
        """Leave the hub and end the call with ``code`` once the queue is drained."""
        self._hub.disconnect(self)
        if self._finish(_End(code, reason)):
            self.close_reason = reason
            log.info(
                "{peer} ({user}) grpc stream ended: {code} {why}",
                peer=self.peer,
                user=self.user or "-",
                code=code.name,
                why=reason,
            )

    def close(self, reason: str) -> None:
        self.end(Code.ABORTED, reason)

    def going_away(self, reason: str) -> None:
        self.end(Code.UNAVAILABLE, reason)

    def token_expired(self) -> None:
        self.end(Code.UNAUTHENTICATED, "token expired")

    # -- grpcio threads ----------------------------------------------------

    def _finish(self, end: _End) -> bool:
        with self._lock:
            if self._ended:
                return False
            self._ended = True
        self._queue.put_nowait(end)
        return True

    def cancelled(self) -> None:
        """The call is over (client cancel, disconnect, or done): stop and leave the hub."""
        self._finish(_End(Code.OK, "call ended"))
        self._reactor.callFromThread(self._hub.disconnect, self)

    def drain(self, context: grpc.ServicerContext) -> Iterator[bytes]:
        """The call's responses, as the reactor queues them, until the stream ends."""
        while True:
            item = self._queue.get()
            if isinstance(item, bytes):
                yield item
                continue
            if item.code is not Code.OK:
                context.abort(item.code, item.details)
            return


def truncated_metadata(joined: Joined) -> tuple[tuple[str, str], ...]:
    """Initial metadata telling a ``StreamMessages`` client its ``since_seq`` asked for lost messages."""
    return (("chatd-truncated", "true"), ("chatd-first-seq", str(joined.first_seq)))


# -- Chat client events: run on the reactor, return the reply or None ----------


def join_room(hub: Hub, session: GrpcSession, room: str, since_seq: int | None) -> Joined | defer.Deferred:
    """``hub.join`` for a gRPC stream (a resume answers with a Deferred, see ``Hub.join``)."""
    return hub.join(session, room, since_seq=since_seq)


def _chat_join(hub: Hub, session: GrpcSession, join: pb.Join) -> pb.ChatEvent | defer.Deferred:
    room = validate.room(join.room)
    # Checked before identify: a refused Join must not fix the call's user name.
    since = validate.since_seq(join.since_seq) if join.HasField("since_seq") else None
    hub.identify(session, join.user or session.user or "")

    def reply(joined: Joined) -> pb.ChatEvent:
        return pb.ChatEvent(
            joined=pb.Joined(
                room=room, user=session.user, members=joined, truncated=joined.truncated, first_seq=joined.first_seq
            )
        )

    joined = join_room(hub, session, room, since)
    if isinstance(joined, defer.Deferred):
        return joined.addCallback(reply)
    return reply(joined)


def _chat_leave(hub: Hub, session: Session, leave: pb.Leave) -> pb.ChatEvent:
    hub.leave(session, leave.room)
    return pb.ChatEvent(left=pb.Left(room=leave.room))


def _chat_send(hub: Hub, session: Session, send: pb.Send) -> defer.Deferred:
    """Publish; fires with the Sent reply once stored (sent only if the client gave a ref or client_id)."""
    room = validate.room(send.room)
    if room not in session.rooms:
        raise ChatError(f"not in room {room}: join it first")
    d = hub.publish(room, session.user, send.message, PROTOCOL, send.client_id or None, source=session)
    return d.addCallback(
        lambda m: pb.ChatEvent(sent=pb.Sent(room=room, id=m.id, seq=m.seq, client_id=send.client_id))
    )


_CHAT_REQUESTS: dict[str, Callable[[Hub, GrpcSession, Any], pb.ChatEvent | defer.Deferred | None]] = {
    "join": _chat_join,
    "leave": _chat_leave,
    "send": _chat_send,
}


class ChatServicer:
    """``chat.ChatService``: every method runs on a grpcio worker thread."""

    def __init__(self, hub: Hub, reactor: Any, queue_size: int = 1000) -> None:
        self.hub = hub
        self.reactor = reactor
        self.queue_size = queue_size

    def _on_reactor(self, f: Callable[..., Any], *args: Any) -> Any:
        return blockingCallFromThread(self.reactor, f, *args)

    # -- unary ---------------------------------------------------------------

    def SendMessage(self, request: pb.MessageRequest, context: grpc.ServicerContext) -> bytes:
        try:
            return self._on_reactor(self._publish, request, _identity(context), context.peer())
        except ChatError as e:
            abort(context, e, self.hub)
            raise  # not reached: abort raises

    def _publish(self, request: pb.MessageRequest, identity: Identity | None = None, peer: str = "") -> defer.Deferred:
        """Publish; fires with the reply once stored (``blockingCallFromThread`` waits for it).

        A one-shot call has no session: its client address (``peer``) is the
        per-connection rate's bucket, so naming a new user per call gains nothing.
        """
        d = self.hub.publish(
            request.room,
            request.user,
            request.message,
            PROTOCOL,
            request.client_id or None,
            identity,
            source=peer or None,
        )
        # Not ``message.encoded``: the fan-out (done by now, or later through a
        # broker) manages that cache; caching here would keep the reply's
        # bytes on the stored message for as long as it is kept.
        return d.addCallback(lambda message: message_response(message).SerializeToString())

    def GetStats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        return stats_response(self._on_reactor(self.hub.stats))

    # -- streams -------------------------------------------------------------

    def _open(
        self,
        context: grpc.ServicerContext,
        chat: bool,
        setup: Callable[[GrpcSession], defer.Deferred | None] | None = None,
    ) -> GrpcSession:
        try:
            session: GrpcSession = self._on_reactor(self._connect, context.peer(), chat, setup, _identity(context))
        except ChatError as e:
            abort(context, e, self.hub)
            raise  # not reached
        if not context.add_callback(session.cancelled):
            session.cancelled()  # the call ended before the callback could be added
        return session

    def _connect(
        self,
        peer: str,
        chat: bool,
        setup: Callable[[GrpcSession], defer.Deferred | None] | None,
        identity: Identity | None = None,
    ) -> GrpcSession:
        session = self._new_session(peer, chat, identity)
        try:
            self.hub.connect(session)
        except ServerFull as e:
            if getattr(self.hub, "closing", False):
                raise ShuttingDown(e.reason) from None
            raise
        try:
            ready = setup(session) if setup is not None else None
        except ChatError as e:
            return self._not_set_up(Failure(e), session)
        if isinstance(ready, defer.Deferred):
            # A resume whose history is read back from the store first.
            return ready.addCallbacks(lambda _: self._set_up(session), self._not_set_up, errbackArgs=(session,))
        return self._set_up(session)

    def _set_up(self, session: GrpcSession) -> GrpcSession:
        log.info("{peer} connected over grpc", peer=session.peer)
        return session

    def _not_set_up(self, failure: Failure, session: GrpcSession) -> GrpcSession:
        if failure.check(SessionClosed):
            # A replay too big for the queue ended the stream already: the
            # client reads what fitted, then the reason and how to resume.
            return session
        self.hub.disconnect(session)
        failure.raiseException()
        raise AssertionError("not reached")

    def _new_session(self, peer: str, chat: bool, identity: Identity | None) -> GrpcSession:
        return GrpcSession(self.hub, self.reactor, peer, self.queue_size, chat, identity)

    def _stream_join(self, request: pb.StreamRequest, joined: list[Joined]) -> Callable[[GrpcSession], None]:
        """``StreamMessages``' setup, run on the reactor: the join goes into ``joined``."""

        def join(session: GrpcSession) -> defer.Deferred | None:
            room = validate.room(request.room)
            self.hub.identify(session, request.user)
            since = validate.since_seq(request.since_seq) if request.HasField("since_seq") else None
            result = join_room(self.hub, session, room, since)
            if isinstance(result, defer.Deferred):
                return result.addCallback(joined.append)
            joined.append(result)
            return None

        return join

    def StreamMessages(self, request: pb.StreamRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        joined: list[Joined] = []
        session = self._open(context, False, self._stream_join(request, joined))
        if joined and joined[0].truncated:
            context.send_initial_metadata(truncated_metadata(joined[0]))
        yield from session.drain(context)

    def Chat(self, requests: Iterable[pb.ChatEvent], context: grpc.ServicerContext) -> Iterator[bytes]:
        session = self._open(context, True)
        reader = threading.Thread(
            target=self._read_chat, args=(session, requests), name=f"grpc-chat-{session.id}", daemon=True
        )
        reader.start()
        yield from session.drain(context)

    def _read_chat(self, session: GrpcSession, requests: Iterable[pb.ChatEvent]) -> None:
        """Feed the client's events to the reactor in order, one at a time."""
        try:
            for event in requests:
                if session.ended:
                    return
                self._on_reactor(self._chat_event, session, event)
        except grpc.RpcError:
            return  # cancelled or broken: ``cancelled`` tidies up
        except Exception:
            log.failure("gRPC Chat request failed on {session}", session=session)
            self.reactor.callFromThread(session.end, Code.INTERNAL, "internal error")
            return
        # The client closed its side: the call is complete once its sends are answered.
        self.reactor.callFromThread(self._finished, session)

    def _finished(self, session: GrpcSession) -> None:
        """The client closed its side of a ``Chat``: end it OK once every send it made has its reply.

        A half-close says "nothing more from me", not "stop answering": ended
        at once, the call dropped the ``Sent`` replies (and the client's own
        echoes) of sends still waiting for the store, although those messages
        were stored. The replies go out first, then the OK.
        """
        if not session.unanswered:
            session.end(Code.OK, "client finished")
            return
        defer.DeferredList(list(session.unanswered)).addCallback(
            lambda _: session.end(Code.OK, "client finished")
        )

    def _chat_event(self, session: GrpcSession, event: pb.ChatEvent) -> defer.Deferred | None:
        kind = event.WhichOneof("event")
        handler = _CHAT_REQUESTS.get(kind or "")
        try:
            if handler is None:
                raise ChatError(f"expected join, leave or send, not {kind or 'an empty event'}")
            reply = handler(self.hub, session, getattr(event, kind))  # type: ignore[arg-type]
        except ChatError as e:
            reply = _error_event(e, kind or "", self.hub)
        if isinstance(reply, defer.Deferred):
            # A send: the reader goes on at once; the reply follows once stored.
            # A resume: the reader waits, so its replay and reply come before
            # anything the client sends next is handled.
            def answered(answer: pb.ChatEvent) -> pb.ChatEvent | None:
                return answer if kind == "join" or event.ref or event.send.client_id else None

            def refused(failure: Failure) -> pb.ChatEvent:
                failure.trap(ChatError)
                return _error_event(failure.value, kind or "", self.hub)

            reply.addCallbacks(answered, refused).addCallback(self._reply, session, event.ref)
            reply.addErrback(lambda f: log.failure("gRPC Chat {kind} failed", f, kind=kind))
            if not reply.called:
                session.unanswered.add(reply)
                reply.addBoth(_answered, session, reply)
            return reply if kind == "join" else None
        self._reply(reply, session, event.ref)
        return None

    def _reply(self, reply: pb.ChatEvent | None, session: GrpcSession, ref: str) -> None:
        if reply is not None:
            reply.ref = ref
            session.put(reply.SerializeToString())


def _answered(result: Any, session: GrpcSession, reply: defer.Deferred) -> Any:
    session.unanswered.discard(reply)
    return result


def _error_event(error: ChatError, request: str, hub: Hub) -> pb.ChatEvent:
    """A refused ``Chat`` event: the status a unary call would end with (counted the same way), as an event."""
    code, reason = status_for(error, hub)
    return pb.ChatEvent(error=pb.Error(code=code.name, reason=reason, request=request))


def stats_response(stats: dict) -> pb.StatsResponse:
    """``hub.stats()`` (the ``/stats`` figures) as protobuf."""
    connections = dict(stats["connections"])
    total = connections.pop("total")
    messages = stats["messages"]
    return pb.StatsResponse(
        connections=total,
        connections_by_protocol=connections,
        connections_accepted=stats["connections_accepted"],
        rooms=stats["rooms"],
        messages_total=messages["total"],
        messages_per_second=messages["per_second"],
        deliveries=messages["deliveries"],
        uptime=stats["uptime"],
    )


def method_handlers(servicer: ChatServicer) -> dict[str, grpc.RpcMethodHandler]:
    """``chat.ChatService``'s handlers; message responses go out as pre-encoded bytes."""
    return {
        "SendMessage": grpc.unary_unary_rpc_method_handler(
            servicer.SendMessage, request_deserializer=pb.MessageRequest.FromString
        ),
        "StreamMessages": grpc.unary_stream_rpc_method_handler(
            servicer.StreamMessages, request_deserializer=pb.StreamRequest.FromString
        ),
        "GetStats": grpc.unary_unary_rpc_method_handler(
            servicer.GetStats,
            request_deserializer=pb.StatsRequest.FromString,
            response_serializer=pb.StatsResponse.SerializeToString,
        ),
        "Chat": grpc.stream_stream_rpc_method_handler(
            servicer.Chat, request_deserializer=pb.ChatEvent.FromString
        ),
    }


# -- token authentication ---------------------------------------------------------


def _identity(context: grpc.ServicerContext) -> Identity | None:
    """What :class:`TokenCheck` verified for this call (None when tokens are off)."""
    return getattr(context, "identity", None)


class _VerifiedContext:
    """A call's ``ServicerContext`` that also carries the caller's verified ``identity``."""

    def __init__(self, context: grpc.ServicerContext, identity: Identity) -> None:
        self._context = context
        self.identity = identity

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class TokenCheck(grpc.ServerInterceptor):
    """Every ``chat.ChatService`` call needs ``authorization: Bearer <token>`` metadata.

    Put first among the server's interceptors: a call without a valid token
    ends with ``UNAUTHENTICATED`` before anything else runs (it takes no
    stream slot and never reaches the reactor). Other services (health,
    reflection) are left open. The verified identity reaches the servicer
    on its context (:func:`_identity`).
    """

    def __init__(self, auth: Authenticator, hub: Hub) -> None:
        self._auth = auth
        self._hub = hub
        self._prefix = f"/{SERVICE_NAME}/"

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self._prefix):
            return handler
        field = _behavior_field(handler)
        identity = self.verify(handler_call_details)
        if isinstance(identity, str):
            return handler._replace(**{field: _refuse(identity)})
        inner = getattr(handler, field)

        def verified(request: Any, context: grpc.ServicerContext) -> Any:
            return inner(request, _VerifiedContext(context, identity))

        return handler._replace(**{field: verified})


    def verify(self, handler_call_details: grpc.HandlerCallDetails) -> Identity | str:
        """The caller's verified identity, or why the call is refused (counted)."""
        header = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                header = value
                break
        try:
            return self._auth.verify(bearer(header))
        except Unauthenticated as e:
            self._hub.metrics.error("unauthenticated", PROTOCOL)
            return e.reason


def _refuse(reason: str) -> Callable[[Any, grpc.ServicerContext], Any]:
    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(Code.UNAUTHENTICATED, reason)

    return refuse


def _behavior_field(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming:
        return "stream_stream" if handler.response_streaming else "stream_unary"
    return "unary_stream" if handler.response_streaming else "unary_unary"
