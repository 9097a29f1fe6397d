"""What the metrics gauges and the `connector_health` view cost on a 10,000,000-row outbox.

Builds `outbox_bench_lifecycle` (dropped first) at schema version 4, fills it with generated
rows (triggers off while loading), then times the queries the poller and the console run,
before and after migration 0005 (its indexes) and with the old and new gauge statements:

    .venv/bin/python -m bench.lifecycle [--messages 10000000]

Prints EXPLAIN (ANALYZE, BUFFERS) summaries; the figures are in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import psycopg

from outbox.store import migrate as migrations
from outbox.store.sql import queries

ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
NAME = "outbox_bench_lifecycle"

# The gauge statement before issue 16 (a full GROUP BY over outbox.message).
OLD_STATUS_GAUGES = """
SELECT status, count(*) AS n,
       extract(epoch FROM now() - min(next_attempt_at)
               FILTER (WHERE status IN ('queued', 'retry') AND next_attempt_at <= now())) AS lag_seconds
  FROM outbox.message GROUP BY status"""

# status, share of the messages
MIX = [
    ("sent", 0.9700),
    ("failed", 0.0100),
    ("partial", 0.0050),
    ("cancelled", 0.0020),
    ("queued", 0.0050),
    ("retry", 0.0030),
    ("held", 0.0010),
    ("dispatched", 0.0020),
    ("sending", 0.0020),
]


def fill(
    url: str,
    messages: int,
    *,
    mix: list[tuple[str, float]] = MIX,
    age_days: int = 0,
    recipients: bool = False,
) -> None:
    """`messages` generated rows in `mix`, last changed over the 30 days before `age_days` ago,
    with one attempt each (and with `recipients`, one recipient result per attempted one)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")  # no triggers while loading
        for i in range(5):
            conn.execute(
                "INSERT INTO outbox.connector (name, direction, address, host, port, security)"
                " VALUES (%s, 'outgoing', %s, '127.0.0.1', 25, 'none')",
                [f"c{i}", f"c{i}@example.com"],
            )
        start = 0
        for status, share in mix:
            n = int(messages * share)
            t = time.monotonic()
            conn.execute(
                """
                INSERT INTO outbox.message (id, status, from_addr, to_addrs, subject, text_body,
                    message_id, next_attempt_at, attempts, connector_id, lease_token,
                    lease_expires_at, created_at, updated_at, sent_at)
                SELECT g, %(status)s, 'a@example.com', '{b@example.org}', 'bench', 'body',
                       '<' || g || '@bench>', t0 - (g %% 1000) * interval '1 second', 1,
                       1 + g %% 5,
                       CASE WHEN %(status)s IN ('dispatched', 'sending') THEN gen_random_uuid() END,
                       CASE WHEN %(status)s IN ('dispatched', 'sending') THEN now() + interval '5 min' END,
                       t0 - (g %% 2592000) * interval '1 second',
                       t0 - (g %% 2592000) * interval '1 second',
                       CASE WHEN %(status)s = 'sent' THEN t0 - (g %% 2592000) * interval '1 second' END
                  FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) g,
                       LATERAL (SELECT now() - make_interval(days => %(age)s::int)) AS t(t0)""",
                {"status": status, "lo": start + 1, "hi": start + n, "age": age_days},
            )
            start += n
            print(f"  {n:>9} {status} in {time.monotonic() - t:.1f} s", flush=True)
        t = time.monotonic()
        # one attempt per message; failures are 2% of attempts, spread over 30 days
        conn.execute(
            """
            INSERT INTO outbox.attempt (message_id, attempt, connector_id, connector_name, started_at,
                finished_at, phase, outcome, smtp_code, smtp_reply, error)
            SELECT m.id, 1, m.connector_id, 'c' || (m.connector_id - 1), m.updated_at, m.updated_at,
                   'dot', CASE WHEN m.id % 50 = 0 THEN 'retry' ELSE 'sent' END,
                   CASE WHEN m.id % 50 = 0 THEN 451 ELSE 250 END, 'ok', NULL
              FROM outbox.message m""",
        )
        conn.execute(
            "SELECT setval(pg_get_serial_sequence('outbox.message', 'id'),"
            " (SELECT max(id) FROM outbox.message))"
        )
        print(f"  attempts in {time.monotonic() - t:.1f} s", flush=True)
        if recipients:
            t = time.monotonic()
            conn.execute(
                """
                INSERT INTO outbox.recipient (message_id, addr, status, smtp_code, smtp_reply, updated_at)
                SELECT m.id, m.to_addrs[1], CASE WHEN m.status = 'failed' THEN 'failed' ELSE 'sent' END,
                       CASE WHEN m.status = 'failed' THEN 550 ELSE 250 END, 'ok', m.updated_at
                  FROM outbox.message m WHERE m.status IN ('sent', 'partial', 'failed')""",
            )
            print(f"  recipients in {time.monotonic() - t:.1f} s", flush=True)
        t = time.monotonic()
        conn.execute("VACUUM ANALYZE outbox.message")
        conn.execute("VACUUM ANALYZE outbox.attempt")
        if recipients:
            conn.execute("VACUUM ANALYZE outbox.recipient")
        print(f"  vacuum analyze in {time.monotonic() - t:.1f} s", flush=True)


def explain(conn: psycopg.Connection[Any], label: str, sql: str, runs: int = 3) -> float:
    """Best of `runs` (warm cache) execution time in ms, with the plan's top line and buffers."""
    best, plan = float("inf"), []
    for _ in range(runs):
        rows = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}").fetchone()[0][0]  # type: ignore[index]
        if rows["Execution Time"] < best:
            best, plan = rows["Execution Time"], rows["Plan"]
    hits = plan.get("Shared Hit Blocks", 0) + plan.get("Shared Read Blocks", 0)
    print(f"{label:<48} {best:>10.1f} ms   {hits:>9} buffers   top: {plan['Node Type']}", flush=True)
    return best


def measure(url: str, title: str, gauges: dict[str, str]) -> None:
    print(f"-- {title}")
    with psycopg.connect(url, autocommit=True) as conn:
        for label, sql in gauges.items():
            explain(conn, label, sql)
        explain(conn, "connector_health (whole view, 5 connectors)", "SELECT * FROM outbox.connector_health")
        explain(
            conn,
            "connector_health last error only",
            "SELECT connector, last_error_at, last_error FROM outbox.connector_health",
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=10_000_000)
    args = parser.parse_args()
    with psycopg.connect(ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{NAME}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{NAME}"')
    url = psycopg.conninfo.make_conninfo(ADMIN, dbname=NAME)
    shipped = migrations.migrations()
    before = [m for m in shipped if m.version <= 4]
    migrations.migrations = lambda: tuple(before)  # type: ignore[assignment]
    with psycopg.connect(url, autocommit=True) as conn:
        migrations.migrate(conn)
    print(f"filling {args.messages} messages")
    fill(url, args.messages)
    new_gauges = queries("outbox.store")["status_gauges"]
    measure(url, "schema version 4", {"gauges: old GROUP BY": OLD_STATUS_GAUGES})
    migrations.migrations = lambda: shipped  # type: ignore[assignment]
    t = time.monotonic()
    with psycopg.connect(url, autocommit=True) as conn:
        print(migrations.migrate(conn).summary(), f"({time.monotonic() - t:.1f} s)")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ANALYZE outbox.message")
        conn.execute("ANALYZE outbox.attempt")
    measure(
        url,
        f"schema version {shipped[-1].version}",
        {"gauges: old GROUP BY": OLD_STATUS_GAUGES, "gauges: new (indexes + estimate)": new_gauges},
    )


if __name__ == "__main__":
    main()
