"""Log observers for ``twistd --logger``: one JSON object per line, for journald and log shippers.

twistd's default output is already human-readable. For machines::

    twistd --logger chatd.logs.json_observer --nodaemon --pidfile= chatd

prints lines like ``{"time": "...", "level": "info", "logger": "chatd.hub",
"message": "...", "pid": 123}``, plus ``"traceback"`` for failures. Only the
formatted message and a few fixed fields are written, never the event's
other keys, so nothing the code did not choose to say (a message body kept
in an event field, a key) reaches the log. Journald keeps the line as the
``MESSAGE`` field; ``journalctl -o cat`` gives it back as is.
"""

from __future__ import annotations

import os
import sys
from typing import IO, Any

import orjson
from twisted.logger import FileLogObserver, ILogObserver, formatEvent
from twisted.python.failure import Failure

from chatd.events import rfc3339


def event_as_json(event: dict[str, Any]) -> str:
    """One log event as a JSON line (with the newline)."""
    record: dict[str, Any] = {
        "time": rfc3339(event.get("log_time") or 0.0),
        "level": getattr(event.get("log_level"), "name", "info"),
        "logger": event.get("log_namespace", "-"),
        "message": formatEvent(event),
        "pid": os.getpid(),
    }
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        record["traceback"] = failure.getTraceback()
    return orjson.dumps(record, default=str).decode() + "\n"


def json_observer(out: IO[str] | None = None) -> ILogObserver:
    """The ``--logger`` factory: JSON lines to standard output.

    twistd calls this before it redirects ``sys.stdout`` into the log, so
    the real standard output is captured here.
    """
    return FileLogObserver(out or sys.stdout, event_as_json)
