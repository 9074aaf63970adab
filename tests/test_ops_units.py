"""Operational pieces on their own: sd_notify, the drain, metrics, JSON logs,
manhole options. Fakes and ``task.Clock``; the only sockets are the Unix
datagram sockets that stand in for systemd's notification socket."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import uuid

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel
from twisted.python import usage
from twisted.python.failure import Failure

from chatd import ops, sdnotify, tap
from chatd.drain import GOING_AWAY, HURRY, Drain
from chatd.events import Event
from chatd.http import health
from chatd.hub import Hub, LocalBroker, ServerFull, Session
from chatd.logs import access_log_formatter, event_as_json, json_observer, printable

# -- sd_notify -------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path):
    """A bound datagram socket standing in for systemd; yields (env value, socket)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


def test_notify_writes_one_datagram_to_a_path_socket(notify_socket) -> None:
    path, sock = notify_socket
    assert sdnotify.notify("READY=1\nSTATUS=ok", {"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"READY=1\nSTATUS=ok"


def test_notify_reaches_an_abstract_namespace_socket() -> None:
    name = f"chatd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert sdnotify.notify("WATCHDOG=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_notify_without_systemd_is_a_quiet_no_op(tmp_path) -> None:
    assert sdnotify.notify("READY=1", {}) is False
    # A socket that went away is logged, not raised.
    assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False


def test_watchdog_interval_is_half_watchdogsec_and_only_for_this_pid() -> None:
    pid = str(os.getpid())
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}) == 15.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert sdnotify.watchdog_interval({}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "0"}) is None


class FakeListener(Service):
    def __init__(self, name: str) -> None:
        self.name = name
        self.listening: defer.Deferred = defer.Deferred()

    def whenListening(self) -> defer.Deferred:
        return self.listening


def _notifier_tree(environ):
    clock = Clock()
    sent: list[str] = []
    top = MultiService()
    a, b = FakeListener("a"), FakeListener("b")
    a.setServiceParent(top)
    b.setServiceParent(top)
    notifier = sdnotify.SystemdNotifier(clock, environ, send=lambda state, env: sent.append(state) or True)
    notifier.setServiceParent(top)
    return clock, sent, top, a, b


def test_ready_only_once_every_listener_is_up() -> None:
    clock, sent, top, a, b = _notifier_tree({})
    top.startService()
    clock.advance(0)
    a.listening.callback("port a")
    assert not any(s.startswith("READY=1") for s in sent)
    b.listening.callback("port b")
    assert [s for s in sent if s.startswith("READY=1")] and len(sent) == 1


def test_a_failed_listener_never_reports_ready() -> None:
    clock, sent, top, a, b = _notifier_tree({})
    top.startService()
    clock.advance(0)
    a.listening.callback("port a")
    b.listening.errback(RuntimeError("address in use"))
    assert sent == ["STATUS=a listener failed to start"]


def test_watchdog_pings_from_the_clock_and_stopping_stops_them() -> None:
    clock, sent, top, a, b = _notifier_tree({"WATCHDOG_USEC": "10000000"})
    top.startService()
    assert sent == ["WATCHDOG=1"]
    clock.advance(5)
    clock.advance(5)
    assert sent.count("WATCHDOG=1") == 3
    top.stopService()
    assert sent[-1].startswith("STOPPING=1")
    clock.advance(50)
    assert sent.count("WATCHDOG=1") == 3


# -- drain -----------------------------------------------------------------


class LeavingSession(Session):
    """Disconnects itself from the hub when told to go (as a real close handshake would)."""

    protocol = "fake"

    def __init__(self, hub: Hub, clock: Clock, leaves_after: float | None = 0.5) -> None:
        super().__init__("test")
        self.hub = hub
        self.clock = clock
        self.leaves_after = leaves_after
        self.told_at: float | None = None
        self.reason: str | None = None

    def deliver(self, event: Event) -> None:
        pass

    def close(self, reason: str) -> None:
        self.hub.disconnect(self)

    def going_away(self, reason: str) -> None:
        self.told_at = self.clock.seconds()
        self.reason = reason
        if self.leaves_after is not None:
            self.clock.callLater(self.leaves_after, self.hub.disconnect, self)


def _drain_setup(n: int, timeout: float = 10, batch: int = 2, leaves_after: float | None = 0.5):
    clock = Clock()
    hub = Hub(clock)
    hub.startService()
    sessions = [LeavingSession(hub, clock, leaves_after) for _ in range(n)]
    for s in sessions:
        hub.connect(s)
    drain = Drain(hub, clock, timeout=timeout, batch_size=batch, rng=lambda: 0.5)
    return clock, hub, sessions, drain


def test_drain_turns_health_503_and_refuses_new_sessions_at_once() -> None:
    clock, hub, sessions, drain = _drain_setup(4)
    assert health(hub, "websocket")[0] == 200
    done = drain.stopService()
    assert health(hub, "websocket") == (503, health(hub, "websocket")[1])
    assert health(hub, "websocket")[1]["status"] == "unhealthy"
    with pytest.raises(ServerFull):
        hub.connect(LeavingSession(hub, clock))
    assert not done.called


def test_drain_tells_sessions_in_paced_jittered_batches_then_finishes() -> None:
    clock, hub, sessions, drain = _drain_setup(6, timeout=10, batch=2)
    done = drain.stopService()
    # Three batches over a 5 s spread: slices of 5/3 s, each at the middle (rng 0.5).
    assert drain.schedule(3) == pytest.approx([5 / 6, 15 / 6, 25 / 6])
    clock.advance(1)
    assert [s.told_at for s in sessions[:2]] == [1, 1] and sessions[2].told_at is None
    assert all(s.reason == GOING_AWAY for s in sessions[:2])
    clock.pump([1] * 4)
    assert all(s.told_at is not None for s in sessions)
    assert sorted({s.told_at for s in sessions}) == [1, 3, 5]
    assert not done.called
    clock.pump([0.05] * 20)
    assert done.called and not hub.sessions


def test_drain_tells_a_session_with_a_message_in_the_store_once_it_is_answered() -> None:
    clock, hub, sessions, drain = _drain_setup(2, timeout=4, batch=2)
    busy, idle = sessions
    busy.in_flight = 1
    done = drain.stopService()
    clock.advance(1)  # the batch's time
    assert idle.told_at == 1 and busy.told_at is None
    clock.advance(0.5)
    assert busy.told_at is None
    busy.in_flight = 0  # the store answered; its sender has its ``sent``
    clock.advance(drain.poll_interval)
    assert busy.told_at == pytest.approx(1.55)
    clock.pump([0.05] * 20)
    assert done.called and not hub.sessions


def test_drain_drops_a_session_whose_message_never_leaves_the_store_at_the_timeout() -> None:
    clock, hub, sessions, drain = _drain_setup(1, timeout=4)
    sessions[0].in_flight = 1
    done = drain.stopService()
    clock.pump([0.5] * 7)
    assert not done.called and sessions[0].told_at is None
    clock.advance(0.5)
    assert done.called and not hub.sessions


def test_drain_tells_a_session_that_keeps_sending_well_before_the_timeout() -> None:
    """A client sending every 0.1 s during the drain, to a store answering each message in
    0.2 s, always has one in flight: it must still be told to go, not be cut at the timeout."""
    from chatd.validate import ChatError

    clock, hub, sessions, drain = _drain_setup(1, timeout=10, batch=1)
    (sender,) = sessions
    hub.identify(sender, "alice")
    hub.join(sender, "r")
    add = hub.store.add

    def slow_add(*args, **kwargs):
        answer: defer.Deferred = defer.Deferred()
        add(*args, **kwargs).addBoth(lambda r: clock.callLater(0.2, answer.callback, r))
        return answer

    hub.store.add = slow_add
    acked: list = []
    refused: list = []

    def send() -> None:
        if sender.id in hub.sessions and sender.told_at is None:
            try:
                hub.publish("r", "alice", "more", "websocket", source=sender).addCallback(acked.append)
            except ChatError as e:
                refused.append(e.reason)  # refused with a reason: nothing lost
            clock.callLater(0.1, send)

    send()
    done = drain.stopService()
    clock.pump([0.05] * 100)  # 5 s: half the drain timeout
    assert sender.told_at is not None, f"not told after 5 s; in_flight={sender.in_flight}, acked={len(acked)}"
    assert sender.in_flight == 0
    assert refused and all("shutting down" in r for r in refused)
    clock.pump([0.05] * 120)
    assert done.called


def test_drain_jitter_differs_between_batches() -> None:
    import random

    clock, hub, sessions, drain = _drain_setup(0)
    drain._rng = random.Random(7).random
    times = drain.schedule(10)
    gaps = {round(b - a, 6) for a, b in zip(times, times[1:])}
    assert len(gaps) > 1 and times == sorted(times) and times[-1] < drain.spread


def test_drain_stops_at_the_timeout_when_clients_do_not_leave() -> None:
    clock, hub, sessions, drain = _drain_setup(3, timeout=4, leaves_after=None)
    done = drain.stopService()
    clock.pump([0.5] * 7)
    assert not done.called and len(hub.sessions) == 3
    clock.advance(0.5)
    assert done.called and not hub.sessions


def test_drain_with_no_sessions_finishes_at_once_and_clears_the_sigterm_exit() -> None:
    class FakeReactor:
        _exitSignal = signal.SIGTERM

    clock, hub, sessions, drain = _drain_setup(0)
    drain._reactor = FakeReactor
    done = drain.stopService()
    assert done.called and FakeReactor._exitSignal is None
    assert not clock.getDelayedCalls()


class _Signals:
    """Twisted's handlers as a stand-in (they record), restored after the test."""

    def __enter__(self):
        self.before = {n: signal.getsignal(n) for n in (signal.SIGTERM, signal.SIGINT, HURRY)}
        self.twisted: list[int] = []
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, lambda n, f: self.twisted.append(n))
        return self

    def send(self, number: int) -> None:
        signal.getsignal(number)(number, None)

    def __exit__(self, *exc) -> None:
        for number, handler in self.before.items():
            signal.signal(number, handler)


class _ImmediateReactor:
    @staticmethod
    def callFromThread(f, *args):  # noqa: N802 (Twisted's name)
        f(*args)

    callWhenRunning = callFromThread  # the reactor runs already


def test_a_second_sigterm_ends_the_drain_at_once_and_a_third_changes_nothing() -> None:
    clock, hub, sessions, drain = _drain_setup(3, timeout=10, leaves_after=None)
    drain._reactor, drain.owns_process = _ImmediateReactor, True
    with _Signals() as signals:
        drain.startService()
        signals.send(signal.SIGTERM)
        assert signals.twisted == [signal.SIGTERM]  # the first is Twisted's: it stops the reactor
        done = drain.stopService()
        clock.advance(1)
        assert not done.called and len(hub.sessions) == 3
        signals.send(signal.SIGTERM)
        assert done.called and not hub.sessions
        signals.send(signal.SIGINT)  # and again: nothing more to do, nothing raised
        assert signals.twisted == [signal.SIGTERM]


def test_a_second_signal_before_the_drain_starts_ends_it_as_soon_as_it_does() -> None:
    """Two SIGTERMs almost together: both came before the reactor stopped the services."""
    clock, hub, sessions, drain = _drain_setup(2, timeout=10, leaves_after=None)
    drain._reactor, drain.owns_process = _ImmediateReactor, True
    with _Signals() as signals:
        drain.startService()
        signals.send(signal.SIGTERM)
        signals.send(signal.SIGTERM)
        assert signals.twisted == [signal.SIGTERM]
        done = drain.stopService()
        assert done.called and not hub.sessions


def test_a_worker_takes_more_sigterms_as_already_stopping_and_ends_its_drain_on_the_supervisors_hurry() -> None:
    clock, hub, sessions, drain = _drain_setup(2, timeout=10, leaves_after=None)
    drain._reactor, drain.owns_process, drain.worker = _ImmediateReactor, True, True
    with _Signals() as signals:
        drain.startService()
        signals.send(HURRY)  # the supervisor's, before this worker's own SIGTERM was handled: kept
        signals.send(signal.SIGTERM)  # systemd's
        signals.send(signal.SIGTERM)  # the supervisor's: not a hurry
        assert signals.twisted == [signal.SIGTERM]
        done = drain.stopService()
        assert done.called and not hub.sessions


def test_a_drain_in_a_process_it_does_not_own_leaves_the_signal_handlers_alone() -> None:
    clock, hub, sessions, drain = _drain_setup(1)
    before = signal.getsignal(signal.SIGTERM)
    drain.startService()
    drain.stopService()
    assert signal.getsignal(signal.SIGTERM) is before


class FakePort:
    reading = True

    def stopReading(self) -> None:
        self.reading = False


def test_drain_stops_accepting_on_inherited_sockets_and_leaves_the_others_refusing() -> None:
    clock, hub, sessions, drain = _drain_setup(2)
    top = MultiService()
    options = {"ws": "systemd:domain=INET:index=0", "signalr": "tcp:8081", "web": "systemd:domain=INET:index=1"}
    ports = {}
    for name in ("ws", "signalr", "web"):
        listener = tap.Listener(None, None)
        listener.setName(name)
        listener.port = ports[name] = FakePort()
        listener.setServiceParent(top)
    unbound = tap.Listener(None, None)  # a socket-activated listener that never started
    unbound.setName("manhole")
    unbound.setServiceParent(top)
    Service().setServiceParent(top)  # not a listener at all
    options["manhole"] = "systemd:domain=INET:index=2"
    drain.held = ops.inherited_listeners(top, options)
    assert [listener.name for listener in drain.held] == ["ws", "web", "manhole"]
    assert all(port.reading for port in ports.values())
    drain.stopService()
    # The kernel now queues new connections on those sockets for the next
    # process; the socket this process bound itself still answers, with 1013.
    assert {name: port.reading for name, port in ports.items()} == {"ws": False, "signalr": True, "web": False}
    with pytest.raises(ServerFull):
        hub.connect(LeavingSession(hub, clock))


def test_drain_runs_before_listeners_stop_in_the_real_tree() -> None:
    options = tap.Options(environ={})
    options.parseOptions(["--ws", "tcp:0"])
    names = [s.name for s in tap.makeService(options, reactor=Clock())]
    assert names[:3] == ["gc", "event-dispatch", "hub"]
    assert names[-2:] == ["drain", "sd-notify"]
    assert names.index("ws") < names.index("drain")



def test_a_process_alone_tells_its_clients_to_go_within_a_second_and_one_of_several_spreads_them() -> None:
    """Without Redis nothing else takes the clients while chatd drains: a long spread only kept them refused.

    In the W5 restart storm (10,000 clients, full-jitter backoff) the drain's
    goodbyes spread over 5 s kept the port refusing for 6 s and the last
    client came back 16 s after the restart; over 1 s, 5 s. With Redis, other
    processes take the reconnects, so they are still spread over half the
    drain timeout.
    """

    def drain(*args: str) -> Drain:
        options = tap.Options(environ={})
        options.parseOptions(["--ws", "tcp:0", "--drain-timeout", "10", *args])
        return tap.makeService(options, reactor=Clock()).getServiceNamed("drain")

    assert drain().spread <= 1.0
    assert drain("--redis", "redis://127.0.0.1:1/0").spread == 5.0


# -- metrics ---------------------------------------------------------------


class CountingSession(Session):
    protocol = "websocket"

    def deliver(self, event: Event) -> None:
        pass

    def close(self, reason: str) -> None:
        pass


def _scrape(hub: Hub) -> dict[tuple[str, tuple], float]:
    text = generate_latest(hub.metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_count_per_event_and_keep_each_hub_apart() -> None:
    clock = Clock()
    hub, other = Hub(clock), Hub(clock)
    hub.startService()
    sessions = [CountingSession() for _ in range(3)]
    for i, s in enumerate(sessions):
        hub.connect(s)
        hub.identify(s, f"u{i}")
        hub.join(s, "lobby")
    hub.publish("lobby", "u0", "one", "websocket")
    hub.publish("lobby", "u1", "two", "signalr")
    hub.metrics.error("bad_request", "websocket")
    hub.metrics.too_slow("websocket")
    m = _scrape(hub)
    assert m[("chatd_connections", (("protocol", "websocket"),))] == 3
    assert m[("chatd_rooms", ())] == 1
    assert m[("chatd_messages_received_total", (("protocol", "websocket"),))] == 1
    assert m[("chatd_messages_received_total", (("protocol", "signalr"),))] == 1
    assert m[("chatd_events_out_total", (("kind", "message"),))] == 2
    assert m[("chatd_events_out_total", (("kind", "presence"),))] == 3
    assert m[("chatd_deliveries_total", ())] == 6
    assert m[("chatd_publish_to_deliver_seconds_count", ())] == 2
    assert m[("chatd_errors_total", (("kind", "bad_request"), ("protocol", "websocket")))] == 1
    assert m[("chatd_sessions_closed_slow_total", (("protocol", "websocket"),))] == 1
    assert m[("chatd_accepting", ())] == 1
    assert m[("chatd_grpc_streams", ())] == 0
    stream = CountingSession()
    stream.protocol = "grpc"
    hub.connect(stream)
    assert _scrape(hub)[("chatd_grpc_streams", ())] == 1
    # A second hub in the same process has its own, untouched registry.
    o = _scrape(other)
    assert o[("chatd_messages_received_total", (("protocol", "websocket"),))] == 0
    assert o[("chatd_deliveries_total", ())] == 0


def test_publish_to_deliver_latency_is_measured_from_the_publish_time() -> None:
    clock = Clock()
    hub = Hub(clock)

    class SlowBroker(LocalBroker):
        """Carries the event after 0.3 s, as a remote broker hop would."""

        def publish(self, event: Event) -> None:
            clock.callLater(0.3, hub.deliver, event)

        stored = publish

    hub.broker = SlowBroker(hub)
    s = CountingSession()
    hub.connect(s)
    hub.identify(s, "u")
    hub.join(s, "r")
    clock.advance(1)
    hub.publish("r", "u", "hello", "websocket")
    clock.advance(0.3)
    m = _scrape(hub)
    assert m[("chatd_publish_to_deliver_seconds_bucket", (("le", "0.25"),))] == 0
    assert m[("chatd_publish_to_deliver_seconds_bucket", (("le", "0.5"),))] == 1
    assert m[("chatd_publish_to_deliver_seconds_sum", ())] == pytest.approx(0.3)


# -- logs ------------------------------------------------------------------


def test_a_workers_log_lines_are_its_supervisors_format_with_its_number_and_whole_tracebacks() -> None:
    from chatd.logs import worker_observer

    def failure() -> Failure:
        try:
            raise ValueError("the reason, kept")
        except ValueError:
            return Failure()

    for fmt in ("text", "json"):
        out = io.StringIO()
        observer = worker_observer(out, environ={"CHATD_WORKER": "3", "CHATD_LOG_FORMAT": fmt})
        observer({"log_format": "hello {who}", "who": "you", "log_namespace": "chatd.hub",
                  "log_level": LogLevel.info, "log_time": 0.0})  # fmt: skip
        observer({"log_format": "it broke", "log_namespace": "chatd.redis", "log_level": LogLevel.critical,
                  "log_time": 0.0, "log_failure": failure()})  # fmt: skip
        text = out.getvalue()
        if fmt == "text":
            assert "[worker 3: chatd.hub#info] hello you" in text, text
            assert "[worker 3: chatd.redis#critical] it broke" in text, text
            assert "ValueError: the reason, kept" in text, text
        else:
            first, second = (json.loads(line) for line in text.splitlines())
            assert (first["worker"], first["message"], first["pid"]) == (3, "hello you", os.getpid())
            assert "ValueError: the reason, kept" in second["traceback"]


def test_json_observer_writes_one_parseable_line_per_event_without_extra_fields() -> None:
    out = io.StringIO()
    observer = json_observer(out)
    log = Logger(namespace="chatd.test", observer=observer)
    log.info("{peer} joined", peer="1.2.3.4", secret_body="do not print me")
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        log.failure("it broke")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "1.2.3.4 joined" and first["level"] == "info"
    assert first["logger"] == "chatd.test" and first["time"].endswith("Z")
    assert "do not print me" not in lines[0]
    assert second["level"] == "critical" and "ZeroDivisionError" in second["traceback"]


def test_event_as_json_survives_unserialisable_values() -> None:
    line = event_as_json({"log_format": "{x}", "x": object(), "log_level": LogLevel.warn, "log_time": 0})
    assert json.loads(line)["level"] == "warn"


# -- manhole options -------------------------------------------------------


def _parse(*args: str, environ: dict[str, str] | None = None) -> tap.Options:
    options = tap.Options(environ=environ or {})
    options.parseOptions(list(args))
    return options


def test_manhole_is_off_by_default() -> None:
    options = _parse()
    assert options["manhole"] == ""
    assert "manhole" not in [s.name for s in tap.makeService(options, reactor=Clock())]


def test_manhole_refuses_to_start_without_credentials(tmp_path) -> None:
    with pytest.raises(usage.UsageError, match="--manhole-keys"):
        _parse("--manhole", "2222")
    empty = tmp_path / "keys"
    empty.write_text("# nobody\n")
    with pytest.raises(usage.UsageError, match="no usable public key"):
        _parse("--manhole", "2222", "--manhole-keys", str(empty), "--manhole-host-key", str(tmp_path / "h"))
    with pytest.raises(usage.UsageError, match="cannot read"):
        _parse("--manhole", "2222", "--manhole-keys", str(tmp_path / "missing"))


def test_manhole_binds_loopback_unless_told_otherwise(tmp_path) -> None:
    from chatd.manhole import host_key

    keys = tmp_path / "authorized_keys"
    key = host_key(str(tmp_path / "client_key"))
    keys.write_bytes(key.public().toString("openssh") + b" ops@example\n")
    options = _parse(
        "--manhole-keys", str(keys), environ={"MANHOLE": "2222", "STATE_DIRECTORY": str(tmp_path)}
    )
    assert options["manhole"] == "tcp:2222:interface=127.0.0.1"
    assert options["manhole-host-key"] == str(tmp_path / "manhole_host_key")
    explicit = _parse(
        "--manhole",
        r"tcp:2222:interface=\:\:1",
        "--manhole-keys",
        str(keys),
        environ={"STATE_DIRECTORY": "/x"},
    )
    assert explicit["manhole"] == r"tcp:2222:interface=\:\:1"
    assert (
        _parse(
            "--manhole",
            "unix:/run/chatd/manhole",
            "--manhole-keys",
            str(keys),
            environ={"STATE_DIRECTORY": "/x"},
        )["manhole"]
        == "unix:/run/chatd/manhole"
    )


def test_host_key_is_created_private_once_and_then_reused(tmp_path) -> None:
    from chatd.manhole import host_key

    path = tmp_path / "host_key"
    first = host_key(str(path))
    assert (path.stat().st_mode & 0o777) == 0o600
    assert host_key(str(path)) == first
    assert (tmp_path / "host_key.pub").read_bytes().startswith(b"ssh-ed25519 ")


class _Request:
    """Just what the access-log formatter reads of a ``twisted.web`` request."""

    def __init__(self, headers: dict[bytes, bytes], uri: bytes = b"/health?id=secret") -> None:
        self.uri = uri
        self.method = b"GET"
        self.clientproto = b"HTTP/1.1"
        self.code = 200
        self.sentLength = 12
        self._headers = headers

    def getHeader(self, name: bytes) -> bytes | None:  # noqa: N802
        return self._headers.get(name)

    def getClientAddress(self):  # noqa: N802
        return IPv4Address("TCP", "127.0.0.1", 1234)


def test_access_log_escapes_control_characters_and_quotes_in_client_text() -> None:
    agent = b'evil\x1b[31mred\x07 "quoted" back\\slash\x7f\x00\ttab'
    line = access_log_formatter(
        "[ts]", _Request({b"user-agent": agent, b"referer": b"http://x/\x1b]0;t\x07?q=1"})
    )
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in line), repr(line)
    assert r'"evil\x1b[31mred\x07 \"quoted\" back\\slash\x7f\x00\ttab"' in line
    assert r'"http://x/\x1b]0;t\x07"' in line
    assert "secret" not in line and "q=1" not in line
    # Non-ASCII bytes stay visible as escapes too.
    assert r"\xff" in access_log_formatter("[ts]", _Request({b"user-agent": b"\xff"}))


def test_printable_escapes_every_line_breaking_or_terminal_control_character() -> None:
    assert printable("a\nb\r\x85c\u2028d\u2029e\x1b[2Jf\x7f") == r"a\nb\r\x85c\u2028d\u2029e\x1b[2Jf\x7f"
    assert printable("ünïcode ok") == "ünïcode ok"
    assert printable("x" * 10, limit=4) == "xxxx..."
