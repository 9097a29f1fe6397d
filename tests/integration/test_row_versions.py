"""What a successful single-recipient delivery writes to Postgres (issue 17; docs/design.md,
"Row versions per email"): the message row inserted and updated three times (dispatched,
sending, sent) and nothing else, while `outbox show` still tells its whole story. Counted from
pg_stat_user_tables in the test's own database."""

from __future__ import annotations

import json
import subprocess
import sys

import psycopg

import outbox
from tests.conftest import wait_until
from tests.helpers import add_gateway

# The design's budget per successful single-recipient delivery: table -> (inserted, updated).
DESIGN = {"message": (1, 3), "attempt": (0, 0), "recipient": (0, 0)}


def _stats(db) -> dict[str, tuple[int, int]]:
    db.execute("SELECT pg_stat_clear_snapshot()")
    rows = db.execute(
        "SELECT relname, n_tup_ins, n_tup_upd + n_tup_del FROM pg_stat_user_tables"
        " WHERE schemaname = 'outbox' AND relname = ANY(%s)",
        [list(DESIGN)],
    ).fetchall()
    return {name: (ins, upd) for name, ins, upd in rows}


def _others(db) -> int:
    """Server processes still working for this database, besides this connection (each flushes
    its table statistics when it exits)."""
    return db.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    ).fetchone()[0]


def test_a_successful_delivery_writes_only_the_message_row(db, database_url, smtp, pipeline, cli_env):
    add_gateway(db, smtp, "gw")
    before = _stats(db)
    # written on a connection of its own, which reports its statistics when it closes
    with psycopg.connect(database_url) as app, app.transaction():
        msg_id = outbox.enqueue(
            app, from_addr="sales@example.com", to=["ann@example.org"], subject="Hello", text="Hi"
        )
    pipeline.until_status(msg_id, "sent")
    smtp.recorder.wait_for(1)
    pipeline.stop()
    wait_until(lambda: _others(db) == 0, timeout=30, what="the pipeline's connections to close")
    after = wait_until(
        lambda: (s := _stats(db))["message"][1] - before["message"][1] >= 3 and s,
        timeout=30,
        what="the updates' statistics",
    )
    written = {t: (after[t][0] - before[t][0], after[t][1] - before[t][1]) for t in DESIGN}
    assert written == DESIGN, f"row versions written by one delivery: {written}"

    # ... and `outbox show` still has the attempt and the recipient's result.
    shown = json.loads(
        subprocess.run(
            [sys.executable, "-m", "outbox.cli", "show", str(msg_id), "--json"],
            env=cli_env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    )
    [attempt] = shown["attempts_history"]
    assert (attempt["attempt"], attempt["outcome"], attempt["smtp_code"]) == (1, "sent", 250)
    assert attempt["connector_name"] == "gw" and attempt["started_at"] and attempt["finished_at"]
    [recipient] = shown["recipients"]
    assert (recipient["addr"], recipient["status"], recipient["smtp_code"]) == (
        "ann@example.org",
        "sent",
        250,
    )
