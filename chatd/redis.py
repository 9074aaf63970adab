"""``--redis``: history, order, fan-out and presence shared by every chatd process.

One :class:`RedisBackplane` per process is both the hub's store and its
broker. It keeps two connections to Redis (txredisapi protocols, each kept up
by a Twisted ``ClientService`` with backoff):

* **commands**: a Lua script numbers a message (``INCR``), keeps it
  (a sorted set per room, score = seq, trimmed to ``--history-limit`` and
  ``--history-max-age``), remembers its ``client_id`` and ``PUBLISH``\\ es it,
  all in one atomic step. Two processes never hand out the same ``seq``, a
  retried ``client_id`` is found whichever process stored it first, and a
  message is published only if it is stored;
* **events**: a subscription to one channel. Every process delivers every
  room's messages from it, in the order Redis ran the scripts, i.e. in
  ``seq`` order. A message reaches the windows (history, resume) and the
  local sessions only through this path; a sender is acknowledged once its
  own message has come back (or at once if the subscription is down: the
  message is stored, and catch-up will deliver it).

Nothing acknowledged is lost when Redis goes away: a publish that cannot
reach Redis fails (the sender gets an error in its protocol's form, never a
false ``sent``), ``/health`` answers 503 with the reason (a ``PING`` round
trip every second), both connections reconnect with backoff, and on every
(re)subscription the process catches up from the sorted sets before it
delivers anything live, so a subscriber that missed messages while away
delivers them, in order, before the next live one. A jump in ``seq`` on a
live subscription (a lost publish) is filled the same way. A room being read
back or filled while the subscription drops is fetched again when that sync
ends (each sync notes the subscription's generation it began under); nothing
is delivered past a gap, and a range Redis no longer has is reported to the
room's members (``truncated``), never skipped in silence.

Only the rooms someone here is in are in memory (``chatd.store``): catch-up
covers those; any other room is read back from Redis (its ``seq`` counter
and sorted set, its live events held meanwhile) when someone joins it or
asks for its history, and its events are ignored until then.

Presence: each process counts its own users per room in one hash
(``chatd:presence``, field ``proc \\n room \\n user``) and says so on the
channel; every process mirrors the other processes' entries, so members and
join replies list users on every process. Each process refreshes an expiring
key (``chatd:proc:ID``, 10 s); every process looks, every few seconds, for
processes in the presence hash whose key has expired (a ``kill -9``), and a
script removes their entries and publishes a ``leave`` for each, once.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson
import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, endpoints, error, protocol, ssl, task
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from chatd.events import Event, Message, Presence, Truncated
from chatd.store import HISTORY_MEMORY, Store, Stored, StoreUnavailable, _Window

log = Logger()

PREFIX = "chatd:"
CHANNEL = PREFIX + "events"
PRESENCE = PREFIX + "presence"
#: a process's heartbeat key lives this long; a crashed process's users go within it plus REAP_INTERVAL
HEARTBEAT_TTL = 10
HEARTBEAT_INTERVAL = 3.0
REAP_INTERVAL = 4.0
CHECK_INTERVAL = 1.0
#: checks (CHECK_INTERVAL apart) a probe may go unanswered before the subscription is taken for dead
PROBE_CHECKS = 5
REPLY_TIMEOUT = 5
#: seconds a read waits for its own marker to come back on the subscription (see RedisBackplane._barrier)
BARRIER_TIMEOUT = 2.0
#: seconds by which another process's clock may be behind this one's (see RedisBackplane._read_room)
CLOCK_SLACK = 1.0

# KEYS: seq, hist, cid. ARGV: room, id, user, text, time, protocol, client_id,
# limit, cutoff (0: no age limit), ttl (0: none), channel, floor (the last seq the
# calling process has delivered: a counter behind it -- Redis lost its data -- is raised).
_STORE = """
local cid = ARGV[7]
if cid ~= '' then
  local existing = redis.call('HGET', KEYS[3], cid)
  if existing then return {1, existing} end
end
local seq = redis.call('INCR', KEYS[1])
local floor = tonumber(ARGV[12])
if seq <= floor then
  seq = floor + 1
  redis.call('SET', KEYS[1], seq)
end
local payload = cjson.encode({k='m', id=ARGV[2], seq=seq, room=ARGV[1], user=ARGV[3], text=ARGV[4],
  time=tonumber(ARGV[5]), protocol=ARGV[6], cid=cid})
redis.call('ZADD', KEYS[2], seq, payload)
if cid ~= '' then redis.call('HSET', KEYS[3], cid, payload) end
local function drop(items)
  for _, item in ipairs(items) do
    local m = cjson.decode(item)
    if m.cid ~= '' then redis.call('HDEL', KEYS[3], m.cid) end
    redis.call('ZREM', KEYS[2], item)
  end
end
local excess = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[8])
if excess > 0 then drop(redis.call('ZRANGE', KEYS[2], 0, excess - 1)) end
local cutoff = tonumber(ARGV[9])
if cutoff > 0 then
  for _ = 1, 100 do
    local head = redis.call('ZRANGE', KEYS[2], 0, 0)
    if #head == 0 or cjson.decode(head[1]).time >= cutoff then break end
    drop(head)
  end
end
local ttl = tonumber(ARGV[10])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('EXPIRE', KEYS[3], ttl)
end
redis.call('PUBLISH', ARGV[11], payload)
return {0, payload}
"""

# KEYS: presence. ARGV: field, delta, proc, room, user, action, time, protocol, channel.
# The event carries the process's new count (n), so every mirror sets rather than adds.
_PRESENCE = """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], tonumber(ARGV[2]))
if n <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  n = 0
end
redis.call('PUBLISH', ARGV[9], cjson.encode({k='p', proc=ARGV[3], room=ARGV[4], user=ARGV[5],
  action=ARGV[6], time=tonumber(ARGV[7]), protocol=ARGV[8], n=n}))
return n
"""

# KEYS: presence, the dead process's heartbeat. ARGV: proc, time, channel.
# Removes every entry of a process whose heartbeat expired and says leave for each, once.
_REAP = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local prefix = ARGV[1] .. '\\n'
local fields = redis.call('HKEYS', KEYS[1])
local n = 0
for _, field in ipairs(fields) do
  if string.sub(field, 1, #prefix) == prefix then
    redis.call('HDEL', KEYS[1], field)
    local rest = string.sub(field, #prefix + 1)
    local sep = string.find(rest, '\\n', 1, true)
    local room = string.sub(rest, 1, sep - 1)
    local user = string.sub(rest, sep + 1)
    redis.call('PUBLISH', ARGV[3], cjson.encode({k='p', proc=ARGV[1], room=room, user=user,
      action='leave', time=tonumber(ARGV[2]), protocol='-', n=0}))
    n = n + 1
  end
end
return n
"""

# KEYS: the seq counters. ARGV: the lowest value each may have (what this process has delivered).
# Raises a counter that is behind: Redis restarted without its data must not hand out a seq again.
_SEQ_FLOOR = """
local raised = 0
for i, key in ipairs(KEYS) do
  local floor = tonumber(ARGV[i])
  if tonumber(redis.call('GET', key) or '0') < floor then
    redis.call('SET', key, floor)
    raised = raised + 1
  end
end
return raised
"""

# KEYS: presence. ARGV: proc, time, channel, then field/count pairs (this process's entries
# now). Makes the hash say exactly that and tells every process (after a reconnect, after
# being reaped for a stall, or with no pairs at a clean stop).
_RESYNC = """
local prefix = ARGV[1] .. '\\n'
local wanted = {}
for i = 4, #ARGV, 2 do wanted[ARGV[i]] = ARGV[i + 1] end
local function say(field, action, n)
  local rest = string.sub(field, #prefix + 1)
  local sep = string.find(rest, '\\n', 1, true)
  redis.call('PUBLISH', ARGV[3], cjson.encode({k='p', proc=ARGV[1], room=string.sub(rest, 1, sep - 1),
    user=string.sub(rest, sep + 1), action=action, time=tonumber(ARGV[2]), protocol='-', n=n}))
end
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(field, 1, #prefix) == prefix and not wanted[field] then
    redis.call('HDEL', KEYS[1], field)
    say(field, 'leave', 0)
  end
end
for field, count in pairs(wanted) do
  if redis.call('HGET', KEYS[1], field) ~= count then
    redis.call('HSET', KEYS[1], field, count)
    say(field, 'join', tonumber(count))
  end
end
return 0
"""


def parse_url(url: str) -> dict[str, Any]:
    """``redis://[user:password@]host[:port][/db]`` (``rediss://`` for TLS) as connection settings."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise usage.UsageError(f"--redis: expected redis://host:port/db or rediss://..., not {url!r}")
    try:
        port = parts.port or 6379
    except ValueError:
        raise usage.UsageError(f"--redis: bad port in {url!r}") from None
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise usage.UsageError(f"--redis: the database must be a number, not {path!r}")
    if not parts.hostname:
        raise usage.UsageError(f"--redis: no host in {url!r}")
    return {
        "host": parts.hostname,
        "port": port,
        "db": int(path) if path else 0,
        "tls": parts.scheme == "rediss",
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
    }


def _key(kind: str, room: str) -> str:
    return f"{PREFIX}{kind}:{room}"


def _message(payload: dict) -> Message:
    m = Message(payload["id"], int(payload["seq"]), payload["room"], payload["user"], payload["text"],
                float(payload["time"]), payload["protocol"])
    m.client_id = payload.get("cid") or None
    return m


class _Factory(protocol.Factory):
    """Builds txredisapi protocols for a ClientService (which does the reconnecting)."""

    isLazy = True
    noisy = False

    def __init__(self, protocol_class: type, settings: dict[str, Any], on_message: Callable | None = None):
        self.protocol_class = protocol_class
        self.settings = settings
        self.on_message = on_message
        #: told why each connection ended (a refused TLS certificate says so here)
        self.on_lost: Callable[[Failure], None] = lambda reason: None
        #: told of each new protocol, to make it usable once Redis has answered on it
        self.on_new: Callable[[Any], None] = lambda proto: None

    def buildProtocol(self, addr: Any) -> Any:
        s = self.settings
        p = self.protocol_class(
            charset="utf-8",
            replyTimeout=REPLY_TIMEOUT if self.on_message is None else None,
            password=s["password"],
            dbid=s["db"] or None,
            convertNumbers=False,
            username=s["username"],
        )
        p.factory = self
        lost = p.connectionLost

        def connection_lost(reason: Failure) -> Any:
            self.on_lost(reason)
            return lost(reason)

        p.connectionLost = connection_lost
        self.on_new(p)
        if self.on_message is not None:
            p.messageReceived = lambda pattern, channel, message: self.on_message(message)
        return p

    # txredisapi calls these when AUTH or SELECT fails: the ClientService keeps trying.
    def stopTrying(self) -> None:
        pass

    def connectionError(self, why: str) -> None:
        log.error("redis: {why}", why=why)


class _Link:
    """One Redis connection kept up by a ClientService; ``proto`` is None while it is down."""

    def __init__(self, reactor: Any, settings: dict[str, Any], factory: _Factory, name: str,
                 on_ready: Callable[[Any], Any], on_down: Callable[[str], None]) -> None:
        self.name = name
        self.proto: Any = None
        self.last_error = "not connected yet"
        self._on_ready = on_ready
        self._on_down = on_down
        endpoint = endpoints.HostnameEndpoint(reactor, settings["host"], settings["port"], timeout=5)
        if settings["tls"]:
            # Certificate and host name verified (service-identity), against
            # --redis-ca if given, else the system's trusted CAs.
            trust = None
            if settings.get("ca"):
                with open(settings["ca"], "rb") as f:
                    trust = ssl.Certificate.loadPEM(f.read())
            endpoint = endpoints.wrapClientTLS(ssl.optionsForClientTLS(settings["host"], trustRoot=trust), endpoint)
        factory.on_lost = self._why
        factory.on_new = self._new
        # No prepareConnection: its state machine cannot take a connection lost
        # while it prepares (a TLS handshake refused after connect does that).
        self.service = ClientService(
            endpoint,
            factory,
            retryPolicy=backoffPolicy(initialDelay=0.2, maxDelay=5.0, factor=2.0),
            clock=reactor,
        )

    def _new(self, proto: Any) -> None:
        """A connection is usable once ``on_ready`` (script loading, subscribing) has run on it."""

        def usable(_: Any) -> None:
            if proto.connected:
                self.proto = proto
                self.last_error = ""
                log.info("redis {name} connection up", name=self.name)

        def ready(p: Any) -> Any:
            p.whenDisconnected().addCallback(self._lost)
            return defer.maybeDeferred(self._on_ready, p).addCallback(usable)

        def failed(failure: Failure) -> None:
            # Redis refused the set-up (LOADING after a restart, a failed AUTH...): left
            # open, this connection would never become usable. Drop it; the service makes
            # another, with backoff.
            if proto.connected and proto.transport is not None:
                log.warn("redis {name}: connection not usable: {why}", name=self.name, why=_reason(failure))
                proto.transport.loseConnection()
            else:  # lost while being set up: the link says so once
                log.debug("redis {name}: connection lost while set up: {why}", name=self.name, why=_reason(failure))

        proto.whenConnected().addCallback(ready).addErrback(failed)

    def _why(self, reason: Failure) -> None:
        """Keep (and log once) why a connection ended, for /health and the operator."""
        why = _reason(reason)
        if why and why != self.last_error and self.service.running:
            log.warn("redis {name} connection: {why}", name=self.name, why=why)
        if why:
            self.last_error = why

    def _lost(self, proto: Any) -> None:
        if self.proto is proto:
            self.proto = None
            self._on_down(f"redis {self.name} connection down: {self.last_error}")
            if self.service.running:
                log.warn("redis {name} connection lost; reconnecting", name=self.name)

    def start(self) -> None:
        self.service.startService()

    def stop(self) -> defer.Deferred:
        return defer.maybeDeferred(self.service.stopService)


class _Mirror:
    """Other processes' presence entries: room -> user -> {process: sessions}."""

    def __init__(self) -> None:
        self.rooms: dict[str, dict[str, dict[str, int]]] = {}

    def clear(self) -> None:
        self.rooms.clear()

    def set(self, proc: str, room: str, user: str, count: int) -> None:
        users = self.rooms.setdefault(room, {})
        procs = users.setdefault(user, {})
        if count > 0:
            procs[proc] = count
            return
        procs.pop(proc, None)
        if not procs:
            del users[user]
            if not users:
                del self.rooms[room]

    def change(self, proc: str, room: str, user: str, delta: int) -> None:
        current = self.rooms.get(room, {}).get(user, {}).get(proc, 0)
        self.set(proc, room, user, current + delta)

    def users(self, room: str) -> dict[str, dict[str, int]]:
        return self.rooms.get(room, {})

    def procs(self) -> set[str]:
        return {p for users in self.rooms.values() for procs in users.values() for p in procs}


class _Sync:
    """A room being read back or filled from Redis: its live events, held meanwhile.

    ``token`` is the subscription's generation when the sync began, if it
    was subscribed then (else None): the events held are every event
    published since only if the generation is still the same at the end.
    """

    __slots__ = ("events", "since", "token")

    def __init__(self, token: int | None, events: list[Message] | None = None, since: float = 0.0) -> None:
        self.token = token
        self.events = events if events is not None else []
        #: when the sync began (a read: when the room was joined), on this process's clock
        self.since = since


class RedisBackplane(Store):
    """The store and broker of a hub when ``--redis`` is given; see the module docstring."""

    #: windows take messages from the subscription only, in the order Redis published them
    keeps_on_ack = False
    durable = True

    def __init__(
        self,
        reactor: Any,
        url: str,
        limit: int = 100,
        max_age: float = 0.0,
        ca: str | None = None,
        budget: int = HISTORY_MEMORY,
    ) -> None:
        super().__init__(reactor, limit, max_age, budget)
        self.reactor = reactor
        self.url = url
        self.settings = parse_url(url)
        self.settings["ca"] = ca
        self.proc = uuid.uuid4().hex[:12]
        self.hub: Any = None
        self.mirror = _Mirror()
        self._shas: dict[str, str] = {}
        #: room -> [(message, Deferred)] of own messages waiting to come back on the subscription
        self._waiting: dict[str, list[tuple[Message, defer.Deferred]]] = {}
        #: None when live; else the events held back while catching up
        self._held: list[dict] | None = []
        #: rooms being read back or filled; live events for them are held here meanwhile
        self._syncing_rooms: dict[str, _Sync] = {}
        #: rooms whose fill failed: filled again in a second, or when the command connection is back
        self._stale: set[str] = set()
        self._refill_call: Any = None
        #: room -> messages newer than the window read back, delivered once the read's waiters have run
        self._read_rest: dict[str, list[Message]] = {}
        #: one more on every subscriber connection and every loss of one
        self._sync_generation = 0
        #: the generation whose SUBSCRIBE Redis has confirmed (equal to _sync_generation while subscribed)
        self._subscribed = -1
        #: marker id -> the read waiting for it to come back on the subscription
        self._markers: dict[str, tuple[defer.Deferred, Any]] = {}
        self._marker_count = 0
        #: events received on the subscription; that count at the last check; checks since with none
        self._events_seen = 0
        self._seen_at_check = 0
        self._silent_checks = 0
        self.synced = defer.Deferred()
        self._commands = _Link(reactor, self.settings, _Factory(txredisapi.RedisProtocol, self.settings),
                               "command", self._commands_ready, self._down)
        self._events = _Link(reactor, self.settings,
                             _Factory(txredisapi.SubscriberProtocol, self.settings, self._on_event),
                             "subscriber", self._events_ready, self._down)
        self._loops = [
            self._loop(self._heartbeat, HEARTBEAT_INTERVAL),
            self._loop(self._reap, REAP_INTERVAL),
            self._loop(self._check, CHECK_INTERVAL),
        ]
        self.problem = "connecting to Redis"
        self._started = False

    def _loop(self, f: Callable[[], Any], interval: float) -> tuple[task.LoopingCall, float]:
        call = task.LoopingCall(f)
        call.clock = self.reactor
        return call, interval

    def attach(self, hub: Any) -> None:
        """Become ``hub``'s broker too."""
        self.hub = hub
        hub.broker = self

    # -- life ------------------------------------------------------------------------

    def load(self) -> defer.Deferred:
        if not self._started:
            self._started = True
            self._commands.start()
            self._events.start()
            for call, interval in self._loops:
                call.start(interval, now=False)
        return self.synced

    def close(self) -> defer.Deferred:
        for call, _ in self._loops:
            if call.running:
                call.stop()
        if self._refill_call is not None and self._refill_call.active():
            self._refill_call.cancel()
        self._refill_call = None
        d = defer.succeed(None)
        proto = self._commands.proto
        if proto is not None:
            # Our users leave with us, at once rather than after the heartbeat expires.
            d = self._script(_RESYNC, [PRESENCE], [self.proc, repr(self.clock.seconds()), CHANNEL])
            d.addErrback(lambda _: None)
            d.addCallback(lambda _: proto.execute_command("DEL", PREFIX + "proc:" + self.proc))
            d.addErrback(lambda _: None)
        d.addCallback(lambda _: defer.DeferredList([self._commands.stop(), self._events.stop()]))
        return d

    def check(self) -> defer.Deferred:
        proto = self._commands.proto
        if proto is None:
            return defer.fail(StoreUnavailable(f"redis unreachable: {self._commands.last_error}"))
        d = proto.execute_command("PING")
        d.addTimeout(CHECK_INTERVAL, self.reactor)
        return d

    def _down(self, reason: str) -> None:
        """A connection dropped: unhealthy at once, not at the next check."""
        self.problem = reason

    def _probe_subscription(self) -> None:
        """Drop a subscription that has gone silent (a flow dropped on the way, no FIN or RST).

        The subscriber connection sends nothing and has no reply timeout: left
        alone, it would wait for ever while the other processes' messages are
        lost to this one and its senders' acks never come. After a check with
        nothing on it, a marker (ignored by every process) is published to draw
        an event; after PROBE_CHECKS such checks in a row, the connection is
        aborted, and the link reconnects and catches up. Counted in checks, not
        seconds: a process that was itself stopped is not taken for a dead link.
        """
        sub, cmd = self._events.proto, self._commands.proto
        if sub is None or cmd is None or self._events_seen != self._seen_at_check:
            self._seen_at_check = self._events_seen
            self._silent_checks = 0
            return
        self._silent_checks += 1
        if self._silent_checks <= PROBE_CHECKS:
            marker = orjson.dumps({"k": "r", "id": self.proc + ":probe"})
            defer.maybeDeferred(cmd.execute_command, "PUBLISH", CHANNEL, marker).addErrback(lambda _: None)
            return
        self._silent_checks = 0
        log.warn("redis subscriber: nothing came back in {n} s; reconnecting", n=PROBE_CHECKS * CHECK_INTERVAL)
        self._events.last_error = "subscription silent"
        if sub.transport is not None:
            sub.transport.abortConnection()

    def _check(self) -> defer.Deferred:
        self._probe_subscription()

        def ok(_: Any) -> None:
            if self._events.proto is None:
                self.problem = f"redis subscription down: {self._events.last_error}"
            elif self._held is not None:
                self.problem = "catching up from Redis"
            else:
                self.problem = None

        def bad(failure: Failure) -> None:
            reason = failure.value.reason if failure.check(StoreUnavailable) else f"redis unreachable: {failure.getErrorMessage() or failure.type.__name__}"
            self.problem = reason

        return self.check().addCallbacks(ok, bad)

    # -- scripts --------------------------------------------------------------------

    def _script(self, source: str, keys: list[str], args: list[Any], proto: Any = None) -> defer.Deferred:
        """Run one of the scripts, sent at once so that calls reach Redis in the order made."""
        proto = proto or self._commands.proto
        if proto is None:
            return defer.fail(
                StoreUnavailable(f"message not stored: Redis is unavailable ({self._commands.last_error}); try again shortly")
            )
        sha = self._shas.get(source)
        if sha is None:  # not loaded (a SCRIPT FLUSH): EVAL sends the source, still in order
            return proto.execute_command("EVAL", source, len(keys), *keys, *args)

        def reload(failure: Failure) -> Any:
            if "NOSCRIPT" in failure.getErrorMessage():
                self._shas.pop(source, None)
                log.warn("redis: scripts were flushed; sending their source")
                return self._script(source, keys, args)
            return failure

        return proto.execute_command("EVALSHA", sha, len(keys), *keys, *args).addErrback(reload)

    @defer.inlineCallbacks
    def _commands_ready(self, proto: Any) -> Any:
        """Load the scripts, then put this process's presence right, before any command uses it."""
        self._shas.clear()
        for source in (_STORE, _PRESENCE, _REAP, _RESYNC, _SEQ_FLOOR):
            self._shas[source] = yield proto.execute_command("SCRIPT", "LOAD", source)
        rooms = [(room, w.last_seq) for room, w in self._windows.items() if w.last_seq]
        for start in range(0, len(rooms), 500):
            chunk = rooms[start : start + 500]
            raised = yield self._script(_SEQ_FLOOR, [_key("seq", r) for r, _ in chunk], [n for _, n in chunk], proto)
            if int(raised):
                log.warn(
                    "redis: {n} rooms' seq counters were behind what this process delivered "
                    "(Redis lost data?); raised so no seq is handed out twice",
                    n=int(raised),
                )
        self._refill(proto)
        try:
            # Alive at once (a user joining now must not be reaped), then say who is here.
            yield proto.execute_command("SET", PREFIX + "proc:" + self.proc, "1", "EX", HEARTBEAT_TTL)
            yield self._resync_presence(proto)
        except Exception:
            log.failure("redis: presence resync failed")

    # -- messages ---------------------------------------------------------------------

    def _persist(self, message: Message, client_id: str | None) -> defer.Deferred:
        room = message.room
        cutoff = self.clock.seconds() - self.max_age if self.max_age else 0
        args = [room, message.id, message.user, message.text, repr(message.time), message.protocol,
                client_id or "", self.limit, repr(cutoff), int(self.max_age), CHANNEL, self.last_seq(room)]
        d = self._script(_STORE, [_key("seq", room), _key("hist", room), _key("cid", room)], args)

        def stored(reply: list) -> Any:
            duplicate, payload = int(reply[0]), orjson.loads(reply[1])
            stored_message = _message(payload)
            if duplicate:
                return Stored(stored_message, True)
            return self._wait_for(stored_message)

        def failed(failure: Failure) -> Failure:
            if failure.check(StoreUnavailable):
                return failure  # never sent: certainly not stored
            reason = failure.getErrorMessage() or failure.type.__name__
            if failure.check(txredisapi.ConnectionError):
                # Sent, but no answer (a stall, a connection lost): Redis may yet run it.
                log.warn("redis: no answer to a store: {reason}", reason=reason)
                raise StoreUnavailable(
                    f"message not acknowledged: Redis did not answer ({reason}); it may have been "
                    "stored: retry with the same client_id"
                )
            log.warn("redis: message not stored: {reason}", reason=reason)
            raise StoreUnavailable(f"message not stored: Redis failed ({reason}); try again")

        return d.addCallbacks(stored, failed)

    def _wait_for(self, message: Message) -> Any:
        """Acknowledge once our own message has come back and been delivered here."""
        if (
            self.last_seq(message.room) >= message.seq
            or self._events.proto is None
            or not self._holds.get(message.room)
        ):
            # Delivered already, or the subscription is down: stored all the
            # same, and catch-up delivers it once the subscription is back.
            # (Nobody here is in the room: there is nothing to deliver.)
            return Stored(message, False)
        d: defer.Deferred = defer.Deferred()
        self._waiting.setdefault(message.room, []).append((message, d))
        return d

    def _forget(self, room: str) -> None:
        super()._forget(room)
        # Nobody here follows the room any more: own messages waiting to come back are stored.
        for message, d in self._waiting.pop(room, []):
            d.callback(Stored(message, False))

    def memory(self) -> dict[str, int]:
        figures = super().memory()
        figures["waiting"] = sum(len(w) for w in self._waiting.values())
        figures["syncing"] = len(self._syncing_rooms)
        figures["mirrored"] = len(self.mirror.rooms)
        return figures

    # -- reading a room back ---------------------------------------------------------------

    def _read_room(self, room: str) -> defer.Deferred:
        """The room's kept messages and ``seq`` from Redis, its live events held back meanwhile.

        The window read back holds what this process has delivered of the
        room (up to the ``seq`` it knew, or Redis' counter for a room it did
        not follow); newer messages are delivered in order after the read's
        waiters have run (:meth:`_after_read`), then the events held back.
        """
        proto = self._commands.proto
        if proto is None:
            return defer.fail(
                StoreUnavailable(f"history not available: Redis is unavailable ({self._commands.last_error})")
            )
        # The read holds the room's live events from now on, a fill's in flight
        # included: that fill then delivers nothing (whatever it would is in this
        # read's range or comes after it), so the window the read builds is not
        # outrun by deliveries it did not see.
        prior = self._syncing_rooms.get(room)
        now = self.clock.seconds()
        self._syncing_rooms[room] = _Sync(prior.token if prior else self._token(), list(prior.events) if prior else [], now)

        @defer.inlineCallbacks
        def read() -> Any:
            seq = yield proto.execute_command("GET", _key("seq", room))
            items = yield proto.execute_command("ZRANGEBYSCORE", _key("hist", room), "-inf", "+inf")
            yield self._barrier(proto)
            return int(seq) if seq is not None else 0, [_message(orjson.loads(item)) for item in items or []]

        def got(result: tuple[int, list[Message]]) -> _Window:
            counter, messages = result
            old = self._windows.get(room)
            if old is not None and (old.complete or old.last_seq):
                base = old.last_seq
            else:
                # Followed from now on: what came live since the room was held is
                # delivered (a member who just joined sees it), the rest is history.
                sync = self._syncing_rooms.get(room)
                base = min([counter, *(m.seq - 1 for m in (sync.events if sync else []))])
                if sync is not None and not (sync.token is not None and sync.token == self._sync_generation):
                    # The subscription dropped during the read: its marker could not show
                    # which counted messages came after the join. Go by their time (a
                    # second's slack for other hosts' clocks): delivered live rather than lost.
                    base = min([base, *(m.seq - 1 for m in messages if m.time >= sync.since - CLOCK_SLACK)])
            window = _Window(base)
            for message in messages:
                if message.seq <= base:
                    window.messages.append(message)
                    if message.client_id:
                        window.client_ids[message.client_id] = message
            while len(window.messages) > self.limit:
                dropped = window.messages.popleft()
                if dropped.client_id:
                    window.client_ids.pop(dropped.client_id, None)
            self._read_rest[room] = [m for m in messages if m.seq > base]
            return window

        def failed(failure: Failure) -> Failure:
            self._read_rest[room] = []
            if not failure.check(StoreUnavailable):
                reason = failure.getErrorMessage() or failure.type.__name__
                failure = Failure(StoreUnavailable(f"history not available: Redis failed ({reason})"))
            return failure

        return read().addCallbacks(got, failed)

    def _barrier(self, proto: Any) -> defer.Deferred:
        """Fires once every event Redis published before now has come through the subscription.

        A message stored just before a read's ``GET`` is counted by it, but
        its event may still be on its way to this process: taken for history,
        it was then dropped as a duplicate when it came, and a member who
        joined while the room was being read never got it live. So the read
        publishes a marker of its own on the channel and waits for it: Redis
        delivers one channel's events in the order it published them, so
        every message the read counted has come (and is held for the room)
        by then. After :data:`BARRIER_TIMEOUT`, or with the subscription
        down, the read goes on without it, as before.
        """
        if self._events.proto is None:
            return defer.succeed(None)
        self._marker_count += 1
        token = f"{self.proc}:{self._marker_count}"
        waiting: defer.Deferred = defer.Deferred()
        self._markers[token] = (waiting, self.reactor.callLater(BARRIER_TIMEOUT, self._marker_back, token))
        sent = proto.execute_command("PUBLISH", CHANNEL, orjson.dumps({"k": "r", "id": token}))
        sent.addErrback(lambda _: self._marker_back(token))
        return waiting

    def _marker_back(self, token: str) -> None:
        waiting, timer = self._markers.pop(token, (None, None))
        if waiting is not None:
            if timer.active():
                timer.cancel()
            waiting.callback(None)

    def _after_read(self, room: str) -> None:
        rest = self._read_rest.pop(room, [])
        if self._holds.get(room) and room not in self._windows:
            # The read failed: follow the room from its next event on.
            window = self._window(room)
            window.complete = False
        # What the read found newer than the window, and what came live meanwhile
        # (Redis may have trimmed some of it before the read), in seq order, once each.
        sync = self._syncing_rooms.pop(room, None)
        newer = {m.seq: m for m in rest}
        for message in sync.events if sync else ():
            newer.setdefault(message.seq, message)
        self._settle(room, newer, sync.token if sync else None)

    def _deliver_from(self, room: str, newer: dict[int, Message]) -> int:
        """Deliver ``newer`` in seq order, up to the first gap; the room's last seq after."""
        window = self._windows.get(room)
        if window is None:
            return 0
        last = window.last_seq
        if not last and not window.complete and newer:
            last = min(newer) - 1  # followed from its next event on (a read failed)
        for seq in sorted(newer):
            if seq > last + 1:
                break
            if seq == last + 1:
                self._deliver_stored(newer[seq])
                last = seq
        return last

    def _settle(self, room: str, newer: dict[int, Message], token: int | None, fetched: bool = False) -> None:
        """End a read or a fill of ``room``: deliver what it found, then fetch what it may have missed.

        Never past a gap: a message delivered beyond one raises the room's
        seq, and the missing ones would be taken for duplicates when they
        came. A gap is a message trimmed before the read (the fill says so,
        :meth:`_gap`) or published while the subscription was down; and if
        the subscription was not up all along, messages after the newest
        held may have been missed too. Either way the room is fetched again
        from its last seq, now if subscribed (the catch-up of this
        subscription skipped the room while it was busy), else by the
        catch-up once subscribed. After a fill (``fetched``) on a subscription
        that stayed up, a gap left is a range Redis no longer has (it lost
        data): the room's members are told (:meth:`_gap`) and it goes on.
        """
        last = self._deliver_from(room, newer)
        window = self._windows.get(room)
        if window is None or not (window.complete or last):
            return  # nobody here follows the room any more, or it is followed from its next event
        continuous = token is not None and token == self._sync_generation
        beyond = [seq for seq in newer if seq > last]
        if continuous and not beyond:
            return
        if continuous and fetched:
            kept_from = min(beyond)
            self._gap(room, last + 1, kept_from)
            window.last_seq = kept_from - 1
            self._deliver_from(room, newer)
            return
        if self._subscribed == self._sync_generation:
            held = [m for seq, m in sorted(newer.items()) if seq > last]
            self._fill_gap(room, last + 1, held)

    def _release(self, room: str) -> None:
        waiting = self._waiting.get(room)
        if not waiting:
            return
        last = self.last_seq(room)
        ready = [(m, d) for m, d in waiting if m.seq <= last]
        if not ready:
            return
        rest = [(m, d) for m, d in waiting if m.seq > last]
        if rest:
            self._waiting[room] = rest
        else:
            del self._waiting[room]
        for message, d in ready:
            d.callback(Stored(message, False))

    # -- the subscription ----------------------------------------------------------------

    def _token(self) -> int | None:
        """The subscription's generation if it is subscribed now (see :class:`_Sync`)."""
        return self._sync_generation if self._subscribed == self._sync_generation else None

    def _events_ready(self, proto: Any) -> defer.Deferred:
        self._held = []
        self._sync_generation += 1
        generation = self._sync_generation
        proto.whenDisconnected().addCallback(lambda _: self._unsubscribed(generation))
        d = proto.subscribe(CHANNEL)
        d.addCallback(lambda _: self._catch_up(generation))

        def failed(failure: Failure) -> Any:
            if failure.check(txredisapi.ConnectionError, error.ConnectionDone, error.ConnectionLost):
                # Lost meanwhile: logged (once) by its link; the next connection tries again.
                log.debug("redis: subscribing failed: {why}", why=_reason(failure))
                return None
            return failure  # refused with the connection up: the link drops it and makes another

        return d.addErrback(failed)

    def _unsubscribed(self, generation: int) -> None:
        """The subscription of ``generation`` is gone: whatever is published now is missed."""
        if generation == self._sync_generation:
            self._sync_generation += 1  # syncs begun under it fetch again; its catch-up stops

    def _on_event(self, raw: Any) -> None:
        self._events_seen += 1
        try:
            event = orjson.loads(raw)
        except orjson.JSONDecodeError:
            log.warn("redis: not a chatd event on {channel}", channel=CHANNEL)
            return
        if self._held is not None:
            self._held.append(event)
            return
        self._apply(event)

    @defer.inlineCallbacks
    def _catch_up(self, generation: int) -> Any:
        """Everything stored since what this process has delivered, then what was held, then live.

        A room being read back or filled meanwhile is left to that sync,
        which fetches again when it ends (:meth:`_settle`).
        """
        if generation != self._sync_generation:
            return
        self._subscribed = generation
        proto = self._commands.proto
        if proto is None:  # the subscription came up first: wait for the other connection
            self.reactor.callLater(0.1, self._retry_catch_up, generation)
            return
        try:
            # Only the rooms in memory: any other is read back when someone needs it.
            rooms = [room for room in self._windows if room not in self._syncing_rooms]
            for room in rooms:
                self._stale.discard(room)
                window = self._windows.get(room)
                if window is None or room in self._syncing_rooms:
                    continue
                if not window.complete and not window.last_seq:
                    # Followed from whatever comes next (a read back failed): from Redis' counter now.
                    seq = int((yield proto.execute_command("GET", _key("seq", room))) or 0)
                    window = self._windows.get(room)
                    if window is not None and not window.last_seq and seq:
                        window.last_seq = seq
                        self._unread(room, seq)
                    continue
                yield self._fetch(proto, room, window.last_seq + 1)
            entries = yield proto.execute_command("HGETALL", PRESENCE)
        except Exception:
            log.failure("redis: catching up failed; trying again")
            if generation == self._sync_generation:
                self.reactor.callLater(1.0, self._retry_catch_up, generation)
            return
        if generation != self._sync_generation:
            return
        self._load_presence(entries)
        held, self._held = self._held or [], None
        for event in held:
            self._apply(event)
        for room in list(self._waiting):
            self._release(room)
        log.info("redis: caught up ({rooms} rooms); live", rooms=len(rooms or []))
        if not self.synced.called:
            self.synced.callback(None)

    def _retry_catch_up(self, generation: int) -> None:
        # (The link's proto is set only once the catch-up is done: not the test here.)
        if generation == self._sync_generation:
            self._catch_up(generation)

    @defer.inlineCallbacks
    def _fetch(self, proto: Any, room: str, first: int, sync: _Sync | None = None) -> Any:
        """Put what Redis keeps of ``room`` from seq ``first`` on into its window, in order.

        A fill's fetch (``sync``) delivers nothing if a read of the room took
        its events over meanwhile (see :meth:`_read_room`).
        """
        # The counter first, then the messages: one stored in between is in the
        # range (never counted as seen without being delivered).
        seq = yield proto.execute_command("GET", _key("seq", room))
        items = yield proto.execute_command("ZRANGEBYSCORE", _key("hist", room), first, "+inf")
        if sync is not None and self._syncing_rooms.get(room) is not sync:
            return
        messages = [_message(orjson.loads(item)) for item in items or []]
        newest = int(seq) if seq is not None else 0
        kept_from = messages[0].seq if messages else newest + 1
        if kept_from > first and newest >= first:
            # Stored while this process was away, and trimmed before it came
            # back: its clients in the room are told, never silently skipped.
            self._gap(room, first, kept_from)
        for message in messages:
            self._deliver_stored(message)
        # Messages gone by age: the room's seq goes on all the same.
        window = self._windows.get(room)
        if window is not None:
            window.last_seq = max(window.last_seq, newest)

    def _apply(self, event: dict) -> None:
        kind = event.get("k")
        if kind == "m":
            message = _message(event)
            room = message.room
            sync = self._syncing_rooms.get(room)
            if sync is not None:
                sync.events.append(message)
                return
            window = self._windows.get(room)
            if window is None:
                return  # nobody here follows the room: it is in Redis, read back when asked
            last = window.last_seq
            if message.seq > last + 1 and (window.complete or last):
                self._fill_gap(room, last + 1, [message])
                return
            self._deliver_stored(message)
        elif kind == "p":
            self._remote_presence(event)
        elif kind == "r":  # a read's marker (another process's are not waited for here)
            self._marker_back(str(event.get("id")))

    def _fill_gap(self, room: str, first: int, held: list[Message], proto: Any = None) -> None:
        """Fetch ``room`` from seq ``first`` on (a live message skipped some: a publish lost), then go on."""
        sync = self._syncing_rooms[room] = _Sync(self._token(), held)
        proto = proto or self._commands.proto

        def done(_: Any) -> None:
            if self._syncing_rooms.get(room) is not sync:
                return  # a read took the room over: it settles it
            del self._syncing_rooms[room]
            self._settle(room, {m.seq: m for m in sync.events}, sync.token, fetched=True)

        def failed(failure: Failure) -> None:
            if self._syncing_rooms.get(room) is not sync:
                return
            # Nothing past the gap is delivered (it would be taken for duplicates
            # later); the room is filled again in a second (Redis refused: BUSY,
            # LOADING...) or once the command connection is back.
            log.warn("redis: filling a gap in {room} failed: {why}", room=room, why=_reason(failure))
            del self._syncing_rooms[room]
            self._deliver_from(room, {m.seq: m for m in sync.events})
            self._stale.add(room)
            if self._commands.proto is not None and self._refill_call is None:
                self._refill_call = self.reactor.callLater(1.0, self._refill)

        if proto is None:
            failed(Failure(StoreUnavailable("no command connection")))
            return
        self._fetch(proto, room, first, sync).addCallbacks(done, failed)

    def _refill(self, proto: Any = None) -> None:
        """Fill again the rooms whose fill failed (see :meth:`_fill_gap`)."""
        self._refill_call = None
        proto = proto or self._commands.proto
        if proto is None:
            return  # the command connection's return calls this
        stale, self._stale = self._stale, set()
        for room in stale:
            if room in self._windows and room not in self._syncing_rooms:
                self._fill_gap(room, self.last_seq(room) + 1, [], proto)

    def _gap(self, room: str, first: int, kept_from: int) -> None:
        if self.hub is None or not self.hub.local_users(room):
            return  # nobody here was following the room (a start-up load)
        log.warn(
            "redis: {room} seq {first}..{last} were trimmed before this process could deliver them",
            room=room,
            first=first,
            last=kept_from - 1,
        )
        self.hub.deliver(Truncated(room, kept_from))

    def _unread(self, room: str, counter: int) -> None:
        """Members who joined ``room`` while Redis was out of reach are told they may lack up to ``counter``.

        Their join could not read the room, so which of its messages came
        after they joined is not known here: they get a ``Truncated`` (the
        client reads the history to fill it), never a silent jump.
        """
        if self.hub is None or not self.hub.local_users(room):
            return
        log.warn("redis: {room} was joined while Redis was unreachable; its members may lack seq up to {seq}",
                 room=room, seq=counter)
        self.hub.deliver(Truncated(room, counter + 1))

    def _deliver_stored(self, message: Message) -> None:
        if self.keep(message, message.client_id) and self.hub is not None:
            self.hub.deliver(message)
        self._release(message.room)

    # -- presence --------------------------------------------------------------------------

    def _field(self, room: str, user: str) -> str:
        return f"{self.proc}\n{room}\n{user}"

    def publish(self, event: Event) -> None:
        """Presence of this process's users: here at once (if it changes who is in the room), and to Redis."""
        if not isinstance(event, Presence):
            return
        if not self.mirror.users(event.room).get(event.user):
            self._deliver_presence(event)
        delta = 1 if event.action == "join" else -1
        args = [self._field(event.room, event.user), delta, self.proc, event.room, event.user, event.action,
                repr(event.time), event.protocol, CHANNEL]
        d = self._script(_PRESENCE, [PRESENCE], args)
        # Lost while Redis is away; the presence resync on reconnect puts it right.
        d.addErrback(lambda f: log.debug("redis: presence not published: {why}", why=f.getErrorMessage()))

    def stored(self, message: Message) -> None:
        """Nothing to do: the store script published it, and the subscription delivers it."""

    def _deliver_presence(self, event: Presence) -> None:
        if self.hub is None:
            return
        count = len(self.members(event.room, self.hub.local_users(event.room)))
        self.hub.deliver(Presence(event.room, event.action, event.user, event.time, event.protocol, count))

    def _remote_presence(self, event: dict) -> None:
        proc = event.get("proc")
        if proc == self.proc or not isinstance(proc, str):
            return
        room, user, action = event["room"], event["user"], event["action"]
        local = self.hub.local_users(room) if self.hub is not None else []
        before = user in local or bool(self.mirror.users(room).get(user))
        if isinstance(event.get("n"), int):
            self.mirror.set(proc, room, user, event["n"])
        else:
            self.mirror.change(proc, room, user, 1 if action == "join" else -1)
        after = user in local or bool(self.mirror.users(room).get(user))
        if before != after:
            self._deliver_presence(Presence(room, action, user, float(event.get("time") or 0), event.get("protocol", "-"), 0))

    def _load_presence(self, entries: Any) -> None:
        self.mirror.clear()
        pairs = entries.items() if isinstance(entries, dict) else zip(entries[::2], entries[1::2], strict=False)
        for field, count in pairs:
            proc, _, rest = field.partition("\n")
            room, _, user = rest.partition("\n")
            if proc != self.proc:
                self.mirror.set(proc, room, user, int(count))

    def members(self, room: str, local: list[str]) -> list[str]:
        """Users in ``room`` on every process: this one's first, in the order they came."""
        remote = [u for u in self.mirror.users(room) if u not in local]
        return [*local, *remote]

    def _resync_presence(self, proto: Any = None) -> defer.Deferred:
        args: list[Any] = [self.proc, repr(self.clock.seconds()), CHANNEL]
        if self.hub is not None:
            for room, users in self.hub.local_presence().items():
                for user, count in users.items():
                    args += [self._field(room, user), count]
        return self._script(_RESYNC, [PRESENCE], args, proto)

    def _heartbeat(self) -> Any:
        proto = self._commands.proto
        if proto is None:
            return None
        d = proto.execute_command("SET", PREFIX + "proc:" + self.proc, "1", "EX", HEARTBEAT_TTL, "GET")

        def beat(previous: Any) -> Any:
            if previous is None:
                # Our key had expired (a stall longer than its TTL): the other
                # processes may have reaped our users. Put them back.
                log.warn("redis: this process's heartbeat had expired; saying again who is here")
                return self._resync_presence()
            return None

        return d.addCallback(beat).addErrback(lambda _: None)

    def _reap(self) -> Any:
        """Remove the presence of processes whose heartbeat expired (crashed, or cut off)."""
        if self._commands.proto is None:
            return None
        calls = [
            self._script(_REAP, [PRESENCE, PREFIX + "proc:" + proc], [proc, repr(self.clock.seconds()), CHANNEL])
            for proc in self.mirror.procs()
        ]
        return defer.DeferredList(calls, consumeErrors=True)


def _reason(failure: Failure) -> str:
    """A connection's end in a few words: a TLS refusal names the certificate problem."""
    value = failure.value
    if failure.check(error.ConnectionDone):
        return "connection closed"
    if failure.check(error.ConnectionLost):
        return "connection lost"
    args = getattr(value, "args", ())
    if args and isinstance(args[0], list):  # OpenSSL's error queue, or service-identity's mismatches
        return "TLS: " + "; ".join(str(e[-1]) if isinstance(e, tuple) else repr(e) for e in args[0] if e)
    return failure.getErrorMessage() or type(value).__name__

