"""The poller: claims due rows, hands them to Dramatiq, commits once the broker has them.

It wakes on LISTEN/NOTIFY (an insert commits) and also scans on an interval and at the
next scheduled time. Each cycle first returns rows whose lease expired (a worker died,
Redis lost its keys) and held rows whose connector is enabled again.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import dramatiq
import psycopg
import redis
from psycopg.rows import dict_row
from tenacity import Retrying, retry_if_exception_type, wait_exponential, wait_random
from tenacity.stop import stop_base

from outbox import logs
from outbox.config import Config
from outbox.connections import connect_poller, pg_kwargs, redact_url
from outbox.core.settings import Settings
from outbox.store.sql import queries
from worker import metrics
from worker.retention import Retention

Q = queries("worker")
log = logs.get("outbox.poller")
CHANNEL = "outbox_message"
# Lease reaping, held-row release and settings reload happen at most this often.
MAINTENANCE_SECONDS = 1.0
# `run --until-idle`: how often to look whether the messages in flight have finished.
UNTIL_IDLE_CHECK_SECONDS = 0.1

REDIS_ERRORS = (
    dramatiq.errors.BrokerConnectionError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)
# Postgres down, Redis down: back off and carry on.
INFRA_ERRORS = (psycopg.OperationalError, *REDIS_ERRORS, ConnectionError)


class _Outage:
    """One warning line when a service cannot be reached, one info line when it is back; the
    retries in between are logged at debug level only (no traceback, no line per retry)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.down = False

    def failed(self, exc: BaseException | None) -> None:
        text = str(exc).strip()
        error = text.splitlines()[0] if text else type(exc).__name__
        if self.down:
            log.debug(f"still cannot reach {self.what}; retrying", error=error)
        else:
            self.down = True
            log.warning(f"cannot reach {self.what}; retrying", error=error)

    def recovered(self) -> None:
        if self.down:
            self.down = False
            log.info(f"reached {self.what} again")


class _stop_on_event(stop_base):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, retry_state: Any) -> bool:
        return self.event.is_set()


def chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass
class Cycle:
    dispatched: int = 0
    expired: int = 0
    released: int = 0


class Poller:
    def __init__(self, config: Config, actor: dramatiq.Actor[Any, Any]) -> None:
        self.config = config
        self.actor = actor
        self._conn: psycopg.Connection[Any] | None = None
        self._listen: psycopg.Connection[Any] | None = None
        self._stop = threading.Event()
        self._maintained_at = -MAINTENANCE_SECONDS
        self._settings = Settings()
        self._redis = _Outage(f"Redis at {redact_url(config.redis_url)}")
        self._postgres = _Outage("Postgres")

    # -- one cycle -------------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = connect_poller(self.config.database_url)
        return self._conn

    def run_once(self) -> Cycle:
        """Dispatch everything due; at most once a second first reap expired leases and release
        held rows (a wake-up per insert stays one query). Returns counts."""
        conn = self._connection()
        cycle = Cycle()
        if time.monotonic() - self._maintained_at >= MAINTENANCE_SECONDS:
            self._maintain(conn, cycle)
        while True:
            n = self._dispatch(conn, self._settings)
            cycle.dispatched += n
            if n < self.config.claim_batch:
                return cycle

    def _ping_redis(self) -> None:
        """Look whether Redis answers (once a second, with the maintenance), so that an
        outage is reported even while nothing is due. (An actor without a broker, as in some
        tests, has nothing to ping.)"""
        broker = getattr(self.actor, "broker", None)
        if broker is not None:
            broker.client.ping()
        self._redis.recovered()

    def _maintain(self, conn: psycopg.Connection[Any], cycle: Cycle) -> None:
        self._ping_redis()
        with conn.cursor(row_factory=dict_row) as cur:
            settings = self._settings = Settings.model_validate(cur.execute(Q["settings"]).fetchone() or {})
            reaped = cur.execute(
                Q["reap_expired"],
                {"max_attempts": settings.max_attempts, "ambiguous_policy": settings.ambiguous_policy},
            ).fetchone()
        if reaped:
            cycle.expired = reaped["dispatched"] + reaped["sending"]
            metrics.LEASES_EXPIRED.labels("dispatched").inc(reaped["dispatched"])
            metrics.LEASES_EXPIRED.labels("sending").inc(reaped["sending"])
            if cycle.expired:
                log.warning(
                    "leases expired",
                    dispatched=reaped["dispatched"],
                    sending=reaped["sending"],
                    failed=reaped["failed"],
                )
        cycle.released = conn.execute(Q["release_held"]).rowcount
        metrics.refresh_gauges(conn, self.config.metrics_refresh_seconds)
        self._maintained_at = time.monotonic()

    def _dispatch(self, conn: psycopg.Connection[Any], settings: Settings) -> int:
        """Claim one batch and enqueue it; the claim commits only once Redis has it all."""
        with conn.transaction():
            rows = conn.execute(
                Q["claim_due"],
                {
                    "limit": self.config.claim_batch,
                    "max_in_flight": self.config.max_in_flight,
                    "lease_seconds": settings.lease_seconds,
                },
            ).fetchall()
            for chunk in chunks([list(r) for r in rows], self.config.dispatch_batch):
                self.actor.send(chunk)
        metrics.DISPATCHED.inc(len(rows))
        return len(rows)

    def seconds_to_next_due(self) -> float | None:
        row = self._connection().execute(Q["seconds_to_next_due"]).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def pending(self) -> dict[str, int]:
        with self._connection().cursor(row_factory=dict_row) as cur:
            return dict(cur.execute(Q["pending_work"]).fetchone() or {})

    # -- the loop --------------------------------------------------------------------------

    def _listening(self) -> psycopg.Connection[Any]:
        """The LISTEN connection. It is opened before a scan, never after: an insert that
        commits before LISTEN is found by the scan, one after it wakes the wait."""
        if self._listen is None or self._listen.closed:
            url = self.config.database_url
            self._listen = psycopg.connect(url, autocommit=True, **pg_kwargs(url))
            self._listen.execute(f"LISTEN {CHANNEL}")
        return self._listen

    def _wait(self, timeout: float) -> None:
        """Sleep until a NOTIFY arrives, `timeout` passes or the poller is stopped."""
        listen = self._listening()
        deadline = time.monotonic() + max(0.0, timeout)
        while not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            for _ in listen.notifies(timeout=min(remaining, 0.5), stop_after=1):
                return

    def run(self, stop: threading.Event, *, until_idle: bool = False) -> None:
        """Poll until `stop` is set (or, with `until_idle`, until nothing is left to move)."""
        self._stop = stop
        log.info("poller started", queue=self.config.queue)
        retention = Retention(self.config.database_url)  # on its own thread: dispatch never waits
        retention.start()
        retrying = Retrying(
            stop=_stop_on_event(stop),
            sleep=stop.wait,
            wait=wait_exponential(multiplier=0.2, max=10) + wait_random(0, 0.5),
            retry=retry_if_exception_type(INFRA_ERRORS),
            reraise=True,
            before_sleep=self._failed,
        )
        try:
            while not stop.is_set():
                try:
                    for attempt in retrying:
                        with attempt:
                            if self._step(until_idle):
                                return
                except INFRA_ERRORS:
                    if stop.is_set():
                        return
                    raise
        finally:
            retention.stop()
            self.close()
            log.info("poller stopped")

    def _failed(self, retry_state: Any) -> None:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        (self._redis if isinstance(exc, REDIS_ERRORS) else self._postgres).failed(exc)

    def _step(self, until_idle: bool) -> bool:
        """One cycle and the wait after it; True when `until_idle` finds nothing left."""
        try:
            self._listening()
            cycle = self.run_once()
            self._postgres.recovered()
            wait = self.config.poll_interval_seconds
            if until_idle and cycle.dispatched == 0:
                p = self.pending()
                if p["due"] == 0 and p["in_flight"] == 0:
                    return True
                if p["in_flight"]:  # finishing: notice the last outcome soon, not a poll later
                    wait = min(wait, UNTIL_IDLE_CHECK_SECONDS)
            if cycle.dispatched:
                return False  # more may have arrived meanwhile: look again at once
            next_due = self.seconds_to_next_due()
            # Rows due now that the cycle left alone wait for room under `max_in_flight` (or
            # are being claimed by another poller): look again on the interval or a NOTIFY,
            # do not spin on them.
            if next_due is not None and next_due > 0:
                wait = min(wait, next_due)
            self._wait(wait)
            return False
        except INFRA_ERRORS:
            self.close()
            raise

    def close(self) -> None:
        for conn in (self._conn, self._listen):
            if conn is not None and not conn.closed:
                with contextlib.suppress(Exception):
                    conn.close()
        self._conn = self._listen = None
