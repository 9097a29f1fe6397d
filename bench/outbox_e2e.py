"""outbox-worker measured end to end, as an operator runs it: rows inserted by SQL, a System
Default Gateway pointing at the sink, `outbox run` as a subprocess, and the table polled
until every row is `sent`. Also latency under a steady offered load, claim timing with many
finished rows, and the RSS of the worker processes."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from bench import pgload
from bench.common import (
    FROM_ADDR,
    GATEWAY_ADDR,
    INSERT_OUTBOX_SQL,
    POLL_SECONDS,
    body,
    insert_params,
    to_addr,
)
from bench.infra import Databases, RssSampler, clean_redis, connect

MiB = 1024 * 1024


ROOT = Path(__file__).resolve().parent.parent
OUTBOX_VENV = Path(__file__).resolve().parent / ".venv-outbox"


@functools.cache
def outbox_command() -> list[str]:
    """`outbox` as users install it, in its own virtualenv (bench/.venv-outbox, made on first
    use and again when pyproject.toml changes): the project without its test tools, one of
    which pulls in rich, which structlog then imports in every process (~40 ms of a start-up);
    its modules compiled to bytecode, as a wheel install has them."""
    digest = hashlib.sha1((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:12]
    stamp = OUTBOX_VENV / f".installed-{digest}"
    python = OUTBOX_VENV / "bin" / "python"
    if not stamp.exists():
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", "--clear", str(OUTBOX_VENV)], check=True, timeout=300)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "-e", str(ROOT)],
            check=True,
            timeout=900,
            capture_output=True,
        )
        stamp.touch()
    subprocess.run(
        [str(python), "-m", "compileall", "-q", str(ROOT / "outbox"), str(ROOT / "worker")],
        check=True,
        timeout=300,
        stdout=subprocess.DEVNULL,
    )
    return [str(OUTBOX_VENV / "bin" / "outbox")]


@dataclass
class Env:
    """Where outbox-worker runs during the benchmark."""

    dbs: Databases
    redis_url: str
    sink_port: int
    workdir: Path
    template: str = ""
    runs: int = 0
    namespaces: list[str] = field(default_factory=list)

    def environ(self, database: str, namespace: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
        env |= {
            "OUTBOX_DATABASE_URL": self.dbs.url(database),
            "OUTBOX_REDIS_URL": self.redis_url,
            "OUTBOX_REDIS_NAMESPACE": namespace,
            "OUTBOX_LOCAL_HOSTNAME": "bench.example",
        }
        return env | (extra or {})

    def namespace(self) -> str:
        ns = f"outbox-bench-{self.dbs.prefix[-8:]}-{len(self.namespaces)}"
        self.namespaces.append(ns)
        return ns

    def cleanup(self) -> None:
        for ns in self.namespaces:
            try:
                clean_redis(self.redis_url, ns)
            except Exception as exc:
                print(f"bench: could not clean Redis namespace {ns}: {exc}", file=sys.stderr)


def _outbox(env: Env, database: str, *args: str) -> None:
    subprocess.run(
        [*outbox_command(), *args],
        env=env.environ(database, "outbox-bench-setup"),
        check=True,
        timeout=60,
        capture_output=True,
    )


def make_template(env: Env) -> str:
    """A database with the schema and the sink as System Default Gateway (as an operator
    would set it up: `outbox db init`, `outbox connector add ... --default-gateway`)."""
    name = env.dbs.create("tpl")
    _outbox(env, name, "db", "init")
    _outbox(
        env,
        name,
        "connector",
        "add",
        "sink",
        "--address",
        GATEWAY_ADDR,
        "--direction",
        "outgoing",
        "--host",
        "127.0.0.1",
        "--port",
        str(env.sink_port),
        "--security",
        "none",
        "--default-gateway",
    )
    env.template = name
    return name


def insert_rows(url: str, n: int, first: int = 1) -> float:
    """Insert rows `first`..; returns the Postgres CPU seconds the INSERT took."""
    with connect(url) as conn:
        before = pgload.backend_cpu(conn)
        conn.execute(INSERT_OUTBOX_SQL, insert_params(first, first + n - 1))
        return pgload.backend_cpu(conn) - before


def _counts(conn: psycopg.Connection[Any], after_id: int = 0) -> tuple[int, int]:
    """Sent and otherwise finished rows among those with an id above `after_id` (the rows a run
    inserted, when the database already held others)."""
    row = conn.execute(
        "SELECT count(*) FILTER (WHERE status = 'sent'),"
        " count(*) FILTER (WHERE status IN ('failed', 'partial', 'held', 'cancelled'))"
        " FROM outbox.message WHERE id > %s",
        [after_id],
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@dataclass
class Throughput:
    n: int
    seconds: float  # process start -> last row sent
    startup: float  # process start -> first row sent
    rss_max: int
    rss_growth: int
    processes_seen: int
    exit_code: int | None
    # Client CPU (the `outbox run` tree, not Postgres/Redis/sink) per message, between 10% of
    # the rows sent and the last: what the workers spend per email.
    cpu_ms_per_msg: float | None = None
    # With pg=True (bench/pgload.py): Postgres CPU (the database's backends) and WAL bytes per
    # message, of the INSERT and of the run (process start -> last row), and the row versions
    # the outbox tables got (pg_stat_user_tables, insert included).
    pg_insert_cpu_ms_per_msg: float | None = None
    pg_cpu_ms_per_msg: float | None = None
    insert_wal_per_msg: float | None = None
    wal_per_msg: float | None = None
    fpi_per_msg: float | None = None  # of wal_per_msg: full-page images
    rows: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.n / self.seconds

    @property
    def steady_rate(self) -> float:
        """Rate once the first row is out (excludes interpreter start and connecting)."""
        return (self.n - 1) / max(1e-9, self.seconds - self.startup)


def throughput(
    env: Env,
    n: int,
    *,
    processes: int | None = None,
    threads: int | None = None,
    extra_env: dict[str, str] | None = None,
    wrapper: Sequence[str] = (),
    label: str = "e2e",
    timeout: float | None = None,
    pre_sql: str | None = None,
    pg: bool = False,
    database: str | None = None,
) -> Throughput:
    """Insert `n` rows, run `outbox run --until-idle`, time from its start until every row is
    `sent` (the last `sent_at`). In a new database from the template, or in `database` (kept;
    its rows from before are left out of the counts and the timing). With `pg`, also what the
    insert and the run cost Postgres."""
    env.runs += 1
    keep = database is not None
    database = database or env.dbs.create(f"{label}{env.runs}", template=env.template)
    url = env.dbs.url(database)
    namespace = env.namespace()
    before = _max_id(url)
    wal0 = pgload.wal_lsn(env.dbs.admin_url) if pg else 0
    insert_cpu = insert_rows(url, n, first=before + 1)
    insert_wal = pgload.database_wal(url, wal0, pgload.wal_lsn(env.dbs.admin_url)) if pg else 0
    if pre_sql:
        with connect(url) as conn:
            conn.execute(pre_sql)  # type: ignore[arg-type]
    args = [*wrapper, *outbox_command(), "run", "--until-idle"]
    if processes is not None:
        args += ["--processes", str(processes)]
    if threads is not None:
        args += ["--threads", str(threads)]
    log_path = env.workdir / f"{label}{env.runs}.log"
    deadline_s = timeout if timeout is not None else max(60.0, n / 20)
    pg_sampler: pgload.PgSampler | None = None
    try:
        with open(log_path, "wb") as log, connect(url) as conn:
            if pg:
                pg_sampler = pgload.PgSampler(
                    env.dbs.admin_url, database, exclude={conn.info.backend_pid}, url=url
                ).start()
            t0_wall = time.time()
            t0 = time.monotonic()
            proc = subprocess.Popen(
                args, env=env.environ(database, namespace, extra_env), stdout=log, stderr=log
            )
            sampler = RssSampler(proc.pid, max_seconds=deadline_s + 30).start()
            warm_at: float | None = None
            warm_cpu, warm_sent, done_cpu = 0.0, 0, 0.0
            try:
                for _ in range(int(deadline_s / POLL_SECONDS) + 1):  # bounded by count and time
                    sent, bad = _counts(conn, before)
                    if warm_at is None and sent >= max(1, n // 10):
                        warm_at, warm_cpu, warm_sent = time.monotonic(), sampler.sample(), sent
                    if sent + bad >= n:
                        done_cpu = sampler.sample()
                        break
                    if proc.poll() is not None and proc.returncode != 0:
                        raise RuntimeError(f"outbox run exited {proc.returncode}; see {log_path}")
                    if time.monotonic() - t0 > deadline_s:
                        raise RuntimeError(f"timed out after {deadline_s:.0f}s with {sent}/{n} sent")
                    time.sleep(POLL_SECONDS)
                done_at = time.monotonic()
                if bad:
                    raise RuntimeError(f"{bad} of {n} rows did not end `sent`; see {log_path}")
                first, last = conn.execute(
                    "SELECT extract(epoch FROM min(sent_at)), extract(epoch FROM max(sent_at))"
                    " FROM outbox.message WHERE id > %s",
                    [before],
                ).fetchone()  # type: ignore[misc]
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=30)  # --until-idle exits by itself once idle
            finally:
                _stop(proc)
                sampler.stop()
                pg_cost = pg_sampler.stop() if pg_sampler is not None else None
                fpi = pgload.last_fpi_bytes
        rows = pgload.row_stats(url) if pg else {}
        return Throughput(
            n=n,
            seconds=float(last) - t0_wall,
            startup=float(first) - t0_wall,
            rss_max=sampler.max_per_process(),
            rss_growth=sampler.growth(warm_at or t0, done_at),
            processes_seen=sampler.process_count(),
            exit_code=proc.returncode,
            cpu_ms_per_msg=(done_cpu - warm_cpu) * 1000 / (n - warm_sent) if n > warm_sent else None,
            pg_insert_cpu_ms_per_msg=insert_cpu * 1000 / n if pg else None,
            pg_cpu_ms_per_msg=pg_cost[0] * 1000 / n if pg_cost else None,
            insert_wal_per_msg=insert_wal / n if pg else None,
            wal_per_msg=pg_cost[1] / n if pg_cost else None,
            fpi_per_msg=fpi / n if pg_cost else None,
            rows=rows,
        )
    finally:
        if not keep:
            env.dbs.drop(database)
        clean_redis(env.redis_url, namespace)


def _max_id(url: str) -> int:
    with connect(url) as conn:
        return int(conn.execute("SELECT coalesce(max(id), 0) FROM outbox.message").fetchone()[0])  # type: ignore[index]


# -- latency at a steady offered load ---------------------------------------------------------

INSERT_ONE_SQL = (
    "INSERT INTO outbox.message (from_addr, to_addrs, subject, text_body) VALUES (%s, ARRAY[%s], %s, %s)"
)


@dataclass
class Latency:
    offered_rate: float
    count: int
    achieved_rate: float
    p50: float
    p90: float
    p99: float
    max: float
    # insert -> a worker claims the row (poller wake-up, claim, Redis, Dramatiq pick-up) and
    # worker claim -> sent (build, SMTP, outcome written): p50 and p99 of each.
    to_claim_p50: float = float("nan")
    to_claim_p99: float = float("nan")
    claim_to_sent_p50: float = float("nan")
    claim_to_sent_p99: float = float("nan")
    warm: Throughput | None = None


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


def _wait_all_sent(conn: psycopg.Connection[Any], expected: int, timeout: float, after_id: int = 0) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):
        sent, bad = _counts(conn, after_id)
        if bad:
            raise RuntimeError(f"{bad} rows did not end `sent`")
        if sent >= expected:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {expected} rows to be sent")


def latency(
    env: Env,
    *,
    rate: float,
    seconds: float,
    warm_n: int = 0,
    extra_env: dict[str, str] | None = None,
    database: str | None = None,
) -> Latency:
    """Start the default `outbox run`, warm it up, then insert one row every 1/rate seconds
    for `seconds` and read insert->sent as `sent_at - created_at`. With `warm_n`, then also
    time `warm_n` rows inserted at once into the already running pipeline. In a new database
    from the template, or in `database` (kept; its rows from before are left out)."""
    env.runs += 1
    keep = database is not None
    database = database or env.dbs.create(f"lat{env.runs}", template=env.template)
    url = env.dbs.url(database)
    namespace = env.namespace()
    base = _max_id(url)
    log_path = env.workdir / f"lat{env.runs}.log"
    try:
        with open(log_path, "wb") as log, connect(url) as conn:
            proc = subprocess.Popen(
                [*outbox_command(), "run"],
                env=env.environ(database, namespace, extra_env),
                stdout=log,
                stderr=log,
            )
            try:
                warmup = 20
                insert_rows(url, warmup, first=base + 1)
                _wait_all_sent(conn, warmup, timeout=60, after_id=base)
                first_id = int(conn.execute("SELECT max(id) FROM outbox.message").fetchone()[0])  # type: ignore[index]
                count = max(1, int(rate * seconds))
                t0 = time.monotonic()
                for i in range(count):  # bounded: `count` inserts, paced by the clock
                    delay = t0 + i / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    conn.execute(INSERT_ONE_SQL, (FROM_ADDR, to_addr(i), f"latency {i}", body(i)))
                offered_for = time.monotonic() - t0
                _wait_all_sent(conn, warmup + count, timeout=60, after_id=base)
                rows = conn.execute(
                    "SELECT extract(epoch FROM sent_at - created_at),"
                    " extract(epoch FROM last_attempt_at - created_at),"
                    " extract(epoch FROM sent_at - last_attempt_at)"
                    " FROM outbox.message WHERE id > %s",
                    [first_id],
                ).fetchall()
                values = [float(r[0]) for r in rows]
                to_claim = [float(r[1]) for r in rows if r[1] is not None]
                claim_to_sent = [float(r[2]) for r in rows if r[2] is not None]
                result = Latency(
                    offered_rate=rate,
                    count=len(values),
                    achieved_rate=count / offered_for,
                    p50=_percentile(values, 0.50),
                    p90=_percentile(values, 0.90),
                    p99=_percentile(values, 0.99),
                    max=max(values),
                    to_claim_p50=_percentile(to_claim, 0.50),
                    to_claim_p99=_percentile(to_claim, 0.99),
                    claim_to_sent_p50=_percentile(claim_to_sent, 0.50),
                    claim_to_sent_p99=_percentile(claim_to_sent, 0.99),
                )
                if warm_n:
                    result.warm = _warm_burst(conn, url, warm_n, proc.pid, already=warmup + count, base=base)
                return result
            finally:
                _stop(proc)
    finally:
        if not keep:
            env.dbs.drop(database)
        clean_redis(env.redis_url, namespace)


def _warm_burst(
    conn: psycopg.Connection[Any], url: str, n: int, pid: int, already: int, base: int = 0
) -> Throughput:
    """`n` rows in one INSERT into a pipeline that is already running: commit -> last sent."""
    sampler = RssSampler(pid).start()
    try:
        cpu0 = sampler.sample()
        t0 = time.monotonic()
        first_id = int(conn.execute("SELECT coalesce(max(id), 0) FROM outbox.message").fetchone()[0])  # type: ignore[index]
        insert_rows(url, n, first=first_id + 1)
        _wait_all_sent(conn, already + n, timeout=max(60.0, n / 20), after_id=base)
        cpu1 = sampler.sample()
        done = time.monotonic()
        created, first, last = conn.execute(
            "SELECT extract(epoch FROM min(created_at)), extract(epoch FROM min(sent_at)),"
            " extract(epoch FROM max(sent_at)) FROM outbox.message WHERE id > %s",
            [first_id],
        ).fetchone()  # type: ignore[misc]
    finally:
        sampler.stop()
    return Throughput(
        n=n,
        seconds=float(last) - float(created),
        startup=float(first) - float(created),
        rss_max=sampler.max_per_process(),
        rss_growth=sampler.growth(t0, done),
        processes_seen=sampler.process_count(),
        exit_code=None,
        cpu_ms_per_msg=(cpu1 - cpu0) * 1000 / n,
    )


# -- claim timing -----------------------------------------------------------------------------

INSERT_SENT_SQL = """
INSERT INTO outbox.message (from_addr, to_addrs, subject, text_body, status, attempts, message_id,
                            next_attempt_at, sent_at, created_at, updated_at)
SELECT %(from_addr)s, ARRAY['user' || i || '@bench.example'], 'sent ' || i, 'body ' || i, 'sent', 1,
       '<sent' || i || '@bench.example>', ts, ts, ts, ts
  FROM generate_series(1, %(n)s::int) AS i,
       LATERAL (SELECT now() - make_interval(secs => %(n)s::int - i)) AS t(ts)
"""


@dataclass
class ClaimTiming:
    sent_rows: int
    due_rows: int
    batch: int
    empty_ms: float  # median, table with only the due rows
    full_ms: float  # median, the same due rows plus `sent_rows` finished rows
    empty_idle_ms: float  # nothing due at all, empty table
    full_idle_ms: float  # nothing due, `sent_rows` finished rows
    load_seconds: float
    plan: str
    uses_partial_index: bool

    @property
    def ratio(self) -> float:
        return self.full_ms / self.empty_ms


def _claim_ms(conn: psycopg.Connection[Any], sql: str, params: dict[str, Any]) -> float:
    """Wall time of one claim statement, rolled back so every repetition starts equal."""
    with conn.transaction() as tx:
        started = time.perf_counter()
        conn.execute(sql, params).fetchall()
        elapsed = (time.perf_counter() - started) * 1000
        raise psycopg.Rollback(tx)
    return elapsed


def _interleaved(
    a: psycopg.Connection[Any], b: psycopg.Connection[Any], sql: str, params: dict[str, Any], reps: int
) -> tuple[float, float]:
    """Medians of `reps` claims on two databases, alternating, so load drift hits both alike."""
    ta, tb = [], []
    for _ in range(reps):
        ta.append(_claim_ms(a, sql, params))
        tb.append(_claim_ms(b, sql, params))
    return statistics.median(ta), statistics.median(tb)


def claim_timing(
    env: Env, *, sent_rows: int, due_rows: int = 500, batch: int = 500, reps: int = 30
) -> ClaimTiming:
    """`claim_due` on two databases from the same template: one with no finished rows, one
    with `sent_rows` finished (`sent`) rows; first with nothing due, then with `due_rows` due."""
    from outbox.store.sql import queries

    sql = queries("worker")["claim_due"]
    params = {"limit": batch, "max_in_flight": 5000, "lease_seconds": 300.0}
    env.runs += 1
    empty_db = env.dbs.create(f"claimempty{env.runs}", template=env.template)
    full_db = env.dbs.create(f"claimfull{env.runs}", template=env.template)
    try:
        with connect(env.dbs.url(empty_db)) as empty, connect(env.dbs.url(full_db)) as full:
            started = time.perf_counter()
            full.execute(INSERT_SENT_SQL, {"from_addr": FROM_ADDR, "n": sent_rows})
            full.execute("VACUUM ANALYZE outbox.message")  # what autovacuum does after a bulk load
            load_seconds = time.perf_counter() - started
            empty.execute("VACUUM ANALYZE outbox.message")
            empty_idle, full_idle = _interleaved(empty, full, sql, params, reps)
            for conn, url in ((empty, env.dbs.url(empty_db)), (full, env.dbs.url(full_db))):
                insert_rows(url, due_rows)
                conn.execute("ANALYZE outbox.message")
            empty_ms, full_ms = _interleaved(empty, full, sql, params, reps)
            with full.transaction() as tx:
                plan_rows = full.execute("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + sql, params).fetchall()
                raise psycopg.Rollback(tx)
            plan = "\n".join(str(r[0]) for r in plan_rows)
        return ClaimTiming(
            sent_rows=sent_rows,
            due_rows=due_rows,
            batch=batch,
            empty_ms=empty_ms,
            full_ms=full_ms,
            empty_idle_ms=empty_idle,
            full_idle_ms=full_idle,
            load_seconds=load_seconds,
            plan=plan,
            uses_partial_index="message_due_idx" in plan,
        )
    finally:
        env.dbs.drop(empty_db)
        env.dbs.drop(full_db)


def mib(n: int) -> float:
    return n / MiB


def new_run_id() -> str:
    return uuid.uuid4().hex[:8]
