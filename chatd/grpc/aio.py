"""``--grpc-server aio``: the gRPC service on ``grpc.aio``, one asyncio loop on a thread of its own.

grpcio's threaded server holds one worker thread per open stream, and the
cost of every delivery grows with the number of threads. Here every call is
a coroutine on one asyncio loop, so an open stream costs a coroutine and its
queue, not a thread. The split of ownership is the threaded bridge's:

- The reactor owns the hub; the aio loop owns every grpcio object. Calls reach
  the hub through ``reactor.callFromThread`` and their answers come back
  through ``loop.call_soon_threadsafe`` (:meth:`AioChatServicer._on_reactor`):
  neither thread ever waits on the other.
- A stream is an :class:`AioGrpcSession`: the shared :class:`GrpcSession`
  logic (encoding once, the slow-stream bound, resume hints, how a stream
  ends) over a queue the reactor appends to without a lock. Waking the
  streams' coroutines goes through one :class:`Outbox` per loop: however
  many streams a fan-out reaches, it costs one ``call_soon_threadsafe``
  (one wake-up of the loop), not one per stream.
- Token checks and stream slots are the threaded server's
  (:class:`~chatd.grpc.bridge.TokenCheck`, :class:`~chatd.grpc.streams.StreamLimit`),
  as ``grpc.aio`` interceptors.
- Every delivery is one ``context.write`` that waits for grpc's completion,
  which grpc's poller thread hands to the loop through a socket, one byte per
  completion. That hand-off, not chatd's code, was most of a gRPC delivery's
  cost: :class:`GrpcLoop` reads those bytes in one go. (Running the loop
  thread in ``SCHED_BATCH`` cut it further, but gRPC streams of a busy
  process then fell behind the reactor and were closed as too slow: the
  daemon does not; the bench's load client does, ``bench/client.py``.)
"""

from __future__ import annotations

import array
import asyncio
import collections
import concurrent.futures
import fcntl
import functools
import inspect
import os
import termios
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer
from twisted.internet import defer
from twisted.logger import Logger

from chatd.auth import Identity
from chatd.grpc.bridge import (
    SERVICE_NAME,
    ChatServicer,
    GrpcSession,
    TokenCheck,
    _behavior_field,
    _End,
    _identity,
    _VerifiedContext,
    stats_response,
    status_for,
    truncated_metadata,
)
from chatd.grpc.generated import chat_pb2 as pb
from chatd.grpc.service import GrpcService
from chatd.grpc.streams import StreamLimit
from chatd.hub import Joined
from chatd.validate import ChatError

log = Logger()

Code = grpc.StatusCode


# -- the loop -----------------------------------------------------------------------


def _drain_first(sock: Any, handler: Callable[[], Any]) -> Callable[[], None]:
    """``handler`` (``grpc.aio``'s reader of its wake-up socket) after taking all but one waiting byte.

    grpc's poller thread writes one byte per completed operation after
    queueing it; grpc's reader takes one byte, then empties the whole queue.
    With N bytes waiting the loop came back N times (N ``epoll_wait`` and N
    ``recv``) to find the queue empty. Every byte taken here was written after
    its event was queued, so the handler run just after hands that event out;
    the byte left is the one the handler reads itself.
    """
    fd = sock if isinstance(sock, int) else sock.fileno()
    waiting = array.array("i", [0])

    def read() -> None:
        fcntl.ioctl(fd, termios.FIONREAD, waiting)
        extra = waiting[0] - 1
        while extra > 0:
            extra -= len(os.read(fd, min(extra, 65536)))
        handler()

    return read


def _is_grpc_wakeup(callback: Any) -> bool:
    """``grpc.aio``'s reader of its poller's socket: ``partial(PollerCompletionQueue._handle_events, loop)``."""
    return (
        isinstance(callback, functools.partial) and getattr(callback.func, "__name__", "") == "_handle_events"
    )


class GrpcLoop(asyncio.SelectorEventLoop):
    """The aio loop; reads grpc's wake-up socket in one go (:func:`_drain_first`)."""

    def add_reader(self, fd: Any, callback: Callable[..., Any], *args: Any) -> None:
        if _is_grpc_wakeup(callback) and not args:
            callback = _drain_first(fd, callback)
        super().add_reader(fd, callback, *args)


class _Loop:
    """The process's one asyncio loop for ``grpc.aio``, on a daemon thread, started on first use.

    One loop for every aio server of the process (``grpc.aio`` binds its
    completion queue to a loop); a daemon thread cannot hold up the exit.
    """

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None:
                loop = GrpcLoop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                threading.Thread(target=run, name="grpc-aio", daemon=True).start()
                ready.wait()
                cls._loop = loop
            return cls._loop


def _to_deferred(reactor: Any, future: Any) -> defer.Deferred:
    """A Deferred on the reactor for a ``concurrent.futures.Future`` completed on the loop."""
    d: defer.Deferred = defer.Deferred()

    def done(f: Any) -> None:
        error = f.exception()
        if error is None:
            reactor.callFromThread(d.callback, f.result())
        else:
            reactor.callFromThread(d.errback, error)

    future.add_done_callback(done)
    return d


# -- streams --------------------------------------------------------------------------


class Outbox:
    """Wakes the coroutines of streams that have something new, one loop wake-up per batch.

    :meth:`wake` runs on the reactor (or the loop); :meth:`_flush` on the
    loop. No lock: a queue is flagged before it is listed, and unflagged
    before its coroutine is woken, so a wake that sees the flag set is
    always followed by a wake-up that sees its item.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._ready: collections.deque[_AioQueue] = collections.deque()
        self._scheduled = False

    def wake(self, q: _AioQueue) -> None:
        if q.flagged:
            return
        q.flagged = True
        self._ready.append(q)
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        ready = self._ready
        while ready:
            q = ready.popleft()
            q.flagged = False
            waiter = q.waiter
            if waiter is not None:
                q.waiter = None
                if not waiter.done():  # not cancelled with its call
                    waiter.set_result(None)


class _AioQueue:
    """A stream's responses: appended by the reactor, taken by the call's coroutine.

    ``GrpcSession`` bounds it (``qsize``) and ends it with an ``_End``.
    """

    def __init__(self, outbox: Outbox) -> None:
        self.items: collections.deque[bytes | _End] = collections.deque()
        #: what the call's coroutine awaits when it has sent everything (made and resolved on the loop)
        self.waiter: asyncio.Future | None = None
        self.flagged = False
        self._outbox = outbox

    def qsize(self) -> int:
        return len(self.items)

    def put_nowait(self, item: bytes | _End) -> None:
        self.items.append(item)
        self._outbox.wake(self)


class AioGrpcSession(GrpcSession):
    """A :class:`GrpcSession` whose call is a coroutine on the aio loop (:meth:`send_all`, not ``drain``)."""

    def __init__(self, outbox: Outbox, *args: Any, **kwargs: Any) -> None:
        self._outbox = outbox
        super().__init__(*args, **kwargs)

    def _new_queue(self, limit: int) -> _AioQueue:
        return _AioQueue(self._outbox)

    async def send_all(self, context: grpc.aio.ServicerContext) -> None:
        """Write the call's responses as the reactor queues them, until the stream ends.

        Each ``context.write`` waits until grpc has taken the message, so at
        most one is in flight per stream and the queue is where a slow
        reader's backlog shows (and is bounded). Written from this one
        coroutine rather than yielded through the handler's async generators:
        every layer of ``async for`` cost a few microseconds per delivery.
        """
        q: _AioQueue = self._queue
        items = q.items
        write = context.write
        loop = asyncio.get_running_loop()
        while True:
            while items:
                item = items.popleft()
                if type(item) is bytes:
                    await write(item)
                    continue
                if item.code is not Code.OK:
                    await context.abort(item.code, item.details)
                return
            # Nothing left: wait for the Outbox. It runs on this loop too, so it
            # either ran before (and the item is already here) or finds the waiter.
            q.waiter = waiter = loop.create_future()
            try:
                await waiter
            finally:
                q.waiter = None


# -- the servicer ---------------------------------------------------------------------


class AioChatServicer(ChatServicer):
    """``chat.ChatService`` as coroutines on the aio loop; the hub work is :class:`ChatServicer`'s."""

    loop: asyncio.AbstractEventLoop
    outbox: Outbox

    def use_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve on ``loop``: given at start, not when made (``twistd`` may fork in between)."""
        self.loop = loop
        self.outbox = Outbox(loop)

    def _on_reactor(self, f: Callable[..., Any], *args: Any) -> asyncio.Future:  # type: ignore[override]
        """Run ``f(*args)`` on the reactor; the future (on the loop) gets its result or error."""
        loop = self.loop
        future = loop.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            if future.done():
                return  # the call was cancelled meanwhile
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

        def run() -> None:
            d = defer.maybeDeferred(f, *args)
            d.addCallbacks(
                lambda result: loop.call_soon_threadsafe(settle, result, None),
                lambda failure: loop.call_soon_threadsafe(settle, None, failure.value),
            )

        self.reactor.callFromThread(run)
        return future

    def _new_session(self, peer: str, chat: bool, identity: Identity | None) -> GrpcSession:
        return AioGrpcSession(self.outbox, self.hub, self.reactor, peer, self.queue_size, chat, identity)

    async def _abort(self, context: grpc.aio.ServicerContext, error: ChatError) -> None:
        await context.abort(*status_for(error, self.hub))

    # -- unary ---------------------------------------------------------------

    async def SendMessage(self, request: pb.MessageRequest, context: grpc.aio.ServicerContext) -> bytes:  # type: ignore[override]
        try:
            return await self._on_reactor(self._publish, request, _identity(context), context.peer())
        except ChatError as e:
            await self._abort(context, e)
            raise  # not reached: abort raises

    async def GetStats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext) -> pb.StatsResponse:  # type: ignore[override]
        return stats_response(await self._on_reactor(self.hub.stats))

    # -- streams -------------------------------------------------------------

    async def _open_aio(
        self, context: grpc.aio.ServicerContext, chat: bool, setup: Callable[[GrpcSession], None] | None = None
    ) -> AioGrpcSession:
        connected = self._on_reactor(self._connect, context.peer(), chat, setup, _identity(context))
        try:
            return await asyncio.shield(connected)
        except asyncio.CancelledError:
            # The call ended while the reactor connected it: the session leaves once made.
            connected.add_done_callback(_leave_when_made)
            raise
        except ChatError as e:
            await self._abort(context, e)
            raise  # not reached

    async def StreamMessages(  # type: ignore[override]
        self, request: pb.StreamRequest, context: grpc.aio.ServicerContext
    ) -> None:
        joined: list[Joined] = []
        session = await self._open_aio(context, False, self._stream_join(request, joined))
        try:
            if joined and joined[0].truncated:
                await context.send_initial_metadata(truncated_metadata(joined[0]))
            await session.send_all(context)
        finally:
            session.cancelled()

    async def Chat(  # type: ignore[override]
        self, requests: AsyncIterator[pb.ChatEvent], context: grpc.aio.ServicerContext
    ) -> None:
        session = await self._open_aio(context, True)
        reader = asyncio.ensure_future(self._read_chat_aio(session, requests))
        try:
            await session.send_all(context)
        finally:
            reader.cancel()
            session.cancelled()

    async def _read_chat_aio(self, session: GrpcSession, requests: AsyncIterator[pb.ChatEvent]) -> None:
        """Feed the client's events to the reactor in order, one at a time."""
        try:
            async for event in requests:
                if session.ended:
                    return
                await self._on_reactor(self._chat_event, session, event)
        except (grpc.RpcError, grpc.aio.AbortError, asyncio.CancelledError):
            # Cancelled or broken: the handler tidies up. AbortError: the call was
            # ended from this side (shutdown, too slow, an operator) while this read
            # waited; it was logged as a failure, one critical traceback per open
            # Chat at every drain.
            return
        except Exception:
            log.failure("gRPC Chat request failed on {session}", session=session)
            self.reactor.callFromThread(session.end, Code.INTERNAL, "internal error")
            return
        # The client closed its side: the call is complete once its sends are answered.
        self.reactor.callFromThread(self._finished, session)


def _leave_when_made(connected: asyncio.Future) -> None:
    if not connected.cancelled() and connected.exception() is None:
        connected.result().cancelled()


# -- interceptors ---------------------------------------------------------------------


def _wrapped(behavior: Any, before: Callable[[Any], Coroutine[Any, Any, Any]]) -> Any:
    """``behavior`` run after ``await before(context)``, which returns the context to pass on
    and what to call once the call is over (or None).

    ``grpc.aio`` tells a coroutine handler from an async generator (and runs
    plain functions on threads), so the wrapper is of the same kind.
    """
    if inspect.isasyncgenfunction(behavior):

        async def generator(request: Any, context: Any) -> AsyncIterator[Any]:
            context, after = await before(context)
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                if after is not None:
                    after()

        return generator

    async def coroutine(request: Any, context: Any) -> Any:
        context, after = await before(context)
        try:
            return await behavior(request, context)
        finally:
            if after is not None:
                after()

    return coroutine


class AioTokenCheck(TokenCheck, grpc.aio.ServerInterceptor):
    """:class:`TokenCheck` for ``grpc.aio``: the same rule, the same refusal."""

    async def intercept_service(  # type: ignore[override]
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self._prefix):
            return handler
        field = _behavior_field(handler)
        identity = self.verify(handler_call_details)

        async def before(context: Any) -> tuple[Any, None]:
            if isinstance(identity, str):
                await context.abort(Code.UNAUTHENTICATED, identity)
            return _VerifiedContext(context, identity), None  # type: ignore[arg-type]

        return handler._replace(**{field: _wrapped(getattr(handler, field), before)})


class AioStreamLimit(StreamLimit, grpc.aio.ServerInterceptor):
    """:class:`StreamLimit` for ``grpc.aio``: a slot is held while a streaming call's coroutine runs."""

    async def intercept_service(  # type: ignore[override]
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return handler
        field = _behavior_field(handler)

        async def before(context: Any) -> tuple[Any, Callable[[], None]]:
            release = self.claim(context.peer())
            if isinstance(release, str):
                await context.abort(Code.RESOURCE_EXHAUSTED, release)
            return context, release  # type: ignore[return-value]

        return handler._replace(**{field: _wrapped(getattr(handler, field), before)})


# -- health -------------------------------------------------------------------------


class AioHealthServicer(HealthServicer):
    """grpcio's aio health servicer whose ``Watch`` writes without holding the service's lock.

    grpcio's ``Watch`` awaits ``context.write`` inside ``async with condition``,
    and ``set`` takes that condition before it records a status: one client
    that opens a ``Watch`` and grants no flow-control window (HTTP/2
    ``INITIAL_WINDOW_SIZE`` 0; health needs no token) held it for good, so
    the status never changed again and ``Check`` answered SERVING through a
    store failure or a drain. Here the condition is held only to wait.
    """

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> None:  # type: ignore[override]
        service = request.service
        condition = self._server_watchers[service]
        self._watcher_count_by_service[service] += 1
        unknown = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        last = None
        try:
            while True:
                status = self._server_status.get(service, unknown)
                if status != last:
                    last = status
                    await context.write(health_pb2.HealthCheckResponse(status=status))
                    continue  # it may have changed while the write waited
                async with condition:
                    if self._server_status.get(service, unknown) == last:
                        await condition.wait()
        finally:
            self._watcher_count_by_service[service] -= 1
            if self._watcher_count_by_service[service] == 0:
                del self._server_watchers[service]
                del self._watcher_count_by_service[service]


# -- the service ----------------------------------------------------------------------


class AioGrpcService(GrpcService):
    """:class:`GrpcService` on ``grpc.aio``: same services, options, health and shutdown."""

    kind = "aio"
    stream_limit = AioStreamLimit
    token_check = AioTokenCheck

    loop: asyncio.AbstractEventLoop
    servicer: AioChatServicer
    #: the server's start, queued on the loop (see :meth:`_stop`)
    _starting: concurrent.futures.Future | None = None

    def _new_servicer(self, queue_size: int) -> ChatServicer:
        return AioChatServicer(self.hub, self.reactor, queue_size=queue_size)

    def _new_health(self) -> Any:
        return AioHealthServicer()

    def _new_server(self, interceptors: tuple[Any, ...], options: list[tuple[str, int]]) -> Any:
        """Built on the loop (``grpc.aio`` binds a server to the loop it is made on).

        The reactor waits for it: this runs once, at start, before any client.
        The loop's thread starts here, not earlier: ``twistd`` makes the
        service before it forks into the background, and a thread does not
        survive a fork.
        """
        self.loop = _Loop.get()
        self.servicer.use_loop(self.loop)

        async def build() -> Any:
            return grpc.aio.server(interceptors=interceptors, options=options)

        return asyncio.run_coroutine_threadsafe(build(), self.loop).result()

    def _start_server(self, server: Any) -> None:
        started = self._starting = asyncio.run_coroutine_threadsafe(server.start(), self.loop)
        _to_deferred(self.reactor, started).addErrback(lambda f: log.failure("gRPC aio server failed to start", f))

    def _set_status(self, status: int) -> None:
        async def set_all() -> None:
            for name in ("", SERVICE_NAME):
                await self.health.set(name, status)

        done = asyncio.run_coroutine_threadsafe(set_all(), self.loop)
        _to_deferred(self.reactor, done).addErrback(lambda f: log.failure("gRPC health update failed", f))

    def _enter_shutdown(self) -> None:
        done = asyncio.run_coroutine_threadsafe(self.health.enter_graceful_shutdown(), self.loop)
        _to_deferred(self.reactor, done).addErrback(lambda f: log.failure("gRPC health shutdown failed", f))

    def _stop(self, server: Any) -> defer.Deferred:
        """``server.stop(grace)`` on the loop once its start has run: the streams' ends queued just before go out first.

        ``server.start()`` only queues grpc core's start on the loop (a task's
        first step); a stop that came right after the start (a SIGTERM at
        once, a test's teardown) ran ahead of it, and core then started a
        server whose listeners the shutdown had already released: SIGSEGV.
        So the stop waits for the start, whatever its outcome.
        """
        starting, self._starting = self._starting, None

        async def stop() -> None:
            if starting is not None:
                await asyncio.wait([asyncio.wrap_future(starting)])
            await server.stop(self.grace)

        return _to_deferred(self.reactor, asyncio.run_coroutine_threadsafe(stop(), self.loop))


__all__ = ["AioChatServicer", "AioGrpcService", "AioGrpcSession", "AioHealthServicer", "GrpcLoop", "Outbox"]
