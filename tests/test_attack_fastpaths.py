"""Attacks on the recent fast paths (fastwrite, deliver, fastpoll, close frames, metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from twisted.internet.task import Clock

from chatd.hub import Hub
from chatd.metrics import LATENCY_BUCKETS, PROTOCOLS


def _exercise(received, fanned_out) -> None:
    received("websocket")
    received("grpc")
    for latency in (0.0, 0.0005, 0.001, 0.003, 0.2, 7.0, -1.0):
        fanned_out("message", latency)
    fanned_out("presence", None)
    fanned_out("truncated", None)


def _reference() -> CollectorRegistry:
    """The per-message figures as chatd exposed them before 41e9c01 (prometheus_client's own types)."""
    r = CollectorRegistry()
    received = Counter("chatd_messages_received", "Chat messages accepted for publishing, per protocol", ["protocol"], registry=r)
    out = Counter("chatd_events_out", "Events fanned out to a room (once per event, not per recipient)", ["kind"], registry=r)
    latency = Histogram(
        "chatd_publish_to_deliver_seconds",
        "From publish to the last local recipient handed the message",
        buckets=LATENCY_BUCKETS,
        registry=r,
    )
    for p in PROTOCOLS:
        received.labels(p)
    for k in ("message", "presence"):
        out.labels(k)

    def fanned_out(kind, lat):
        out.labels(kind).inc()
        if lat is not None:
            latency.observe(max(0.0, lat))

    _exercise(lambda p: received.labels(p).inc(), fanned_out)
    return r


_OURS = ("chatd_messages_received", "chatd_events_out", "chatd_publish_to_deliver_seconds")


def _samples(text: str) -> dict[str, str]:
    """Sample line (name and labels) -> value, for the per-message families; ``_created`` values blanked."""
    got = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(_OURS):
            continue
        key, value = line.rsplit(" ", 1)
        got[key] = "T" if "_created" in key else value
    return got


def test_metrics_exposition_of_the_per_message_figures_is_unchanged_created_series_included() -> None:
    hub = Hub(Clock())
    _exercise(hub.metrics.received, hub.metrics.fanned_out)
    ref = _reference()
    for render in (generate_latest, generate_openmetrics):
        want = _samples(render(ref).decode())
        got = _samples(render(hub.metrics.registry).decode())
        assert got == want, sorted(set(want.items()) ^ set(got.items()))
