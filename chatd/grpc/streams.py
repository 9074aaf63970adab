"""The one count of long-lived gRPC calls, against ``--grpc-max-streams``.

Every call grpcio runs holds one of its ``--grpc-workers`` threads until the
handler returns, and past ``maximum_concurrent_rpcs`` grpcio refuses calls.
A streaming call can hold its worker for hours, so if streams could take
every worker, ``SendMessage`` and ``GetStats`` (and health ``Check``) would
be refused. :class:`StreamLimit` is a server interceptor that counts every
call that streams either way, whatever its service — ``chat.ChatService``'s
``StreamMessages`` and ``Chat``, reflection's ``ServerReflectionInfo``,
health's ``Watch`` — and refuses one past the limit with
``RESOURCE_EXHAUSTED``, so ``workers - max_streams`` workers stay free for
unary calls.

Streams are also held to ``--max-connections-per-ip`` per client address,
whatever their service: health and reflection are open to anyone (no
token), so without it one address could take every slot and lock out
authenticated clients.

A call's slot is taken when its handler starts and given back when the
handler is done (a blocking stream) or the call ends (a callback-style one,
such as grpcio's health ``Watch``, which holds no worker between messages
but is counted all the same, since each costs the server while it lasts).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from chatd.limits import AddressCount

__all__ = ["StreamLimit"]


class StreamLimit(grpc.ServerInterceptor):
    """Refuses a streaming call past ``limit`` open at once; ``open`` is the count now."""

    def __init__(self, limit: int, on_refused: Callable[[], None] | None = None, per_address: int = 0) -> None:
        self.limit = limit
        self.open = 0
        self._on_refused = on_refused
        self._lock = threading.Lock()
        #: streams open per client address (guarded by the lock), at most ``per_address`` each
        self._addresses = AddressCount(per_address)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return handler
        if handler.request_streaming and handler.response_streaming:
            return handler._replace(stream_stream=self._counted(handler.stream_stream))
        if handler.response_streaming:
            return handler._replace(unary_stream=self._counted(handler.unary_stream))
        return handler._replace(stream_unary=self._counted_unary(handler.stream_unary))

    # -- slots: any grpcio thread ---------------------------------------------

    def claim(self, peer: str) -> Callable[[], None] | str:
        """Take a slot for ``peer`` (returns what gives it back), or say why not (counted)."""
        with self._lock:
            reason = self._addresses.refusal(peer)
            if reason is None and self.open >= self.limit:
                reason = f"server full: {self.limit} gRPC streams open, try again later"
            if reason is None:
                self.open += 1
                key = self._addresses.claim(peer)
        if reason is not None:
            if self._on_refused is not None:
                self._on_refused()
            return reason
        return lambda: self._release(key)

    def _take(self, context: grpc.ServicerContext) -> Callable[[], None]:
        """Take a slot (returns what gives it back), or end the call with ``RESOURCE_EXHAUSTED`` (raises)."""
        release = self.claim(context.peer())
        if isinstance(release, str):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, release)
        return release  # type: ignore[return-value]

    def _release(self, key: str | None) -> None:
        with self._lock:
            self.open -= 1
            self._addresses.release(key)

    # -- wrappers ----------------------------------------------------------------

    def _counted(self, behavior: Any) -> Any:
        """A response-streaming handler that holds a slot while it runs."""
        if getattr(behavior, "experimental_non_blocking", False):
            return self._counted_callback_style(behavior)

        def counted(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            release = self._take(context)
            try:
                yield from behavior(request, context)
            finally:
                release()

        return counted

    def _counted_callback_style(self, behavior: Any) -> Any:
        """grpcio's callback-style stream (health ``Watch``): it returns at once and
        sends later through ``send_response_callback``, so the slot is given back
        when the call ends, not when the handler returns."""

        def counted(request: Any, context: grpc.ServicerContext, send_response_callback: Any = None) -> Any:
            release = self._take(context)
            if not context.add_callback(release):
                release()  # the call is already over
            return behavior(request, context, send_response_callback)

        counted.experimental_non_blocking = True  # type: ignore[attr-defined]
        counted.experimental_thread_pool = getattr(behavior, "experimental_thread_pool", None)  # type: ignore[attr-defined]
        return counted

    def _counted_unary(self, behavior: Any) -> Any:
        """A client-streaming call with one response: held until it returns."""

        def counted(requests: Any, context: grpc.ServicerContext) -> Any:
            release = self._take(context)
            try:
                return behavior(requests, context)
            finally:
                release()

        return counted
