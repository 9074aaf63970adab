"""Prometheus metrics, one registry per hub (never the process-global one).

Two kinds of figures:

* what the hub already counts (connections per protocol, gRPC streams,
  rooms, deliveries, uptime) is read at scrape time by :class:`HubCollector`, so the hot path
  pays nothing for it;
* what the hub does not otherwise keep is counted by :class:`HubMetrics`,
  which the hub owns as ``hub.metrics``: messages received per protocol,
  events fanned out, sessions closed for slowness, errors by kind, refusals
  by configured limit (``limited``), and a
  histogram of publish-to-deliver latency. Fan-out counts once
  per event, never once per recipient.

Adapters report through ``hub.metrics``: ``error(kind, protocol)`` for a
refused or failed request and ``too_slow(protocol)`` when a session is
closed for not reading. Both are thread-safe (prometheus_client locks), so a
gRPC worker thread may call them directly. gRPC streams are counted from the
hub's sessions, with no call from the adapter.

Served at ``/metrics`` on the WebSocket listener by :class:`MetricsResource`,
which renders on the reactor thread: the collectors read hub state that only
the reactor thread may touch (see its docstring).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client import metrics as _prometheus_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString
from twisted.web.resource import Resource
from twisted.web.server import Request

__all__ = ["HubCollector", "HubMetrics", "MetricsResource"]

PROTOCOLS = ("websocket", "signalr", "grpc")

# Local fan-out is sub-millisecond; a broker hop adds milliseconds; seconds mean trouble.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class MetricsResource(Resource):
    """``/metrics``: a registry in the Prometheus text (or OpenMetrics) format, rendered on the reactor.

    prometheus_client's own Twisted resource runs its WSGI app in the
    reactor's thread pool, so :class:`HubCollector` iterated the hub's dicts
    while the reactor was changing them and scrapes under churn failed with
    ``dictionary changed size during iteration``. Rendering here, in the
    reactor thread, reads a consistent hub; for this registry (a few dozen
    samples) that costs far less than one message's fan-out. Supports the
    same ``Accept`` negotiation and ``name[]`` filter; no gzip, to keep CPU
    off the reactor.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        encoder, content_type = choose_encoder(accept)
        registry: Collector = self._registry
        names = request.args.get(b"name[]")
        if names:
            registry = self._registry.restricted_registry([n.decode("utf-8", "replace") for n in names])
        output = encoder(registry)
        request.setHeader(b"content-type", content_type.encode("latin-1"))
        request.setHeader(b"cache-control", b"no-store")
        return output

    render_HEAD = render_GET


class HubCollector(Collector):
    """Figures the hub keeps anyway, read when Prometheus scrapes (on the reactor thread)."""

    def __init__(self, hub: Any) -> None:
        self._hub = hub

    def collect(self) -> Iterator[Any]:
        hub = self._hub
        stats = hub.stats()
        return self._families(
            {protocol: count for protocol, count in stats["connections"].items() if protocol != "total"},
            accepted=hub.connections_total,
            # Every open gRPC stream (StreamMessages, Chat) is a hub session; unary calls are not.
            grpc_streams=stats["connections"].get("grpc", 0),
            rooms=stats["rooms"],
            deliveries=hub.deliveries_total,
            accepting=int(hub.running and hub.accepting),
            store_healthy=int(hub.store.problem is None),
            uptime=hub.uptime(),
        )

    def describe(self) -> Iterator[Any]:
        """The families :meth:`collect` yields, without reading the hub: their names, for ``?name[]=``.

        A registry maps a collector to its metric names when it is
        registered, from ``describe()``; without one (and ``auto_describe``
        off, the default) ``restricted_registry`` never calls the collector.
        """
        return self._families({}, 0, 0, 0, 0, 0, 0, 0.0)

    @staticmethod
    def _families(
        connections: dict[str, int],
        accepted: int,
        grpc_streams: int,
        rooms: int,
        deliveries: int,
        accepting: int,
        store_healthy: int,
        uptime: float,
    ) -> Iterator[Any]:
        family = GaugeMetricFamily(
            "chatd_connections", "Client connections open now, per protocol", labels=["protocol"]
        )
        for protocol, count in connections.items():
            family.add_metric([protocol], count)
        yield family
        yield CounterMetricFamily(
            "chatd_connections_accepted", "Client connections accepted since start", value=accepted
        )
        yield GaugeMetricFamily("chatd_grpc_streams", "gRPC server streams open now", value=grpc_streams)
        yield GaugeMetricFamily("chatd_rooms", "Rooms with at least one member", value=rooms)
        yield CounterMetricFamily(
            "chatd_deliveries", "Chat messages handed to a recipient session (one per recipient)", value=deliveries
        )
        yield GaugeMetricFamily(
            "chatd_accepting", "1 while the server takes new clients, 0 while draining", value=accepting
        )
        yield GaugeMetricFamily(
            "chatd_store_healthy",
            "1 while the history store (SQLite, or Redis with --redis) takes messages",
            value=store_healthy,
        )
        yield GaugeMetricFamily("chatd_uptime_seconds", "Seconds since the hub started", value=uptime)


class HubMetrics(Collector):
    """The hub's own counters and its registry; see the module docstring.

    The per-message figures (messages received, events fanned out, the
    latency histogram) are plain ints and a bucket list, counted on the
    reactor thread where the hub calls :meth:`received` and
    :meth:`fanned_out`, and turned into metric families only when scraped
    (:meth:`collect`): prometheus_client's ``Counter.inc`` and
    ``Histogram.observe`` each take a lock, about 6 µs of a message's
    40-50 µs of Python (``bench/fanout.py``'s figures, before). The rare
    ones (errors, refusals, slow closes) stay prometheus_client counters,
    thread-safe for the gRPC worker threads that report them.
    """

    def __init__(self, hub: Any) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._slow = Counter(
            "chatd_sessions_closed_slow",
            "Sessions closed because their send buffer overflowed",
            ["protocol"],
            registry=r,
        )
        self._errors = Counter(
            "chatd_errors", "Refused or failed requests, by kind", ["kind", "protocol"], registry=r
        )
        self._limited = Counter(
            "chatd_limit_refusals",
            "Connections closed or requests refused by a configured limit (see README, Security: Limits)",
            ["limit", "protocol"],
            registry=r,
        )
        for protocol in PROTOCOLS:
            self._slow.labels(protocol)
        #: protocol -> chat messages accepted for publishing
        self.received_by: dict[str, int] = dict.fromkeys(PROTOCOLS, 0)
        #: event kind -> events fanned out to a room
        self.out_by: dict[str, int] = dict.fromkeys(("message", "presence"), 0)
        #: publish-to-deliver latency: a count per bucket of LATENCY_BUCKETS (not cumulative), the last +Inf
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        #: when these figures started (their ``_created`` series, as prometheus_client's own types give)
        self.created = time.time()
        r.register(HubCollector(hub))
        r.register(self)  # collect(), below

    def received(self, protocol: str) -> None:
        """One message published by a client speaking ``protocol`` (reactor thread)."""
        by = self.received_by
        by[protocol] = by.get(protocol, 0) + 1

    def fanned_out(self, kind: str, latency: float | None) -> None:
        """One event handed to its room; ``latency`` (seconds since publish) for messages (reactor thread)."""
        by = self.out_by
        by[kind] = by.get(kind, 0) + 1
        if latency is not None:
            if latency < 0.0:
                latency = 0.0
            self.latency_counts[bisect_left(LATENCY_BUCKETS, latency)] += 1
            self.latency_sum += latency

    def collect(self) -> Iterator[Any]:
        """The per-message figures as metric families (at a scrape, on the reactor thread)."""
        # prometheus_client's Counter and Histogram add a ``_created`` series unless
        # disable_created_metrics() (or PROMETHEUS_DISABLE_CREATED_SERIES) says not to.
        created = self.created if getattr(_prometheus_metrics, "_use_created", True) else None
        received = CounterMetricFamily(
            "chatd_messages_received", "Chat messages accepted for publishing, per protocol", labels=["protocol"]
        )
        for protocol, count in self.received_by.items():
            received.add_metric([protocol], count, created=created)
        yield received
        out = CounterMetricFamily(
            "chatd_events_out", "Events fanned out to a room (once per event, not per recipient)", labels=["kind"]
        )
        for kind, count in self.out_by.items():
            out.add_metric([kind], count, created=created)
        yield out
        buckets, total = [], 0
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self.latency_counts):
            total += count
            buckets.append((floatToGoString(bound), total))
        latency = HistogramMetricFamily(
            "chatd_publish_to_deliver_seconds",
            "From publish to the last local recipient handed the message",
            buckets=buckets,
            sum_value=self.latency_sum,
        )
        if created is not None:  # HistogramMetricFamily takes no created= of its own
            latency.samples.append(Sample("chatd_publish_to_deliver_seconds_created", {}, created, None))
        yield latency

    def describe(self) -> Iterator[Any]:
        """Names for ``/metrics?name[]=`` (see :meth:`HubCollector.describe`): the families, from zeros at start."""
        return self.collect()

    def too_slow(self, protocol: str) -> None:
        """A session closed because it did not read fast enough."""
        self._slow.labels(protocol).inc()

    def limited(self, limit: str, protocol: str = "none") -> None:
        """A limit said no: ``limit`` names it (``connections_per_ip``, ``rooms_per_connection``,
        ``connection_rate``, ``idle_timeout``, ``handshake_timeout``, ``post_body``)."""
        self._limited.labels(limit, protocol).inc()

    def error(self, kind: str, protocol: str = "none") -> None:
        """A refused or failed request: ``kind`` is a short fixed word, never user text."""
        self._errors.labels(kind, protocol).inc()
