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
import re
import sys
from typing import IO, Any

import orjson
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)
from twisted.python.failure import Failure
from twisted.web.http import HTTPFactory

from chatd.events import rfc3339

#: this process's log format, as its ``--logger`` chose it: a ``--workers`` supervisor passes it on
FORMAT = "text"
#: set in a worker's environment: the supervisor's log format (see worker_observer)
FORMAT_ENV = "CHATD_LOG_FORMAT"


def event_as_json(event: dict[str, Any], worker: int | None = None) -> str:
    """One log event as a JSON line (with the newline); ``worker``: the ``--workers`` number of this process."""
    record: dict[str, Any] = {
        "time": rfc3339(event.get("log_time") or 0.0),
        "level": getattr(event.get("log_level"), "name", "info"),
        "logger": event.get("log_namespace", "-"),
        "message": formatEvent(event),
        "pid": os.getpid(),
    }
    if worker is not None:
        record["worker"] = worker
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        record["traceback"] = failure.getTraceback()
    return orjson.dumps(record, default=str).decode() + "\n"


def json_observer(out: IO[str] | None = None) -> ILogObserver:
    """The ``--logger`` factory: JSON lines to standard output.

    twistd calls this before it redirects ``sys.stdout`` into the log, so
    the real standard output is captured here.
    """
    global FORMAT
    FORMAT = "json"
    return FileLogObserver(out or sys.stdout, event_as_json)


def worker_observer(out: IO[str] | None = None, environ: Any = None) -> ILogObserver:
    """The ``--logger`` of a ``--workers`` worker: its supervisor's format, each line saying which worker wrote it.

    Workers write to the standard output they share with the supervisor
    (the journal), each line whole, so a line is never held up or lost
    by another process (a supervisor that died, say): the text log as
    twistd writes it, its system field ``worker 1: chatd.redis#info``;
    or, when the supervisor logs JSON (``--logger chatd.logs.json_observer``),
    the same JSON with ``"worker": 1``.
    """
    from chatd.workers import worker_index  # not at the top: chatd.workers imports this module

    env = environ if environ is not None else os.environ
    index = worker_index(env) or 0
    if env.get(FORMAT_ENV) == "json":
        return FileLogObserver(out or sys.stdout, lambda event: event_as_json(event, index))

    def as_text(event: dict[str, Any]) -> str | None:
        system = event.get("log_system")
        if system is None:
            level = getattr(event.get("log_level"), "name", "-")
            system = f"{event.get('log_namespace', '-')}#{level}"
        return formatEventAsClassicLogText(
            {**event, "log_system": f"worker {index}: {system}"},
            formatTime=lambda when: formatTime(when, timeFormatRFC3339),
        )

    return FileLogObserver(out or sys.stdout, as_text)


def printable(value: object, limit: int = 200) -> str:
    """Client-supplied text made safe for one log line.

    Peers choose close reasons, error strings and header values; a raw
    newline in one would forge a log line, and other control characters
    confuse terminals. C0 and C1 controls, DEL and the Unicode line and
    paragraph separators are written as escapes (``\\n``, ``\\x1b``,
    ``\\u2028``), and the text is cut at ``limit`` characters.
    """
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")

#: the longest header or path an access-log line keeps (they are client text)
ACCESS_FIELD_LIMIT = 1024


def _quoted(value: bytes | str | None) -> str:
    """A field of the access line: backslash and quote escaped, then controls (never raw)."""
    if value is None:
        return "-"
    if isinstance(value, bytes):
        value = value.decode("ascii", "backslashreplace")
    return printable(value.replace("\\", "\\\\").replace('"', '\\"'), ACCESS_FIELD_LIMIT)


def access_log_formatter(timestamp: str, request: Any) -> str:
    """The combined access-log line, without query strings.

    Query strings carry secrets here (SignalR's ``id=`` connection token,
    ``access_token=``), and access lines are logged at info level, so only
    the path is written, for the request and for the referrer alike. Every
    client-chosen field (path, referrer, User-Agent...) is quoted with its
    control characters escaped, so no header can forge or garble a line.
    """
    path = request.uri.split(b"?", 1)[0]
    referrer = request.getHeader(b"referer")
    if referrer is not None:
        referrer = referrer.split(b"?", 1)[0]
    return '"{ip}" - - {ts} "{method} {path} {proto}" {code} {length} "{ref}" "{agent}"'.format(
        ip=_quoted(getattr(request.getClientAddress(), "host", "-")),
        ts=timestamp,
        method=_quoted(request.method),
        path=_quoted(path),
        proto=_quoted(request.clientproto),
        code=int(request.code),
        length=request.sentLength or "-",
        ref=_quoted(referrer),
        agent=_quoted(request.getHeader(b"user-agent")),
    )


def redact_access_logs(services: Any) -> int:
    """Give every web site in the service tree the query-free access log; returns how many.

    Applied to the tree rather than in each listener's module so that every
    HTTP listener, whoever wrote it, gets it.
    """
    count = 0
    for service in services:
        site = getattr(service, "factory", None)
        if isinstance(site, HTTPFactory):
            site._logFormatter = access_log_formatter
            count += 1
    return count
