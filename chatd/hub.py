"""The hub: the one owner of rooms, sessions, presence, order, history and stats.

Everything here runs on the reactor thread only. Protocol adapters register a
:class:`Session` per connection and call the hub's methods; the hub never
knows which protocol a session speaks. Data flows one way::

    adapter -> Hub.publish -> Broker.publish -> Hub.deliver -> Session.deliver

The broker and the store are seams: :class:`LocalBroker` fans out within
this process; the store (``chatd.store``: memory, SQLite, or Redis shared by
several processes) numbers and keeps messages. A message is fanned out, and
its sender acknowledged, only once the store holds it.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Hashable
from typing import Protocol

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from chatd import validate
from chatd.auth import Authenticator, Identity, Unauthenticated
from chatd.events import Event, Message, Presence
from chatd.limits import AddressCount, address
from chatd.metrics import HubMetrics
from chatd.store import MemoryStore, Store, Stored
from chatd.validate import ChatError, ConnectionRateLimited, Limits, RateLimited, TooManyRooms

log = Logger()

_session_ids = itertools.count(1)


class ServerFull(ChatError):
    """``MAX_CONNECTIONS`` sessions are open already."""


class AddressFull(ServerFull):
    """``--max-connections-per-ip`` connections are open from this client's address already."""


class ShuttingDown(ChatError):
    """The server is shutting down: this request is refused, and the client should come back shortly."""


class SessionClosed(ChatError):
    """The session was closed while the request ran (a replay too big for a slow reader).

    The client has been told why by the close itself; adapters whose call
    outlives the close (a gRPC stream) end it with that reason instead.
    """


class Session:
    """One client connection as the hub sees it, whatever its protocol.

    Adapters subclass it and implement :meth:`deliver` (encode and write,
    never blocking) and :meth:`close`. ``user`` is fixed once set (see
    :meth:`Hub.identify`); ``rooms`` is maintained by the hub only.
    ``identity`` is what the client's token proved (``chatd.auth``), set by
    the adapter before :meth:`Hub.connect` when tokens are required: the
    hub then fixes ``user`` to it, refuses rooms outside it, and closes the
    session when the token expires.
    """

    protocol = "unknown"
    #: messages this session sent that the store has not answered yet (see ``chatd.drain``)
    in_flight = 0
    #: set by the drain once this session's batch has come: it may send nothing more (see ``chatd.drain``)
    leaving = False
    #: whether :meth:`Hub.connect` counts this session against its address's limit; False when
    #: the adapter holds the address's slot for the whole connection itself (SignalR, from negotiate)
    counts_address = True
    #: False for a session that drops presence events (a gRPC ``StreamMessages`` stream):
    #: the hub then never hands them to it, so a join in a room of N such streams costs
    #: no N calls that do nothing
    hears_presence = True

    def __init__(self, peer: str = "", identity: Identity | None = None) -> None:
        self.id = next(_session_ids)
        self.peer = peer
        self.identity = identity
        self.user: str | None = None
        self.rooms: set[str] = set()
        self.expiry: IDelayedCall | None = None
        #: what :meth:`Hub.connect` counted for this session's address, given back at disconnect
        self.address_key: str | None = None
        #: room -> seq of the last message written to this client (where to resume, if it is cut off)
        self.last_seqs: dict[str, int] = {}

    def delivered(self, message: Message) -> None:
        """Note ``message`` as written to this client (once per delivery: keep it one store).

        The hub forgets a room's entry when the session leaves it
        (:meth:`Hub._leave`), so a long-lived connection passing through
        any number of rooms keeps only those it is in.
        """
        self.last_seqs[message.room] = message.seq

    def deliver(self, event: Event) -> None:
        """Send ``event`` to the client; must not raise for a slow client."""
        raise NotImplementedError

    def replay(self, message: Message) -> None:
        """Send a kept message to this client alone (a resume); by default as :meth:`deliver` does."""
        self.deliver(message)

    def close(self, reason: str) -> None:
        """End the connection, telling the client ``reason`` in its protocol's form."""
        raise NotImplementedError

    def going_away(self, reason: str) -> None:
        """End the connection because the server is shutting down.

        Protocols that can say "come back later" do so here (WebSocket 1001,
        SignalR Close with ``allowReconnect``, gRPC ``UNAVAILABLE``).
        """
        self.close(reason)

    def token_expired(self) -> None:
        """End the connection because its token expired (the client may come back with a new one)."""
        self.close("token expired")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.user or '-'}@{self.peer}>"


@implementer(IPushProducer)
class SendBudget:
    """A bound on what a session may have queued for a slow reader.

    Registered as the streaming producer of a Twisted transport: the
    transport pauses it when its own buffer is full and resumes it once
    drained. While paused every written byte is counted; past ``limit`` the
    overflow callback closes the session so the room's other members carry on
    and memory stays bounded.
    """

    def __init__(self, limit: int, on_overflow) -> None:
        self.limit = limit
        self.paused = False
        self.queued = 0
        self.overflowed = False
        self._on_overflow = on_overflow

    def attach(self, transport) -> None:
        # twisted.web's HTTPChannel registered itself on the transport before
        # the WebSocket upgrade handed the transport over; take its place.
        if getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()
        transport.registerProducer(self, True)

    def charge(self, nbytes: int) -> bool:
        """Account for ``nbytes`` about to be written; False once over budget."""
        if self.overflowed:
            return False
        if self.paused:
            self.queued += nbytes
            if self.queued > self.limit:
                self.overflowed = True
                self._on_overflow()
                return False
        return True

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.queued = 0

    def stopProducing(self) -> None:
        self.paused = True


class Broker(Protocol):
    """Carries events to every process's hub (just this one, locally).

    ``stored`` is told of each message the store has just kept; a broker
    whose store already fans messages out (Redis publishes in the same
    script that stores) does nothing there. ``publish`` carries presence.
    """

    def publish(self, event: Event) -> None: ...

    def stored(self, message: Message) -> None: ...

    def members(self, room: str, local: list[str]) -> list[str]: ...


class LocalBroker:
    """In-process fan-out: hand the event straight back to the hub, in order."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    def publish(self, event: Event) -> None:
        self._hub.deliver(event)

    stored = publish

    def members(self, room: str, local: list[str]) -> list[str]:
        return local


class Joined(list):
    """The users of a room just joined, and what a resume could not give back.

    A list, so adapters that only want the members use it as one.
    """

    #: some messages after the client's ``since`` are older than what is kept
    truncated: bool = False
    #: the oldest ``seq`` still kept in the room (what a truncated resume starts from)
    first_seq: int = 0
    #: the room's newest ``seq`` when the resume was answered
    last_seq: int = 0


class _Room:
    __slots__ = ("name", "sessions", "users")

    def __init__(self, name: str) -> None:
        self.name = name
        self.sessions: dict[int, Session] = {}
        self.users: dict[str, int] = {}  # user -> number of that user's sessions here


class _Rate:
    """Events per second over a sliding window of whole seconds."""

    def __init__(self, clock: IReactorTime, window: int = 10) -> None:
        self._clock = clock
        self._window = window
        self._buckets: deque[list[int]] = deque()

    def add(self, n: int = 1) -> None:
        now = int(self._clock.seconds())
        if self._buckets and self._buckets[-1][0] == now:
            self._buckets[-1][1] += n
        else:
            self._buckets.append([now, n])
            while self._buckets[0][0] <= now - self._window:
                self._buckets.popleft()

    def per_second(self) -> float:
        now = int(self._clock.seconds())
        total = sum(n for t, n in self._buckets if now - self._window < t < now)
        return round(total / (self._window - 1), 3)


class _UserRate:
    """A token bucket per user name (or any key): ``rate`` a second on average, ``burst`` at once.

    Keyed by user name, so a user's limit holds over every connection and
    protocol, gRPC's one-shot ``SendMessage`` included. Buckets are kept in
    the order they were last used; a bucket that has refilled is the same as
    no bucket, so the oldest are forgotten a few at a time as sends come,
    never by copying the table.
    """

    def __init__(self, clock: IReactorTime, rate: int, burst: int) -> None:
        self._clock = clock
        self.rate = rate
        self.burst = max(burst, 1)
        self._refill = self.burst / rate
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()

    def allows(self, user: Hashable) -> bool:
        """Whether ``take`` would succeed now."""
        bucket = self._buckets.get(user)
        if bucket is None:
            return True
        tokens, then = bucket
        return min(self.burst, tokens + (self._clock.seconds() - then) * self.rate) >= 1

    def refund(self, user: Hashable) -> None:
        """Give back the token ``take`` just took (the send was refused by another limit)."""
        bucket = self._buckets.get(user)
        if bucket is not None:
            self._buckets[user] = (min(self.burst, bucket[0] + 1), bucket[1])

    def take(self, user: Hashable) -> bool:
        now = self._clock.seconds()
        buckets = self._buckets
        bucket = buckets.pop(user, None)
        tokens, then = bucket if bucket is not None else (self.burst, now)
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        allowed = tokens >= 1
        buckets[user] = (tokens - 1 if allowed else tokens, now)
        # The least recently used first: forget those full again (at most a few per send).
        for _ in range(4):
            oldest = next(iter(buckets.values()))
            if now - oldest[1] < self._refill:
                break
            buckets.popitem(last=False)
        return allowed


class Hub(Service):
    """The chat state machine; see the module docstring for the flow."""

    name = "hub"

    def __init__(
        self,
        clock: IReactorTime,
        limits: Limits | None = None,
        max_connections: int = 10000,
        store: Store | None = None,
        broker: Broker | None = None,
        prune_interval: float = 60.0,
        auth: Authenticator | None = None,
        max_connections_per_ip: int = 0,
    ) -> None:
        self.clock = clock
        #: verifies clients' tokens; None when authentication is off
        self.auth = auth
        self.limits = limits or Limits()
        self.max_connections = max_connections
        #: open connections per client address, every protocol together (0: no limit)
        self.addresses = AddressCount(max_connections_per_ip)
        self.store = store or MemoryStore(clock, self.limits.history_limit)
        self.broker = broker or LocalBroker(self)
        self._prune = task.LoopingCall(self.store.prune)
        self._prune.clock = clock
        self._prune_interval = prune_interval
        self.sessions: dict[int, Session] = {}
        self._rooms: dict[str, _Room] = {}
        self._by_protocol: dict[str, int] = {}
        self.started_at = clock.seconds()
        self.messages_total = 0
        self.deliveries_total = 0
        self.connections_total = 0
        self._rate = _Rate(clock)
        self._user_rate = (
            _UserRate(clock, self.limits.message_rate, self.limits.message_burst)
            if self.limits.message_rate
            else None
        )
        # Keyed by session (or, for gRPC's one-shot calls, client address): a
        # client cannot dodge the per-user bucket by naming a new user per message.
        self._connection_rate = (
            _UserRate(clock, self.limits.connection_rate, self.limits.connection_burst)
            if self.limits.connection_rate
            else None
        )
        self.accepting = False
        self.closing = False  # set once shutdown begins: new connections are refused
        self.metrics = HubMetrics(self)

    # -- service -----------------------------------------------------------

    def startService(self) -> None:
        self.started_at = self.clock.seconds()
        self.accepting = True
        self.store.load()
        if self.store.max_age:
            self._prune.start(self._prune_interval, now=True)
        super().startService()

    def stopService(self) -> defer.Deferred:
        """Stop taking clients; fires once the store has kept every accepted message."""
        self.accepting = False
        self.closing = True
        if self._prune.running:
            self._prune.stop()
        super().stopService()
        return self.store.close()

    @property
    def healthy(self) -> bool:
        return self.running and self.accepting and self.store.problem is None

    @property
    def problem(self) -> str | None:
        """Why the hub is not healthy, in a few words (None when it is)."""
        if not self.running or not self.accepting:
            return "shutting down"
        return self.store.problem

    # -- sessions ----------------------------------------------------------

    def connect(self, session: Session) -> None:
        """Register a new connection; raises :class:`ServerFull` past the limit."""
        if self.closing:
            raise ServerFull("server shutting down, try again shortly")
        if len(self.sessions) >= self.max_connections:
            raise ServerFull(f"server full: {self.max_connections} connections open, try again later")
        identity = session.identity
        remaining = None
        if identity is not None and identity.expires is not None:
            remaining = identity.expires - self.clock.seconds()
            if not remaining > 0:  # NaN too
                raise Unauthenticated("token expired")
        # Every refusal above and here comes before any change.
        if session.counts_address:
            session.address_key = self.claim_address(session.peer, session.protocol)
        if identity is not None:
            session.user = identity.user
            if remaining is not None:
                session.expiry = self.clock.callLater(remaining, self._token_expired, session)
        self.sessions[session.id] = session
        self._by_protocol[session.protocol] = self._by_protocol.get(session.protocol, 0) + 1
        self.connections_total += 1

    def disconnect(self, session: Session) -> None:
        """Forget a connection: it leaves every room (presence goes out). Idempotent."""
        if self.sessions.pop(session.id, None) is None:
            return
        if session.expiry is not None and session.expiry.active():
            session.expiry.cancel()
        session.expiry = None
        self._by_protocol[session.protocol] -= 1
        self.addresses.release(session.address_key)
        session.address_key = None
        for name in list(session.rooms):
            try:
                self._leave(session, name)
            except Exception:
                # Never stop half-way: the session would stay a ghost in its other rooms.
                log.failure("{session} leaving {room} failed", session=session, room=name)

    def _token_expired(self, session: Session) -> None:
        session.expiry = None
        if session.id not in self.sessions:
            return
        log.info("{session}: token expired", session=session)
        session.token_expired()
        self.disconnect(session)  # whatever the adapter did: an expired session holds no room

    def claim_address(self, peer: str, protocol: str) -> str | None:
        """Count one more connection from ``peer``'s address; raises :class:`AddressFull` past the limit.

        :meth:`connect` does this for each session. An adapter whose
        connections exist before their session (SignalR: from negotiate on)
        claims for itself and gives the returned key back with
        :meth:`release_address` when the connection ends.
        """
        reason = self.addresses.refusal(peer)
        if reason is not None:
            self.metrics.limited("connections_per_ip", protocol)
            raise AddressFull(reason)
        return self.addresses.claim(peer)

    def release_address(self, key: str | None) -> None:
        """Give back what :meth:`claim_address` counted."""
        self.addresses.release(key)

    def identify(self, session: Session, user: object) -> str:
        """Set the session's user name, which cannot change once set.

        With a token the name is the token's (set at connect): no name
        means that one, another name is refused (``Forbidden``).
        """
        if session.identity is not None:
            if user is None or user == "":
                return session.identity.user
            name = validate.user(user)
            session.identity.check_user(name)
            return name
        name = validate.user(user)
        if session.user is None:
            session.user = name
        elif session.user != name:
            raise ChatError(f"user name is fixed for this connection: {session.user}")
        return name

    # -- rooms -------------------------------------------------------------

    def check_join(self, session: Session, room: object) -> str:
        """The room's name if ``session`` may join it now; raises otherwise, changing nothing.

        For requests that change something before they join (SignalR's
        ``SendToRoom`` names a guest first): refused, they must change nothing.
        """
        name = validate.room(room)
        if session.identity is not None:
            session.identity.check_room(name)
        if session.id not in self.sessions:
            raise ChatError("connection is closed")
        most = self.limits.rooms_per_connection
        if most and name not in session.rooms and len(session.rooms) >= most:
            self.metrics.limited("rooms_per_connection", session.protocol)
            raise TooManyRooms(f"too many rooms: a connection may be in {most} at once; leave one first")
        return name

    def join(self, session: Session, room: object, since_seq: int | None = None) -> Joined | defer.Deferred:
        """Add the session to a room and return the room's users.

        The session must have a user. With ``since_seq`` the kept messages
        after that seq are delivered to the session before it goes live, in
        the same reactor turn, so the replay and the live stream have neither
        a gap nor an overlap; the result says if some were older than what is
        kept (``truncated``, ``first_seq``). Joining a room already joined
        changes nothing (a resume replays again).

        Bad input raises at once and changes nothing. A resume answers with
        a Deferred (fired already when the room's history is in memory;
        otherwise once it has been read back from the store, off the
        reactor): the session joins only then, on the history it replayed.
        """
        name = self.check_join(session, room)
        if session.user is None:
            raise ChatError("a user name is needed to join a room")
        if since_seq is None:
            return self._enter(session, name, Joined())
        return self.store.using(name, lambda: self._resume(session, name, since_seq))

    def _resume(self, session: Session, name: str, since_seq: int) -> Joined:
        """The rest of a join with ``since_seq``, once the room's history is in memory."""
        if session.id not in self.sessions:
            raise SessionClosed("connection is closed")
        self.check_join(session, name)  # the wait may have let other joins take the last room slot
        resume = self.store.since(name, since_seq)
        joined = Joined()
        joined.truncated, joined.first_seq, joined.last_seq = resume.truncated, resume.first_kept, resume.last_seq
        for message in resume.messages:
            session.replay(message)
            # Kept messages hold no frames: a replay encodes for one session only.
            message.forget_encodings()
        # The replay may have overflowed a slow session and closed it:
        # joining it now would leave a ghost member nobody can remove.
        if session.id not in self.sessions:
            raise SessionClosed("connection is closed: too slow to take the replay")
        return self._enter(session, name, joined)

    def _enter(self, session: Session, name: str, joined: Joined) -> Joined:
        r = self._room(name)
        if session.id not in r.sessions:
            r.sessions[session.id] = session
            session.rooms.add(name)
            count = r.users.get(session.user, 0)
            r.users[session.user] = count + 1
            if count == 0:
                self.broker.publish(
                    Presence(name, "join", session.user, self.clock.seconds(), session.protocol, len(r.users))
                )
        joined.extend(self.broker.members(name, list(r.users)))
        return joined

    def leave(self, session: Session, room: object) -> None:
        """Remove the session from a room it is in."""
        name = validate.room(room)
        if name not in session.rooms:
            raise ChatError(f"not in room {name}")
        self._leave(session, name)

    def _leave(self, session: Session, name: str) -> None:
        session.rooms.discard(name)
        session.last_seqs.pop(name, None)
        r = self._rooms.get(name)
        if r is None or r.sessions.pop(session.id, None) is None:
            return
        user = session.user or ""
        left = r.users[user] - 1
        if left:
            r.users[user] = left
        else:
            del r.users[user]
            self.broker.publish(
                Presence(name, "leave", user, self.clock.seconds(), session.protocol, len(r.users))
            )
        self._vacate(r)

    def _room(self, name: str) -> _Room:
        r = self._rooms.get(name)
        if r is None:
            r = self._rooms[name] = _Room(name)
            # Its history stays in memory while anyone is in it (see chatd.store).
            self.store.hold(name)
        return r

    def _vacate(self, r: _Room) -> None:
        """Forget a room nobody here is in any more; its history leaves memory with it."""
        if not r.sessions and self._rooms.get(r.name) is r:
            del self._rooms[r.name]
            self.store.release(r.name)

    def members(self, room: object, identity: Identity | None = None) -> list[str]:
        """The users in a room now (on every process), in the order they came."""
        name = validate.room(room)
        if identity is not None:
            identity.check_room(name)
        return self.broker.members(name, self.local_users(name))

    def local_users(self, room: str) -> list[str]:
        """The users in a room on this process."""
        r = self._rooms.get(room)
        return list(r.users) if r else []

    def local_presence(self) -> dict[str, dict[str, int]]:
        """Every room's users on this process and how many sessions each has there."""
        return {name: dict(r.users) for name, r in self._rooms.items() if r.users}

    def rooms(self) -> dict[str, int]:
        """Every room with anyone in it, and how many users it has."""
        return {name: len(r.users) for name, r in self._rooms.items() if r.users}

    def sessions_of(self, user: str) -> list[Session]:
        return [s for s in self.sessions.values() if s.user == user]

    # -- messages ----------------------------------------------------------

    def publish(
        self,
        room: object,
        user: object,
        text: object,
        protocol: str,
        client_id: object = None,
        identity: Identity | None = None,
        *,
        source: Session | str | None = None,
    ) -> defer.Deferred:
        """Validate, number, store and fan out one chat message, the one path for every adapter.

        Bad input and the rate limit raise :class:`ChatError` at once and
        change nothing. Otherwise the returned Deferred fires with the
        message once the store holds it and it has been fanned out (the
        moment an adapter may acknowledge it), or fails with
        :class:`~chatd.store.StoreUnavailable` when it could not be stored.
        A retry with a ``client_id`` already stored in the room fires with
        the original message and is neither stored nor delivered again.
        With an ``identity`` (a token's) the sender must be its user (a
        missing one means it) and the room one it allows (``Forbidden``).

        ``source`` is who sends, for the per-connection rate: the sending
        session, or for a call with no session (gRPC ``SendMessage``) the
        peer, whose client address is then the bucket. Both rates are
        checked before either is charged, so a refusal costs nothing.
        """
        name = validate.room(room)
        if identity is not None:
            identity.check_room(name)
            if user is None or user == "":
                user = identity.user
        sender = validate.user(user)
        if identity is not None:
            identity.check_user(sender)
        body = validate.message(text, self.limits)
        key = validate.client_id(client_id)
        session = source if isinstance(source, Session) else None
        self._refuse_if_leaving(session)
        # One look at each bucket: a refusal by the second gives the first its token back.
        user_rate, bucket = self._user_rate, self._bucket(source)
        if user_rate is not None and not user_rate.take(sender):
            raise self._rate_limited(sender)
        if bucket is not None and not self._connection_rate.take(bucket):  # type: ignore[union-attr]
            if user_rate is not None:
                user_rate.refund(sender)
            raise self._connection_limited(source, bucket, protocol)
        d = self.store.add(name, sender, body, self.clock.seconds(), protocol, key)
        if session is not None:
            session.in_flight += 1
        d.addCallbacks(self._stored, self._not_stored, callbackArgs=(session,), errbackArgs=(protocol, session))
        return d

    def check_rate(self, user: str, source: Session | str | None = None, protocol: str = "none") -> None:
        """Raise :class:`RateLimited` if ``user`` (or ``source``, see :meth:`publish`) may not send now.

        Takes nothing from the buckets. For requests that change something
        before they publish (the seed form joins first): refused, they must
        change nothing.
        """
        self._refuse_if_leaving(source if isinstance(source, Session) else None)
        if self._user_rate is not None and not self._user_rate.allows(user):
            raise self._rate_limited(user)
        bucket = self._bucket(source)
        if bucket is not None and not self._connection_rate.allows(bucket):  # type: ignore[union-attr]
            raise self._connection_limited(source, bucket, protocol)

    @staticmethod
    def _refuse_if_leaving(session: Session | None) -> None:
        """A session the drain is waiting to tell to go sends nothing more (see ``chatd.drain``)."""
        if session is not None and session.leaving:
            raise ShuttingDown("server shutting down, reconnect shortly: message not sent")

    def _connection_limited(
        self, source: Session | str | None, bucket: tuple[str, object], protocol: str
    ) -> ConnectionRateLimited:
        rate = self._connection_rate
        assert rate is not None
        self.metrics.limited("connection_rate", protocol)
        who = "this connection" if isinstance(source, Session) else f"address {bucket[1]}"
        return ConnectionRateLimited(
            f"rate limited: {who} may send {rate.rate} messages a second "
            f"(bursts of {rate.burst}); try again shortly"
        )

    def _bucket(self, source: Session | str | None) -> tuple[str, object] | None:
        """The per-connection rate bucket of ``source`` (None: not limited)."""
        if self._connection_rate is None or source is None:
            return None
        if isinstance(source, Session):
            return ("session", source.id)
        ip = address(source)
        return ("address", ip) if ip is not None else None

    def _rate_limited(self, user: str) -> RateLimited:
        rate = self._user_rate
        assert rate is not None
        return RateLimited(
            f"rate limited: {user} may send {rate.rate} messages a second "
            f"(bursts of {rate.burst}); try again shortly"
        )

    def _stored(self, stored: Stored, source: Session | None = None) -> Message:
        if source is not None:
            source.in_flight -= 1
        message = stored.message
        if not stored.duplicate:
            self.messages_total += 1
            self._rate.add()
            self.metrics.received(message.protocol)
            self.broker.stored(message)
        return message

    def _not_stored(self, failure: Failure, protocol: str, source: Session | None = None) -> Failure:
        if source is not None:
            source.in_flight -= 1
        self.metrics.error("not_stored", protocol)
        return failure

    def deliver(self, event: Event) -> None:
        """Hand an event to every local session in its room (called by the broker)."""
        r = self._rooms.get(event.room)
        if r is None:
            return
        # A delivery may close a slow session, which edits the room: iterate a copy.
        sessions: list[Session]
        if event.kind == "presence":
            sessions = [s for s in r.sessions.values() if s.hears_presence]
        else:
            sessions = list(r.sessions.values())
        for session in sessions:
            try:
                session.deliver(event)
            except Exception:
                self.metrics.error("delivery_failed", session.protocol)
                log.failure("delivery to {session} failed", session=session)
        event.forget_encodings()
        if event.kind == "message":
            self.deliveries_total += len(sessions)
            self.metrics.fanned_out("message", self.clock.seconds() - event.time)
        else:
            self.metrics.fanned_out(event.kind, None)
        # A delivery that closed the room's last member may have removed the
        # room already (the nested leave's own fan-out); remove only this one.
        self._vacate(r)

    def history(self, room: object, limit: object = None, identity: Identity | None = None) -> defer.Deferred:
        """The last ``limit`` kept messages of a room, oldest first (a room the token allows).

        Bad input raises at once. The Deferred has fired already when the
        room is in memory; otherwise it fires once the room has been read
        back from the store, off the reactor.
        """
        name = validate.room(room)
        if identity is not None:
            identity.check_room(name)
        return self.store.read_recent(name, validate.limit(limit, self.limits))

    # -- statistics --------------------------------------------------------

    def uptime(self) -> float:
        return self.clock.seconds() - self.started_at

    def stats(self) -> dict:
        """The figures ``/stats``, gRPC ``GetStats`` and the manhole report."""
        per_protocol = {p: n for p, n in sorted(self._by_protocol.items())}
        for p in ("websocket", "signalr", "grpc"):
            per_protocol.setdefault(p, 0)
        return {
            "connections": {"total": len(self.sessions), **per_protocol},
            "connections_accepted": self.connections_total,
            "rooms": len(self.rooms()),
            "memory": {"room_table": len(self._rooms), **self.store.memory()},
            "history": self.store.writes(),
            "messages": {
                "total": self.messages_total,
                "per_second": self._rate.per_second(),
                "deliveries": self.deliveries_total,
            },
            "uptime": round(self.uptime(), 3),
        }
