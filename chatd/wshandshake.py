"""Read the plain case of a WebSocket opening handshake without Autobahn's general parser.

Every client connection starts with one HTTP request head, and a real
client (a browser, the ``websockets`` library, Go's gorilla, Autobahn's
own client) writes it the same way: ``GET /ws HTTP/1.1``, a handful of
header lines of printable ASCII, ``Upgrade: websocket``, ``Connection:
Upgrade``, ``Sec-WebSocket-Version: 13`` and a fresh 24-character key.
Autobahn reads it through ``parseHttpHeader`` (three regular expressions
per line), ``urlparse``, a chain of checks written for every protocol
version and option it has, and then calls ``onConnect`` through a
Deferred: profiled in a reconnect storm (W5), a fifth of the server's
CPU per connection.

:class:`FastHandshake` checks the whole head at once, with two regular
expressions over its bytes (request line; header block: token names,
printable ASCII values, CRLF line ends), splits it once, and runs
Autobahn's own checks on the result in the same order, with the same
values, leaving every attribute Autobahn sets (``http_headers``,
``http_request_path``, ``http_request_params``, ``websocket_version``,
``websocket_protocols``, ``websocket_extensions``, ...) as Autobahn would.
It then calls ``onConnect`` directly with the same ``ConnectionRequest``
(so chatd's Origin and token checks run once, unchanged) and finishes
with Autobahn's own ``succeedHandshake`` (the 101, extension offers, the
handshake timer, auto-ping, ``onOpen``, any bytes that followed the head)
or ``failHandshake`` (a refusal from ``onConnect``).

Everything else goes to Autobahn's ``processHandshake`` untouched, before
anything has been changed, so its answers stay exactly what they were:
another method, HTTP version or WebSocket version, a path with ``;``
parameters or a fragment, a tab, a control or non-ASCII byte or an
obsolete folded line anywhere in the head, a missing or malformed key or
Host, a Host port that does not parse, an Origin Autobahn would refuse,
a repeated header Autobahn requires once, a repeated subprotocol, no
``websocket`` in Upgrade or no ``upgrade`` in Connection, trusted
``X-Forwarded-For``, Autobahn's own connection limit reached. Those are
refusals (400, 403, 426, 505 ...) or status pages, where speed does not
matter and Autobahn's exact wording does.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs

import txaio
from autobahn.websocket.protocol import _is_same_origin, _url_to_origin
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.python.failure import Failure

__all__ = ["FastHandshake"]

#: ``GET <target> HTTP/1.1`` with an origin-form target: printable ASCII, no space or ``#``
_REQUEST_LINE = re.compile(rb"GET /[!\"$-~]* HTTP/1\.1\r\n")
#: header lines as RFC 9110 and Autobahn's strict parser want them, minus tabs and obs-text
_HEADER_LINES = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[ -~]*\r\n)*")
#: 16 random bytes in base64, as Autobahn checks them (22 alphabet characters, then ``==``)
_KEY = re.compile(r"[A-Za-z0-9+/]{22}==")
#: headers Autobahn refuses to see twice
_ONCE = frozenset(
    ("host", "sec-websocket-version", "origin", "sec-websocket-key", "sec-websocket-extensions")
)


def _lists(value: str, token: str) -> bool:
    """Whether the comma-separated header ``value`` holds ``token`` (lower case), as Autobahn reads it."""
    return value.lower() == token or any(part.strip().lower() == token for part in value.split(","))


class FastHandshake:
    """Mixin for :class:`chatd.websocket.ServerProtocol`: the plain handshake read here (see the module docstring).

    Must come before ``ServerProtocol`` in the bases; its ``_read_handshake``
    is the step taken over, so what ``ServerProtocol`` does around it (the
    handshake timer, dropping the request once open) applies either way.
    """

    def _read_handshake(self) -> None:
        if not self._plain_handshake():
            super()._read_handshake()

    def _plain_handshake(self) -> bool:
        """Take the handshake if it is the plain case; False, having changed nothing, if not."""
        data = self.data
        end = data.find(b"\r\n\r\n")
        if end < 0 or not _REQUEST_LINE.match(data):
            return False
        line_end = data.index(b"\r\n")
        if not _HEADER_LINES.fullmatch(data, line_end + 2, end + 2):
            return False
        lines = data[:end].decode("latin-1").split("\r\n")
        target = lines[0][4:-9]
        headers: dict[str, str] = {}
        repeated = False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            key = name.lower()
            value = value.strip(" ")
            if key in headers:  # joined as Autobahn does; some must not repeat (below)
                headers[key] += f", {value}"
                repeated = repeated or key in _ONCE
            else:
                headers[key] = value
        if repeated or (self.trustXForwardedFor and "x-forwarded-for" in headers):
            return False

        path, _, query = target.partition("?")
        if ";" in path or path.startswith("//"):  # urlparse would read parameters or a host there
            return False
        host = headers.get("host")
        if host is None:
            return False
        factory = self.factory
        if ":" in host and not host.endswith("]"):
            host, port = host.rsplit(":", 1)
            try:
                number = int(port.strip())
            except ValueError:
                return False
            if factory.externalPort and number != factory.externalPort:
                return False
        upgrade = headers.get("upgrade")
        connection = headers.get("connection")
        if (
            upgrade is None
            or connection is None
            or not _lists(upgrade, "websocket")
            or not _lists(connection, "upgrade")
        ):
            return False
        if headers.get("sec-websocket-version") != "13" or 13 not in self.versions:
            return False
        offered = headers.get("sec-websocket-protocol")
        protocols = [] if offered is None else [p.strip() for p in offered.split(",")]
        if len(set(protocols)) != len(protocols):
            return False
        origin = headers.get("origin")
        if origin is not None:
            try:
                seen = _url_to_origin(origin)
            except ValueError:
                return False
            if not (seen == "null" and factory.allowNullOrigin) and not _is_same_origin(
                seen, "https" if factory.isSecure else "http", factory.externalPort or factory.port,
                self.allowedOriginsPatterns,
            ):  # fmt: skip
                return False
        key = headers.get("sec-websocket-key")
        if key is None or not _KEY.fullmatch(key):
            return False
        if self.maxConnections > 0 and factory.countConnections > self.maxConnections:
            return False
        extensions = headers.get("sec-websocket-extensions")

        # The plain case: from here on, Autobahn's state and Autobahn's steps.
        self.http_request_data = data[: end + 4]
        self.data = data[end + 4 :]
        self.http_status_line = lines[0]
        self.http_headers = headers
        self.http_request_uri = target
        self.http_request_path = path
        self.http_request_params = parse_qs(query) if query else {}
        self.http_request_host = host
        self.websocket_version = 13
        self.websocket_protocols = protocols
        self.websocket_origin = origin = origin or ""
        self.websocket_extensions = [] if extensions is None else self._parseExtensionsHeader(extensions)
        self._wskey = key
        request = ConnectionRequest(
            self.peer,
            headers,
            host,
            path,
            self.http_request_params,
            13,
            origin,
            protocols,
            self.websocket_extensions,
        )
        try:
            answer = self.onConnect(request)
        except Exception:
            self._connect_failed(Failure())
            return True
        if answer is None or isinstance(answer, (str, tuple)):
            self.succeedHandshake(answer)
        else:  # an answer still to come: as Autobahn waits for it
            txaio.add_callbacks(txaio.as_future(lambda: answer), self.succeedHandshake, self._connect_failed)
        return True

    def _connect_failed(self, failure: Failure) -> None:
        """``onConnect`` refused or failed: Autobahn's answer to that (its handler is local to ``processHandshake``)."""
        if isinstance(failure.value, ConnectionDeny):
            self.failHandshake(failure.value.reason, failure.value.code)
            return
        self.log.warn("Unexpected exception in onConnect ['{err.value}']", err=failure)
        self.log.warn("{tb}", tb=txaio.failure_format_traceback(failure))
        self.failHandshake(f"Internal server error: {failure.value}", ConnectionDeny.INTERNAL_SERVER_ERROR)
