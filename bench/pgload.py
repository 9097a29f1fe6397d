"""What a run costs Postgres: CPU of the server processes working for one database, WAL bytes
written, and row versions per table (pg_stat_user_tables).

The server is shared, so CPU is counted per process: every backend (and autovacuum worker)
whose `pg_stat_activity.datname` is the run's database, sampled from /proc every 50 ms by a
thread on a connection to the admin database (not counted). A backend that exits between two
samples loses at most its last 50 ms. WAL is what pg_walinspect finds for the database's
relations (records whose block references name it, and the commit records of their
transactions), read every second while the run goes on (the server recycles segments after a
checkpoint); where pg_walinspect is not available (or a segment was recycled before it was
read), the cluster's flushed-LSN delta, which counts anything else written on the server at the
same time too.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg

from bench.infra import cpu_seconds

TABLES = ("message", "attempt", "recipient")

# pg_stat_user_tables counters of the outbox tables (per table: ins, upd, hot, del, dead)
ROW_STATS_SQL = """
SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del, n_dead_tup
  FROM pg_stat_user_tables WHERE schemaname = 'outbox' AND relname = ANY(%s)
"""


def wal_lsn(admin_url: str) -> int:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_flush_lsn() - '0/0'::pg_lsn").fetchone()
    assert row is not None
    return int(row[0])


DB_WAL_SQL = """
WITH r AS MATERIALIZED (
    SELECT xid, record_length, fpi_length, block_ref
      FROM pg_get_wal_records_info('0/0'::pg_lsn + %(start)s::numeric, '0/0'::pg_lsn + %(end)s::numeric)),
x AS (SELECT DISTINCT xid FROM r WHERE xid <> '0' AND block_ref LIKE %(pattern)s)
SELECT coalesce(sum(record_length), 0), coalesce(sum(fpi_length), 0)
  FROM r WHERE block_ref LIKE %(pattern)s OR xid IN (SELECT xid FROM x)
"""


# Full-page images (of the WAL bytes measured last by database_wal; 0 when not known): the first
# change to a page after a checkpoint logs the whole page, so their share follows how often
# checkpoints come (other work on the server included), not the work per email.
last_fpi_bytes = 0
# Where the last WAL figure came from: "database" (pg_walinspect) or "cluster" (the LSN delta).
last_wal_source = "cluster"


def database_wal(url: str, start: int, end: int) -> int:
    """WAL bytes written for this database's relations between two LSNs (pg_walinspect, made
    in this database); the cluster's delta when that cannot be read."""
    global last_fpi_bytes
    last_fpi_bytes = 0
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
            row = conn.execute("SELECT oid FROM pg_database WHERE datname = current_database()").fetchone()
            assert row is not None
            got = conn.execute(
                DB_WAL_SQL, {"start": start, "end": end, "pattern": f"%/{row[0]}/%"}
            ).fetchone()
            assert got is not None
            last_fpi_bytes = int(got[1])
            return int(got[0])
    except psycopg.Error:
        return end - start


def row_stats(url: str) -> dict[str, dict[str, int]]:
    """Row versions written per outbox table so far (after the writers' stats were flushed)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        rows = conn.execute(ROW_STATS_SQL, [list(TABLES)]).fetchall()
    return {r[0]: {"ins": r[1], "upd": r[2], "hot_upd": r[3], "del": r[4], "dead": r[5]} for r in rows}


@dataclass
class PgSampler:
    """CPU seconds of the server processes working for `database` (a thread, every 50 ms)."""

    admin_url: str
    database: str
    exclude: set[int] = field(default_factory=set)
    interval: float = 0.05
    cpu: dict[int, float] = field(default_factory=dict)
    base: dict[int, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _conn: Any = None
    wal_start: int = 0
    # pg_walinspect, read every second (the server recycles WAL segments after checkpoints, so a
    # long run cannot be read back at its end): bytes and full-page images found so far.
    url: str = ""
    _wal_conn: Any = None
    _wal_read_to: int = 0
    _wal_at: float = 0.0
    db_wal: int = 0
    db_fpi: int = 0
    _pattern: str = ""

    def start(self) -> PgSampler:
        self._conn = psycopg.connect(self.admin_url, autocommit=True)
        self.wal_start = self._wal()
        if self.url:
            try:
                self._wal_conn = psycopg.connect(self.url, autocommit=True)
                self._wal_conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
                oid = self._wal_conn.execute(
                    "SELECT oid FROM pg_database WHERE datname = current_database()"
                ).fetchone()[0]
                self._pattern = f"%/{oid}/%"
                self.exclude.add(self._wal_conn.info.backend_pid)
                self._wal_read_to = self.wal_start
            except psycopg.Error:
                self._wal_conn = None
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="pg-sampler", daemon=True)
        self._thread.start()
        return self

    def _wal(self) -> int:
        row = self._conn.execute("SELECT pg_current_wal_flush_lsn() - '0/0'::pg_lsn").fetchone()
        return int(row[0])

    def sample(self) -> float:
        """Take one sample now; CPU seconds these processes spent since start."""
        with self._lock:
            pids = [
                r[0]
                for r in self._conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = %s", [self.database]
                ).fetchall()
            ]
            for pid in pids:
                if pid in self.exclude:
                    continue
                cpu = cpu_seconds(pid)
                if cpu is None:
                    continue
                # a backend already running when sampling started counts from then on
                self.base.setdefault(pid, cpu if self._thread is None else 0.0)
                self.cpu[pid] = cpu
            return sum(self.cpu[p] - self.base.get(p, 0.0) for p in self.cpu)

    def _read_wal(self) -> None:
        """Add up this database's WAL records written since the last read."""
        if self._wal_conn is None:
            return
        end = self._wal()
        try:
            got = self._wal_conn.execute(
                DB_WAL_SQL, {"start": self._wal_read_to, "end": end, "pattern": self._pattern}
            ).fetchone()
        except psycopg.Error:
            self._wal_conn.close()
            self._wal_conn = None  # recycled already: the cluster's delta is what is left
            return
        self.db_wal += int(got[0])
        self.db_fpi += int(got[1])
        self._wal_read_to = end

    def _loop(self) -> None:

        while not self._stop.is_set():
            try:
                self.sample()
                if time.monotonic() - self._wal_at >= 1.0:
                    self._read_wal()
                    self._wal_at = time.monotonic()
            except psycopg.Error:
                return
            self._stop.wait(self.interval)

    def stop(self) -> tuple[float, int]:
        """Stop sampling; (CPU seconds, WAL bytes for the database) since start. The full-page
        images of those bytes go to `last_fpi_bytes`."""
        global last_fpi_bytes, last_wal_source
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        cpu = self.sample()
        self._read_wal()
        wal_end = self._wal()
        self._conn.close()
        if self._wal_conn is not None:
            self._wal_conn.close()
            last_fpi_bytes, last_wal_source = self.db_fpi, "database"
            return cpu, self.db_wal
        last_fpi_bytes, last_wal_source = 0, "cluster"
        return cpu, wal_end - self.wal_start


def backend_cpu(conn: psycopg.Connection[Any]) -> float:
    """CPU seconds of the server process behind `conn` so far."""
    return cpu_seconds(conn.info.backend_pid) or 0.0
