"""Prometheus metrics of the poller and workers (served when a metrics port is set)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import psycopg
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from outbox import logs
from outbox.core import limits
from outbox.core.statuses import STATUSES
from outbox.store.sql import queries

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

# Provider limits
RATE_LIMITED = Counter(
    "outbox_rate_limited_total",
    "Messages that met their connector's rate limit: `paced` waited in the worker for a slot "
    "moments away, `deferred` went back to the queue until the window opens, `no-connection` went "
    "back because every session of its --max-connections was taken by other workers",
    ["connector", "outcome"],
)
THROTTLED = Counter(
    "outbox_throttled_total",
    "Attempts a server refused to slow us down (421/450/451/454 4.7.x, 452 4.5.3, 'throttling'): "
    "retried without spending an attempt",
    ["connector"],
)
RATE_LIMIT_WAITING = Gauge(
    "outbox_rate_limit_waiting",
    "Messages waiting in this worker process for their connector's rate-limit slot (paced)",
    ["connector"],
)
RATE_LIMIT = Gauge(
    "outbox_rate_limit_per_second",
    "Each connector's rate limits as messages a second (`limit`: as configured, e.g. 30/min; "
    "`slowed`: the adaptive slow-down after throttling replies, while it lasts)",
    ["connector", "limit"],
)
SESSIONS = Gauge(
    "outbox_connector_sessions",
    "SMTP sessions this worker process holds open to each connector (against --max-connections, "
    "a cap across all workers)",
    ["connector"],
)
LIMITER_ERRORS = Counter(
    "outbox_rate_limiter_errors_total",
    "Sends made without the rate limiter because Redis could not be reached",
)


RETRIES = Counter(
    "outbox_retries_total",
    "Attempts that ended in an automatic retry being scheduled",
    ["connector"],
)
RETENTION_DELETED = Counter(
    "outbox_retention_deleted_total",
    "Rows deleted by automatic retention (retention-days, audit-retention-days)",
    ["table"],
)
# Refreshed by the poller (at most every `metrics_refresh_seconds`) from partial indexes; `sent`
# on a big table is an estimate (see `status_gauges` in outbox/store/queries.sql).
MESSAGES = Gauge("outbox_messages", "Messages in the outbox by status", ["status"])
QUEUE_LAG = Gauge("outbox_queue_lag_seconds", "Age of the oldest due message (0 when none is due)")

_serving = False
_last_refresh = 0.0


# The labelled counters of observe_send, looked up once per label set (`labels()` takes a
# lock and checks its arguments each time; these series are never removed).
_sends: dict[tuple[str, str, int | None], tuple[Counter, Counter]] = {}


def observe_send(connector: str, status: str, code: int | None, seconds: float) -> None:
    key = (connector, status, code)
    counters = _sends.get(key)
    if counters is None:
        counters = _sends[key] = (
            SENDS.labels(connector, status),
            SMTP_REPLIES.labels(str(code) if code is not None else "none"),
        )
    counters[0].inc()
    counters[1].inc()
    if status == "retry":
        RETRIES.labels(connector).inc()
    SEND_SECONDS.observe(seconds)


def serve(port: int | None, host: str = "127.0.0.1") -> None:
    """Serve /metrics on host:port (no endpoint when port is None)."""
    global _serving
    if port is not None:
        start_http_server(port, addr=host)
        _serving = True
        logs.get("outbox.metrics").info("serving metrics", url=f"http://{host}:{port}/metrics")


def refresh_gauges(conn: psycopg.Connection[Any], every: float = 10.0) -> None:
    """Messages by status and the queue lag, at most once per `every` seconds, and only
    when this process serves metrics (bounded index lookups, never a scan of the table)."""
    global _last_refresh
    now = time.monotonic()
    if not _serving or now - _last_refresh < every:
        return
    _last_refresh = now
    counts = dict.fromkeys(STATUSES, 0)
    lag = 0.0
    for status, n, lag_seconds in conn.execute(queries("outbox.store")["status_gauges"]).fetchall():
        counts[status] = n
        if lag_seconds is not None:
            lag = max(lag, float(lag_seconds))
    for status, n in counts.items():
        MESSAGES.labels(status).set(n)
    QUEUE_LAG.set(lag)


_limits_shown: set[tuple[str, str]] = set()


def show_limits(connectors: Iterable[Any]) -> None:
    """The rate-limit gauges for these connectors (after each configuration read): their
    limits a second, and a throttling slow-down while it lasts; series of limits gone removed."""
    now = datetime.now(UTC)
    shown: set[tuple[str, str]] = set()
    for c in connectors:
        rates = limits.parse_rates(c.rate_limits)
        for r in rates:
            shown.add((c.name, str(r)))
            RATE_LIMIT.labels(c.name, str(r)).set(r.count / r.seconds)
        slowed = limits.slowdown(c.throttle_interval_seconds, c.throttled_at, rates, now)
        if slowed is not None:
            shown.add((c.name, "slowed"))
            RATE_LIMIT.labels(c.name, "slowed").set(1 / slowed)
    for gone in _limits_shown - shown:
        RATE_LIMIT.remove(*gone)
    _limits_shown.clear()
    _limits_shown.update(shown)
