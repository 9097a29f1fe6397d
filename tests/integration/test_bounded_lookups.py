"""The metrics gauges and the connector_health view read through indexes, never a whole table
(figures on 10,000,000 rows: bench/lifecycle.py, bench/RESULTS.md)."""

from __future__ import annotations

import json

from outbox.core.statuses import STATUSES
from outbox.store.sql import queries


def _fill(db) -> None:
    db.execute(
        "INSERT INTO outbox.connector (name, direction, address, host, port, security)"
        " VALUES ('gw', 'outgoing', 'gw@example.com', '127.0.0.1', 25, 'none')"
    )
    for i, status in enumerate(STATUSES):
        db.execute(
            "INSERT INTO outbox.message (from_addr, to_addrs, text_body, status, connector_id, lease_token,"
            " lease_expires_at) SELECT 'a@example.com', '{b@example.org}', 't', %s, 1, gen_random_uuid(),"
            " now() FROM generate_series(1, %s)",
            [status, i + 1],
        )
    db.execute(
        "INSERT INTO outbox.attempt (message_id, attempt, connector_id, started_at, outcome, error)"
        " SELECT id, 1, 1, now(), CASE WHEN id % 3 = 0 THEN 'retry' ELSE 'sent' END, 'e' || id"
        "   FROM outbox.message"
    )


def _plan(db, sql: str) -> str:
    with db.transaction():
        db.execute("SET LOCAL enable_seqscan = off")  # an index must be able to serve each part
        rows = db.execute(f"EXPLAIN (FORMAT JSON) {sql}").fetchone()[0]
    return json.dumps(rows)


def test_gauges_count_exactly_on_a_small_table_through_indexes(db):
    _fill(db)
    gauges = {s: n for s, n, _ in db.execute(queries("outbox.store")["status_gauges"]).fetchall()}
    exact = dict(db.execute("SELECT status, count(*) FROM outbox.message GROUP BY status").fetchall())
    assert gauges == exact == {s: i + 1 for i, s in enumerate(STATUSES)}
    plan = json.loads(_plan(db, queries("outbox.store")["status_gauges"].replace("< 100000", "< 0")))[0][
        "Plan"
    ]
    assert "message" not in _scanned(plan, "Seq Scan"), plan


def test_connector_health_finds_the_last_error_through_an_index(db):
    _fill(db)
    [(last_error,)] = db.execute("SELECT last_error FROM outbox.connector_health").fetchall()
    assert last_error is not None
    plan = json.loads(_plan(db, "SELECT * FROM outbox.connector_health"))[0]["Plan"]
    assert "attempt" in _scanned(plan, "Index Scan") | _scanned(plan, "Index Only Scan")
    assert not _scanned(plan, "Seq Scan") & {"attempt", "message"}, plan


def _scanned(node: dict, kind: str) -> set[str]:
    """The relations the plan reads with `kind` anywhere in its tree."""
    found = {node["Relation Name"]} if node.get("Node Type") == kind and "Relation Name" in node else set()
    for child in node.get("Plans", []):
        found |= _scanned(child, kind)
    return found
