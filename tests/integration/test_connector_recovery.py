"""Connector recovery: fixing a connector (`connector update`, `enable`, a passing `connector
test`, `connector reset`) ends its backoff at once, and the mail waiting for it goes out
within seconds instead of waiting for the backoff timer.

Each test breaks a connector for real (a port where nothing listens, sent to by the real
pipeline) with a backoff of an hour, so a message delivered within the test's 15 seconds was
released by the fix, not by the timer."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import psycopg
import pytest

import outbox
from outbox.admin import connectors
from outbox.admin.connectors import NewConnector
from tests.helpers import one_line_error, outbox_cli
from tests.smtp import free_port

FIXED_WITHIN = 15.0  # seconds; the backoff is an hour


@pytest.fixture
def slow_backoff(db):
    """Waiting for the timer would take an hour."""
    db.execute("UPDATE outbox.settings SET retry_base_seconds = 3600, retry_max_seconds = 7200")


def broken_connector(db, port):
    """Connector `sales` (sales@example.com) pointing at `port`."""
    connectors.add(
        db,
        NewConnector(
            name="sales", direction="outgoing", address="sales@example.com", host="localhost", port=port
        ),
    )


def enqueue(db, to="rcpt@example.org"):
    with db.transaction():
        return outbox.enqueue(db, from_addr="sales@example.com", to=[to], subject="waiting", text="hello")


def connector_row(db):
    return db.execute(
        "SELECT failures, backoff_until, last_error, last_error_at, updated_at FROM outbox.connector "
        "WHERE name = 'sales'"
    ).fetchone()


def message_row(db, msg_id):
    return db.execute(
        "SELECT status, attempts, next_attempt_at, next_attempt_at > now() + interval '50 minutes' "
        "FROM outbox.message WHERE id = %s",
        [msg_id],
    ).fetchone()


def into_backoff(db, pipeline):
    """A message sent to the broken connector: the connector backs off for an hour and the
    message waits for it without spending its attempt."""
    msg_id = enqueue(db)
    pipeline.until_status(msg_id, "retry")
    failures, backoff_until, last_error, _, _ = connector_row(db)
    assert failures == 1 and backoff_until is not None and last_error
    status, attempts, _, waits_long = message_row(db, msg_id)
    assert (status, attempts, waits_long) == ("retry", 0, True)
    return msg_id


def events(db):
    return db.execute(
        "SELECT action, actor, detail FROM outbox.connector_event WHERE connector_name = 'sales' ORDER BY id"
    ).fetchall()


def delivered(pipeline, server, msg_id):
    pipeline.until_status(msg_id, "sent", timeout=FIXED_WITHIN)
    assert len(server.recorder.wait_for(1)) == 1


def assert_healthy_with_history(db, last_error):
    failures, backoff_until, kept_error, kept_at, _ = connector_row(db)
    assert (failures, backoff_until) == (0, None)
    assert kept_error == last_error and kept_at is not None  # the history stays


def test_update_to_a_working_port_sends_the_waiting_mail_at_once(db, smtp, pipeline, cli_env, slow_backoff):
    broken_connector(db, free_port())
    msg_id = into_backoff(db, pipeline)
    last_error = connector_row(db)[2]
    out = outbox_cli(cli_env, "connector", "update", "sales", "--port", str(smtp.port), "--actor", "ops-anna")
    assert out.stdout.strip() == "connector sales updated: port; backoff ended; 1 waiting message(s) due now"
    delivered(pipeline, smtp, msg_id)
    assert message_row(db, msg_id)[:2] == ("sent", 1)
    assert_healthy_with_history(db, last_error)
    changed, reset = events(db)[-2:]
    assert changed[:2] == ("changed", "ops-anna")
    assert reset[:2] == ("backoff reset", "ops-anna")
    assert reset[2]["by"] == "update" and reset[2]["failures"] == 1 and reset[2]["messages_due_now"] == 1


def test_reset_sends_the_waiting_mail_when_the_server_is_back(
    db, database_url, smtp_factory, pipeline, cli_env, slow_backoff
):
    port = free_port()
    broken_connector(db, port)
    msg_id = into_backoff(db, pipeline)
    failures, backoff_until, last_error, last_error_at, updated_at = connector_row(db)
    # a message of the same connector waiting for its own retry (4xx after MAIL) keeps it
    own = enqueue(db, to="own@example.org")
    db.execute(
        "UPDATE outbox.message SET status = 'retry', phase = 'rcpt', attempts = 1, "
        "next_attempt_at = now() + interval '1 hour', "
        "connector_id = (SELECT id FROM outbox.connector WHERE name = 'sales') WHERE id = %s",
        [own],
    )
    own_due = message_row(db, own)[2]
    server = smtp_factory(port=port)  # the server is back; nothing told the outbox
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute("LISTEN outbox_message")
        out = outbox_cli(cli_env, "connector", "reset", "sales", "--actor", "ops-anna", "--json")
        [note] = listener.notifies(timeout=10, stop_after=1)  # the pollers wake at once
        assert note.channel == "outbox_message"
    result = json.loads(out.stdout)
    assert result["action"] == "connector-reset" and result["reset"] is True
    assert result["ids"] == [msg_id] and result["count"] == 1
    assert result["was"]["failures"] == failures and result["was"]["last_error"] == last_error
    assert result["was"]["backoff_until"] == backoff_until.isoformat()
    delivered(pipeline, server, msg_id)
    assert_healthy_with_history(db, last_error)
    assert connector_row(db)[3] == last_error_at and connector_row(db)[4] > updated_at  # workers reload
    assert message_row(db, own)[:3] == ("retry", 1, own_due)
    audit = db.execute(
        "SELECT action, actor, selection, count, message_ids, detail FROM outbox.operator_audit"
    )
    [(action, actor, selection, count, ids, detail)] = audit.fetchall()
    assert (action, actor, selection, count, ids) == (
        "connector-reset",
        "ops-anna",
        {"connector": "sales"},
        1,
        [msg_id],
    )
    assert detail["was"]["failures"] == failures
    assert audit_id(db) == result["audit_id"]
    assert events(db)[-1][:2] == ("backoff reset", "ops-anna") and events(db)[-1][2]["by"] == "reset"

    # A healthy connector: said so, nothing changed, nothing recorded.
    before = (connector_row(db), len(events(db)))
    again = outbox_cli(cli_env, "connector", "reset", "sales")
    assert again.returncode == 0
    assert again.stdout.strip() == "connector sales is healthy and no mail waits for it: nothing to reset"
    assert (connector_row(db), len(events(db))) == before
    assert db.execute("SELECT count(*) FROM outbox.operator_audit").fetchone()[0] == 1


def audit_id(db):
    return db.execute("SELECT max(id) FROM outbox.operator_audit").fetchone()[0]


def test_reset_of_an_unknown_connector_is_a_one_line_error_and_writes_nothing(db, cli_env):
    broken_connector(db, free_port())
    proc = outbox_cli(cli_env, "connector", "reset", "nosuch", check=False)
    assert "no connector named 'nosuch'" in one_line_error(proc)
    assert db.execute("SELECT count(*) FROM outbox.operator_audit").fetchone()[0] == 0
    assert [e[0] for e in events(db)] == ["created"]


def test_enable_sends_the_waiting_mail_at_once(db, smtp_factory, pipeline, cli_env, slow_backoff):
    port = free_port()
    broken_connector(db, port)
    msg_id = into_backoff(db, pipeline)
    outbox_cli(cli_env, "connector", "disable", "sales")
    server = smtp_factory(port=port)
    out = outbox_cli(cli_env, "connector", "enable", "sales")
    assert out.stdout.strip() == (
        "connector sales enabled; 0 held message(s) released; backoff ended; 1 waiting message(s) due now"
    )
    delivered(pipeline, server, msg_id)
    assert events(db)[-1][0] == "backoff reset" and events(db)[-1][2]["by"] == "enable"


def test_a_passing_connector_test_sends_the_waiting_mail_and_a_failing_one_changes_nothing(
    db, smtp_factory, pipeline, cli_env, slow_backoff
):
    port = free_port()
    broken_connector(db, port)
    msg_id = into_backoff(db, pipeline)
    connector_before, message_before = connector_row(db), message_row(db, msg_id)
    failing = outbox_cli(cli_env, "connector", "test", "sales", check=False)
    assert failing.returncode == 1 and "FAIL" in failing.stdout
    assert connector_row(db) == connector_before and message_row(db, msg_id) == message_before
    # the worker's backoff is in the activity history, with its reason; a failing test adds nothing
    assert [e[:2] for e in events(db)] == [("created", events(db)[0][1]), ("backing off", "worker")]
    assert "Connect call failed" in events(db)[1][2]["error"] and events(db)[1][2]["failures"] == 1

    server = smtp_factory(port=port)
    passing = outbox_cli(cli_env, "connector", "test", "sales", "--json")
    result = json.loads(passing.stdout)
    assert result["ok"] and result["backoff_reset"]["ids"] == [msg_id]
    delivered(pipeline, server, msg_id)
    assert events(db)[-1][0] == "backoff reset" and events(db)[-1][2]["by"] == "test"
    assert server.recorder.sessions >= 2  # the test's session and the delivery's

    # a passing test of a healthy connector changes nothing
    again = outbox_cli(cli_env, "connector", "test", "sales")
    assert "backoff" not in again.stdout
    assert [e[0] for e in events(db)] == ["created", "backing off", "backoff reset"]


# -- what `connector list` says ----------------------------------------------------------------


def listed(cli_env):
    [row] = json.loads(outbox_cli(cli_env, "connector", "list", "--json").stdout)
    return row, outbox_cli(cli_env, "connector", "list", "--wide").stdout


def test_list_shows_backing_off_until_then_no_old_error_once_reset(db, smtp, pipeline, cli_env, slow_backoff):
    broken_connector(db, free_port())
    into_backoff(db, pipeline)
    _, backoff_until, last_error, last_error_at, _ = connector_row(db)
    until = backoff_until.astimezone(UTC).isoformat(timespec="seconds")
    row, table = listed(cli_env)
    assert row["health"] == "backing off" and row["state"] == f"backing off until {until}"
    assert row["error"] == row["last_error"] == last_error and row["failures"] == 1
    assert f"backing off until {until}" in table and "Connect call failed" in table

    outbox_cli(cli_env, "connector", "update", "sales", "--port", str(smtp.port))
    row, table = listed(cli_env)
    assert (row["health"], row["state"], row["error"], row["failures"]) == ("ok", "ok", None, 0)
    assert (
        row["last_error"] == last_error and datetime.fromisoformat(row["last_error_at"]) == last_error_at
    )  # history
    assert "Connect call failed" not in table and "backing off" not in table


def test_list_shows_failing_after_the_timer_and_no_old_error_once_mail_got_through(
    db, smtp_factory, pipeline, cli_env, slow_backoff
):
    port = free_port()
    broken_connector(db, port)
    msg_id = into_backoff(db, pipeline)
    last_error = connector_row(db)[2]
    db.execute("UPDATE outbox.connector SET backoff_until = now() - interval '1 second'")  # the timer ran out
    row, table = listed(cli_env)
    assert (row["health"], row["state"], row["error"]) == ("failing", "failing", last_error)
    assert "Connect call failed" in table
    server = smtp_factory(port=port)
    db.execute("UPDATE outbox.message SET next_attempt_at = now() WHERE id = %s", [msg_id])
    delivered(pipeline, server, msg_id)  # the worker saw it through: the connector recovered
    row, table = listed(cli_env)
    assert (row["health"], row["state"], row["error"], row["last_error"]) == ("ok", "ok", None, last_error)
    assert "Connect call failed" not in table
