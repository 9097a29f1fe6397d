"""Automatic retention: the poller deletes finished messages older than `retention-days` (with
their attempts, recipient results and attachments) and connector activity and operator audit
older than `audit-retention-days`, a batch at a time, while fresh mail goes out."""

from __future__ import annotations

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
    from worker import poller as poller_module

    monkeypatch.setattr(poller_module, "RETENTION_BATCH", 50)
    monkeypatch.setattr(poller_module, "RETENTION_BUDGET_SECONDS", 0.0)  # one batch per pass
    db.execute(
        "INSERT INTO outbox.message (from_addr, to_addrs, text_body, status, updated_at)"
        " SELECT 'a@example.com', '{b@example.org}', 't', 'sent', now() - interval '9 days'"
        "   FROM generate_series(1, 120)"
    )
    db.execute("UPDATE outbox.settings SET retention_days = 7")

    class Idle:
        def send(self, chunk: list[Any]) -> None:
            raise AssertionError("nothing is due")

    poller = poller_module.Poller(config, Idle())  # type: ignore[arg-type]
    seen: list[int] = []

    def one_pass() -> None:
        poller._maintained_at = -1.0  # maintain on every call, as once a second
        poller.run_once()
        left = db.execute("SELECT count(*) FROM outbox.message").fetchone()[0]
        if not seen or seen[-1] != left:
            seen.append(left)

    try:
        wait_until(lambda: seen and seen[-1] == 0, timeout=30, step=one_pass, what="backlog deleted")
    finally:
        poller.close()
    assert seen == [70, 20, 0]  # one batch of 50 per pass, the next pass a second later


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
