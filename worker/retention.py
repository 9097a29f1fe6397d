"""Retention: deleting what `retention-days` and `audit-retention-days` let go of.

It runs on its own thread and Postgres connection beside the poller, so dispatch never waits
for a batch. Each batch (`RETENTION_BATCH` rows, its own short transaction, rows locked by
others skipped) is followed by a rest three times as long as the batch took, so a large
backlog takes at most about a quarter of one Postgres backend while delivery goes on; with
nothing (more) to delete it looks again after `RETENTION_SECONDS`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import psycopg
from psycopg.rows import dict_row

from outbox import logs
from outbox.connections import connect_poller
from outbox.core.settings import Settings
from outbox.store.sql import queries
from worker import metrics

Q = queries("worker")
log = logs.get("outbox.poller")

RETENTION_SECONDS = 60.0
RETENTION_BATCH = 500
REST_PER_BATCH_SECOND = 3.0  # rest after a full batch, per second the batch took
RETRY_SECONDS = 5.0  # after an error (Postgres away): look again then
JOIN_SECONDS = 10.0  # how long a stopping poller waits for the batch in progress


class Retention:
    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self._conn: psycopg.Connection[Any] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- one pass ------------------------------------------------------------------------

    def batch(self, conn: psycopg.Connection[Any]) -> bool:
        """One batch of each kind the settings ask for; True when a batch came back full
        (more is waiting)."""
        with conn.cursor(row_factory=dict_row) as cur:
            settings = Settings.model_validate(cur.execute(Q["settings"]).fetchone() or {})
        more = False
        for days, query in (
            (settings.retention_days, "retention_messages"),
            (settings.audit_retention_days, "retention_history"),
        ):
            if not days:
                continue
            with conn.cursor(row_factory=dict_row) as cur:
                row = cur.execute(Q[query], {"days": days, "batch": RETENTION_BATCH}).fetchone() or {}
            for table, n in row.items():
                metrics.RETENTION_DELETED.labels(table).inc(n)
            if any(row.values()):
                log.info("retention", days=days, **row)
            more = more or max(row.values(), default=0) >= RETENTION_BATCH
        return more

    # -- the thread ----------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="outbox-retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop after the batch in progress (if any)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(JOIN_SECONDS)

    def _run(self) -> None:
        # A pass runs first, then the stop is looked at: a short `run --until-idle` still
        # applies retention once.
        while True:
            began = time.monotonic()
            try:
                more = self.batch(self._connection())
                rest = (time.monotonic() - began) * REST_PER_BATCH_SECOND if more else RETENTION_SECONDS
            except psycopg.Error as exc:
                log.warning("retention: cannot reach Postgres; trying again", error=str(exc).strip())
                self._close()
                rest = RETRY_SECONDS
            except Exception:
                log.exception("retention failed; trying again")
                rest = RETRY_SECONDS
            if self._stop.wait(max(rest, 0.01)):
                break
        self._close()

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = connect_poller(self.database_url)
        return self._conn

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None
