"""Automatic retention: the poller deletes finished messages older than `retention-days` (with
their attempts, recipient results and attachments) and connector activity and operator audit
older than `audit-retention-days`, a batch at a time, while fresh mail goes out."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

import psycopg

import outbox
from tests.conftest import wait_until
from tests.helpers import add_gateway
from tests.helpers import outbox_cli as outbox_cmd

FINISHED = ("sent", "partial", "failed", "cancelled")


def old_message(db: psycopg.Connection[Any], status: str, days: float, **extra: Any) -> int:
    """A message in `status`, last changed `days` ago, with an attempt, a recipient result and an
    attachment."""
    msg_id = outbox.enqueue(
        db,
        from_addr="a@example.com",
        to=["old@example.org"],
        subject=f"{status} {days}d",
        text="t",
        attachments=[outbox.Attachment("a.txt", b"hi", "text/plain")],
    )
    db.execute(
        "INSERT INTO outbox.attempt (message_id, attempt, started_at, outcome)"
        " VALUES (%s, 1, now(), 'failed')",
        [msg_id],
    )
    db.execute(
        "INSERT INTO outbox.recipient (message_id, addr, status) VALUES (%s, 'old@example.org', 'failed')",
        [msg_id],
    )
    db.execute(
        "UPDATE outbox.message SET status = %s, next_attempt_at = coalesce(%s, now()),"
        " updated_at = now() - make_interval(days => %s) WHERE id = %s",
        [status, extra.get("next_attempt_at"), days, msg_id],
    )
    return msg_id


def history_of(db: psycopg.Connection[Any], ids: list[int]) -> dict[str, int]:
    counts = {}
    for table, column in (("message", "id"), ("attempt", "message_id"), ("recipient", "message_id")):
        query = f"SELECT count(*) FROM outbox.{table} WHERE {column} = ANY(%s)"
        counts[table] = db.execute(query, [ids]).fetchone()[0]
    query = "SELECT count(*) FROM outbox.attachment WHERE message_id = ANY(%s)"
    counts["attachment"] = db.execute(query, [ids]).fetchone()[0]
    return counts


def test_retention_deletes_exactly_the_old_finished_rows_while_fresh_mail_goes_out(cli_env, db, smtp):
    add_gateway(db, smtp)
    doomed = [old_message(db, status, 10) for status in FINISHED]
    kept = [old_message(db, status, 6) for status in FINISHED]  # younger than retention-days
    later = datetime(2999, 1, 1, tzinfo=UTC)  # unfinished, however old: never deleted
    kept += [old_message(db, status, 30, next_attempt_at=later) for status in ("queued", "retry")]
    old, recent = "now() - interval '40 days'", "now() - interval '20 days'"
    for at in (old, recent):
        db.execute(
            "INSERT INTO outbox.connector_event (connector_name, action, actor, at)"
            f" VALUES ('gw', 'x', 'ops', {at})"
        )
        db.execute(
            f"INSERT INTO outbox.operator_audit (action, actor, count, at) VALUES ('replay', 'ops', 0, {at})"
        )
    events_before = db.execute("SELECT count(*) FROM outbox.connector_event").fetchone()[0]
    outbox_cmd(cli_env, "settings", "set", "retention-days", "7")
    outbox_cmd(cli_env, "settings", "set", "audit-retention-days", "30")
    fresh = [
        outbox.enqueue(
            db, from_addr="a@example.com", to=[f"n{i}@example.org"], subject=f"fresh {i}", text="t"
        )
        for i in range(3)
    ]

    ran = outbox_cmd(cli_env, "run", "--until-idle", "--threads", "2")

    assert sorted(r.message["Subject"] for r in smtp.recorder.wait_for(3)) == [
        "fresh 0",
        "fresh 1",
        "fresh 2",
    ]
    assert (
        db.execute(
            "SELECT count(*) FROM outbox.message WHERE id = ANY(%s) AND status = 'sent'", [fresh]
        ).fetchone()[0]
        == 3
    )
    assert history_of(db, doomed) == {"message": 0, "attempt": 0, "recipient": 0, "attachment": 0}
    assert history_of(db, kept) == {"message": 6, "attempt": 6, "recipient": 6, "attachment": 6}
    assert db.execute("SELECT count(*) FROM outbox.connector_event").fetchone()[0] == events_before - 1
    assert db.execute("SELECT count(*) FROM outbox.operator_audit").fetchone()[0] == 1
    assert "retention" in ran.stderr


def test_retention_works_a_backlog_off_in_batches(db, config, monkeypatch):
    from worker import retention as retention_module

    monkeypatch.setattr(retention_module, "RETENTION_BATCH", 50)
    db.execute(
        "INSERT INTO outbox.message (from_addr, to_addrs, text_body, status, updated_at)"
        " SELECT 'a@example.com', '{b@example.org}', 't', 'sent', now() - interval '9 days'"
        "   FROM generate_series(1, 120)"
    )
    db.execute("UPDATE outbox.settings SET retention_days = 7")
    retention = retention_module.Retention(config.database_url)
    left, more = [], []
    with psycopg.connect(config.database_url, autocommit=True) as conn:
        while not left or left[-1]:
            more.append(retention.batch(conn))
            left.append(db.execute("SELECT count(*) FROM outbox.message").fetchone()[0])
    assert left == [70, 20, 0]  # one batch of 50 at a time
    assert more == [True, True, False]  # a full batch says more is waiting


def test_retention_runs_beside_dispatch_and_stops_with_the_poller(db, config):
    """The poller's thread dispatches while retention works on its own connection: a batch in
    progress (held here by a lock) delays no dispatch."""
    from worker.poller import Poller

    db.execute(
        "INSERT INTO outbox.message (from_addr, to_addrs, text_body, status, updated_at)"
        " SELECT 'a@example.com', '{b@example.org}', 't', 'sent', now() - interval '9 days'"
        "   FROM generate_series(1, 10)"
    )
    db.execute("UPDATE outbox.settings SET retention_days = 7")
    sent: list[list[Any]] = []

    class Recording:
        def send(self, chunk: list[Any]) -> None:
            sent.append(chunk)

    with psycopg.connect(config.database_url) as blocker:
        # retention's DELETE of outbox.message waits for this lock; dispatch must not
        blocker.execute("LOCK TABLE outbox.attachment IN EXCLUSIVE MODE")
        stop = threading.Event()
        poller = Poller(config, Recording())  # type: ignore[arg-type]
        thread = threading.Thread(target=poller.run, args=(stop,))
        thread.start()
        try:
            wait_until(
                lambda: db.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock' AND query LIKE '%delete_finished%'"
                ).fetchone()[0],
                what="retention to wait on the lock",
            )
            fresh = db.execute(
                "INSERT INTO outbox.message (from_addr, to_addrs, text_body) "
                "VALUES ('a@example.com', '{b@example.org}', 't') RETURNING id"
            ).fetchone()[0]
            wait_until(lambda: any(fresh == row[0] for chunk in sent for row in chunk), what="dispatch")
        finally:
            blocker.rollback()
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    assert db.execute("SELECT count(*) FROM outbox.message WHERE status = 'sent'").fetchone()[0] == 0


def test_retention_is_off_by_default(db, config):
    from worker.poller import Poller

    db.execute(
        "INSERT INTO outbox.message (from_addr, to_addrs, text_body, status, updated_at)"
        " VALUES ('a@example.com', '{b@example.org}', 't', 'sent', now() - interval '9999 days')"
    )

    class Idle:
        def send(self, chunk: list[Any]) -> None:
            raise AssertionError("nothing is due")

    poller = Poller(config, Idle())  # type: ignore[arg-type]
    try:
        poller.run_once()
    finally:
        poller.close()
    assert db.execute("SELECT count(*) FROM outbox.message").fetchone()[0] == 1
