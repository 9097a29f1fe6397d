"""Prometheus metrics of the poller and workers (served when a metrics port is set)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

SENDS = Counter(
    "outbox_sends_total",
    "Delivery attempts by connector and resulting status",
    ["connector", "status"],
)
SMTP_REPLIES = Counter("outbox_smtp_replies_total", "Final SMTP reply codes seen", ["code"])
SEND_SECONDS = Histogram(
    "outbox_send_duration_seconds",
    "Time on the wire per message",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
DISPATCHED = Counter("outbox_dispatched_total", "Rows handed to the broker by the poller")
LEASES_EXPIRED = Counter("outbox_lease_expiries_total", "Leases that expired", ["state"])
STALE_DELIVERIES = Counter(
    "outbox_stale_deliveries_total",
    "Broker deliveries or results ignored because the lease had moved on",
)


def observe_send(connector: str, status: str, code: int | None, seconds: float) -> None:
    SENDS.labels(connector, status).inc()
    SMTP_REPLIES.labels(str(code) if code is not None else "none").inc()
    SEND_SECONDS.observe(seconds)


def serve(port: int | None) -> None:
    """Serve /metrics on 127.0.0.1:port (no endpoint when port is None)."""
    if port is not None:
        start_http_server(port, addr="127.0.0.1")
