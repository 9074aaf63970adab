"""chatd.ordered.InOrder: a connection's requests keep their order while one waits for the store."""

from __future__ import annotations

from twisted.internet import defer

from chatd.ordered import InOrder


class Handler:
    def __init__(self) -> None:
        self.handled: list[str] = []
        self.refused: list[str] = []
        self.reads: dict[str, defer.Deferred] = {}

    def handle(self, request: str) -> defer.Deferred | None:
        self.handled.append(request)
        if request.startswith("read"):
            self.reads[request] = defer.Deferred()
            return self.reads[request]
        if request.startswith("instant"):
            return defer.succeed(None)  # a read answered from memory holds nothing
        return None


def test_requests_after_a_pending_read_wait_for_it_and_keep_their_order() -> None:
    h = Handler()
    gate = InOrder(h.handle, limit=10, on_full=h.refused.append)
    for r in ("a", "instant", "read1", "b", "read2", "c"):
        gate.submit(r)
    assert h.handled == ["a", "instant", "read1"] and gate.waiting == 3
    h.reads["read1"].callback("answer")
    assert h.handled == ["a", "instant", "read1", "b", "read2"] and gate.waiting == 1
    gate.submit("d")
    h.reads["read2"].errback(RuntimeError("store down"))  # a failed read releases the queue too
    h.reads["read2"].addErrback(lambda f: None)
    assert h.handled[-2:] == ["c", "d"] and gate.waiting == 0
    gate.submit("e")
    assert h.handled[-1] == "e" and h.refused == []


def test_past_the_limit_requests_are_refused_not_queued() -> None:
    h = Handler()
    gate = InOrder(h.handle, limit=2, on_full=h.refused.append)
    for r in ("read", "a", "b", "c"):
        gate.submit(r)
    assert h.refused == ["c"] and gate.waiting == 2
    h.reads["read"].callback(None)
    assert h.handled == ["read", "a", "b"]
