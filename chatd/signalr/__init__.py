"""ASP.NET Core SignalR at ``/signalr``: official SignalR clients join chatd's rooms.

- ``protocol``: the sans-IO hub protocol codec (JSON and MessagePack framing);
- ``connection``: one connection's core (handshake, pings, timeouts, close, stateful reconnect);
- ``chat``: the chat hub's methods over :class:`chatd.hub.Hub`;
- ``transports``: negotiate, WebSockets, Server-Sent Events and long polling on ``twisted.web``.

See ``docs/signalr.md`` for what clients can call.
"""

from chatd.signalr.connection import Options
from chatd.signalr.transports import site

__all__ = ["Options", "site"]
