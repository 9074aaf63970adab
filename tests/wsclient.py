"""A small blocking test client over the ``websockets`` library (not ours)."""

from __future__ import annotations

import json
from typing import Any

from websockets.sync.client import connect


class Client:
    """One WebSocket connection speaking chatd's JSON protocol."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        # Read everything as it comes (no client-side backpressure), so closing
        # never waits behind frames the test did not care to read.
        kwargs.setdefault("max_queue", None)
        self._cm = connect(url, open_timeout=10, **kwargs)
        self.ws = self._cm.__enter__()

    def send(self, **body: Any) -> None:
        self.ws.send(json.dumps(body))

    def send_raw(self, data: str | bytes) -> None:
        self.ws.send(data)

    def recv(self, timeout: float = 10) -> dict:
        return json.loads(self.ws.recv(timeout=timeout))

    def recv_until(self, pred, timeout: float = 10) -> dict:
        """Read frames until one matches ``pred``; returns it."""
        while True:
            frame = self.recv(timeout)
            if pred(frame):
                return frame

    def recv_type(self, kind: str, timeout: float = 10) -> dict:
        return self.recv_until(lambda f: f.get("type") == kind, timeout)

    def join(self, room: str, user: str) -> dict:
        self.send(type="join", room=room, user=user)
        return self.recv_type("joined")

    def close(self) -> None:
        self.ws.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
