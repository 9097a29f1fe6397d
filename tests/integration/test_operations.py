"""Operator commands as an operator runs them at 3 a.m.: make messages fail against a real SMTP
server, find them with `outbox status` and the Outbox view, then replay, cancel, send-now and
prune them through the CLI. Each test checks the rows and what the SMTP server received."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import psycopg

import outbox
from outbox.admin import connectors
from outbox.admin.connectors import NewConnector
from outbox.core.message import Attachment
from tests.conftest import wait_until
from tests.helpers import add_gateway, one_line_error, outbox_cli


def run(env, *args, check=True, stdin=subprocess.DEVNULL):
    """The `outbox` command with no terminal on stdin (so bulk prompts refuse)."""
    return outbox_cli(env, *args, stdin=stdin, check=check)


def run_json(env, *args):
    return json.loads(run(env, *args, "--json").stdout)


def refused_json(env, *args):
    """A command that changed nothing because everything it named was skipped: exit 1, and
    its JSON still says why."""
    proc = run(env, *args, "--json", check=False)
    assert proc.returncode == 1, proc.stderr
    return json.loads(proc.stdout)


def gateway(db, server, name="gw", **kw):
    add_gateway(db, server, name, actor="test", **kw)


def send(db, subject="s", to=("x@example.org",), **kw):
    with db.transaction():
        return outbox.enqueue(db, from_addr="app@example.com", to=list(to), subject=subject, text="t", **kw)


def row(db, msg_id, columns="status, attempts, replays"):
    return db.execute(f"SELECT {columns} FROM outbox.message WHERE id = %s", [msg_id]).fetchone()


def history(db, msg_id):
    return db.execute(
        "SELECT outcome, smtp_code FROM outbox.attempt WHERE message_id = %s ORDER BY id", [msg_id]
    ).fetchall()


def recipients(db, msg_id):
    return dict(
        db.execute("SELECT addr, status FROM outbox.recipient WHERE message_id = %s", [msg_id]).fetchall()
    )


def audits(db, action=None):
    return db.execute(
        "SELECT action, actor, count, message_ids, selection FROM outbox.operator_audit "
        "WHERE %(a)s::text IS NULL OR action = %(a)s ORDER BY id",
        {"a": action},
    ).fetchall()


# -- replay --------------------------------------------------------------------------------


def test_replay_failed_message_resends_it_with_the_same_message_id(db, smtp, pipeline, cli_env):
    gateway(db, smtp)
    smtp.recorder.data_replies.append("554 5.7.1 rejected: policy")
    msg_id = send(db, subject="invoice")
    pipeline.until_status(msg_id, "failed")
    assert smtp.recorder.received == []

    # found the way an operator would: status and the Outbox view
    status = run_json(cli_env, "status")
    assert status["counts"]["failed"] == 1
    assert status["last_hour"]["failures"] == 1 and status["last_hour"]["by_connector"]["gw"]["failures"] == 1
    view = db.execute("SELECT id, state, connector, last_failure FROM outbox.outbox_view").fetchall()
    assert [(v[0], v[1], v[2]) for v in view] == [(msg_id, "Failed", "gw")] and "554" in view[0][3]

    out = run_json(cli_env, "replay", str(msg_id), "--actor", "alice")
    assert out["count"] == 1 and out["ids"] == [msg_id] and out["audit_id"]
    assert row(db, msg_id, "status, attempts, replays, last_error, first_failed_at") == (
        "queued",
        0,
        1,
        None,
        None,
    )
    # the same replay again: the row is queued already, nothing changes, nothing is audited
    again = refused_json(cli_env, "replay", str(msg_id), "--actor", "alice")
    assert again["count"] == 0 and again["skipped"][0]["status"] == "queued"
    assert row(db, msg_id) == ("queued", 0, 1)

    pipeline.until_status(msg_id, "sent")
    [got] = smtp.recorder.wait_for(1)
    assert got.message_id == row(db, msg_id, "message_id")[0]
    assert got.message["Subject"] == "invoice"
    assert history(db, msg_id) == [("failed", 554), ("sent", 250)]  # earlier attempt kept
    assert audits(db) == [("replay", "alice", 1, [msg_id], {"ids": [msg_id]})]
    assert db.execute("SELECT actor, count FROM outbox.replay_audit").fetchall() == [("alice", 1)]
    shown = run(cli_env, "show", str(msg_id)).stdout
    assert "Replayed    1x" in shown and "failed at dot" in shown and "sent at dot" in shown


def test_bulk_replay_by_filter_dry_run_and_confirmation(db, smtp, pipeline, cli_env):
    gateway(db, smtp)
    smtp.recorder.data_replies.extend(["554 5.7.1 spam score too high", "554 5.7.1 spam score too high"])
    failed = [send(db, subject=f"f{i}") for i in range(2)]
    for msg_id in failed:
        pipeline.until_status(msg_id, "failed")
    ok = send(db, subject="ok")
    pipeline.until_status(ok, "sent")
    assert len(smtp.recorder.wait_for(1)) == 1

    dry = run_json(cli_env, "replay", "--status", "failed", "--dry-run")
    assert dry["dry_run"] and dry["count"] == 2 and sorted(dry["ids"]) == failed
    assert {m["status"] for m in dry["messages"]} == {"failed"}
    text = run(cli_env, "replay", "--error-contains", "SPAM", "--dry-run").stdout
    assert text.startswith("would replay 2 message(s):") and "f0" in text and "f1" in text

    # more than one row and no terminal to confirm on: refused, nothing changes
    refused = run(cli_env, "replay", "--status", "failed", check=False)
    assert one_line_error(refused).startswith("outbox: error: aborted")
    assert [row(db, i)[0] for i in failed] == ["failed", "failed"] and audits(db) == []

    done = run_json(
        cli_env, "replay", "--connector", "gw", "--error-contains", "spam", "--since", "1h", "--yes"
    )
    assert sorted(done["ids"]) == failed
    for msg_id in failed:
        pipeline.until_status(msg_id, "sent")
    got = smtp.recorder.wait_for(3)
    ids = dict(db.execute("SELECT subject, message_id FROM outbox.message").fetchall())
    assert sorted((g.message["Subject"], g.message_id) for g in got) == sorted(ids.items())
    [(action, _actor, n, message_ids, selection)] = audits(db)
    assert (action, n, sorted(message_ids)) == ("replay", 2, failed)
    assert selection["connector"] == "gw" and selection["error_contains"] == "spam" and "since" in selection
    # nothing failed is left: a second bulk replay does nothing
    assert run_json(cli_env, "replay", "--status", "failed", "--yes")["count"] == 0
    assert len(audits(db)) == 1


def test_bulk_replay_confirmed_at_a_terminal(db, cli_env, parked_gateway):
    ids = []
    for i in range(2):
        msg_id = send(db, subject=f"t{i}")
        db.execute("UPDATE outbox.message SET status = 'failed', last_error = 'x' WHERE id = %s", [msg_id])
        ids.append(msg_id)

    def at_terminal(answer):
        primary, secondary = pty.openpty()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "outbox.cli", "replay", "--status", "failed"],
                env=cli_env,
                stdin=secondary,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            os.write(primary, answer)
            out, err = proc.communicate(timeout=60)
        finally:
            os.close(primary)
            os.close(secondary)
        return proc.returncode, out, err

    code, _out, err = at_terminal(b"n\n")
    assert code == 1 and "Replay these 2 messages?" in err and "outbox: error: aborted" in err
    assert {row(db, i)[0] for i in ids} == {"failed"}
    code, out, _err = at_terminal(b"y\n")
    assert code == 0 and "replayed 2 message(s)" in out
    assert {row(db, i)[0] for i in ids} == {"queued"}


def test_replay_of_partial_message_skips_recipients_who_got_it(db, smtp, pipeline, cli_env):
    gateway(db, smtp)
    smtp.recorder.script_rcpt("gone@example.org", "550 5.1.1 no such user", "250 OK")
    msg_id = send(db, to=("ok@example.org", "gone@example.org"))
    pipeline.until_status(msg_id, "partial")
    [first] = smtp.recorder.wait_for(1)
    assert first.rcpt_tos == ["ok@example.org"]

    run(cli_env, "replay", str(msg_id), "--actor", "ops")
    assert recipients(db, msg_id) == {"ok@example.org": "sent"}  # the refusal is forgotten
    pipeline.until_status(msg_id, "sent")
    first, second = smtp.recorder.wait_for(2)
    assert second.rcpt_tos == ["gone@example.org"]  # ok@ does not get a second copy
    assert first.message_id == second.message_id
    assert recipients(db, msg_id) == {"ok@example.org": "sent", "gone@example.org": "sent"}
    assert [h[0] for h in history(db, msg_id)] == ["partial", "sent"]


def test_replay_of_sent_message_needs_force(db, smtp, pipeline, cli_env):
    gateway(db, smtp)
    msg_id = send(db, to=("a@example.org", "b@example.org"))
    pipeline.until_status(msg_id, "sent")
    smtp.recorder.wait_for(1)

    assert "add --force" in one_line_error(run(cli_env, "replay", str(msg_id), check=False), code=2)
    assert "add --force" in one_line_error(run(cli_env, "replay", "--status", "sent", check=False), code=2)
    assert row(db, msg_id) == ("sent", 1, 0) and audits(db) == []

    out = run_json(cli_env, "replay", str(msg_id), "--force")
    assert out["count"] == 1 and out["selection"]["force"] is True
    assert row(db, msg_id) == ("queued", 0, 1) and recipients(db, msg_id) == {}
    pipeline.until_status(msg_id, "sent")
    first, second = smtp.recorder.wait_for(2)
    assert sorted(second.rcpt_tos) == ["a@example.org", "b@example.org"]
    assert first.message_id == second.message_id


def test_replay_refuses_unknown_ids_and_empty_selections(db, cli_env, parked_gateway):
    assert "no message with id 4242" in one_line_error(run(cli_env, "replay", "4242", check=False))
    assert "give message ids or a filter" in one_line_error(run(cli_env, "replay", check=False), code=2)
    assert "no connector named 'nope'" in one_line_error(
        run(cli_env, "replay", "--connector", "nope", check=False)
    )
    assert "--since" in one_line_error(run(cli_env, "replay", "--since", "yesterday", check=False), code=2)
    msg_id = send(db)
    db.execute("UPDATE outbox.message SET status = 'failed', last_error = 'boom' WHERE id = %s", [msg_id])
    out = refused_json(cli_env, "replay", str(msg_id), "--error-contains", "timeout")
    assert out["count"] == 0 and out["skipped"] == [
        {"id": msg_id, "status": "failed", "reason": "failed: does not match the filter"}
    ]
    assert row(db, msg_id)[0] == "failed"


def test_replay_and_send_now_wake_the_poller(db, database_url, cli_env, parked_gateway):
    failed = send(db)
    db.execute("UPDATE outbox.message SET status = 'failed' WHERE id = %s", [failed])
    scheduled = send(db, send_after=datetime.now(UTC) + timedelta(days=1))
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute("LISTEN outbox_message")
        for args in (["replay", str(failed)], ["send-now", str(scheduled)]):
            run(cli_env, *args)
            [note] = listener.notifies(timeout=10, stop_after=1)
            assert note.channel == "outbox_message"


# -- cancel --------------------------------------------------------------------------------


def test_cancelled_scheduled_retry_and_held_messages_never_reach_the_server(db, smtp, pipeline, cli_env):
    gateway(db, smtp)
    connectors.add(
        db,
        NewConnector(
            name="sales",
            direction="outgoing",
            address="sales@example.com",
            host="localhost",
            port=smtp.port,
            enabled=False,
        ),
    )
    db.execute("UPDATE outbox.settings SET retry_base_seconds = 3600, retry_max_seconds = 3600")
    scheduled = send(db, subject="scheduled", send_after=datetime.now(UTC) + timedelta(days=1))
    smtp.recorder.data_replies.append("451 4.3.0 try later")
    retrying = send(db, subject="retrying")
    pipeline.until_status(retrying, "retry")
    with db.transaction():
        held = outbox.enqueue(
            db, from_addr="sales@example.com", to=["x@example.org"], subject="held", text="t"
        )
    pipeline.until_status(held, "held")
    view = dict(db.execute("SELECT id, state FROM outbox.outbox_view").fetchall())
    assert view == {scheduled: "Queued", retrying: "Pending Retry", held: "Connector Disabled"}

    dry = run_json(cli_env, "cancel", str(scheduled), str(retrying), str(held), "--dry-run")
    assert dry["count"] == 3 and row(db, scheduled)[0] == "queued"
    out = run_json(cli_env, "cancel", str(scheduled), str(retrying), str(held), "--yes", "--actor", "bob")
    assert sorted(out["ids"]) == sorted([scheduled, retrying, held])
    assert out["from_status"] == {"queued": 1, "retry": 1, "held": 1}
    assert {row(db, i)[0] for i in (scheduled, retrying, held)} == {"cancelled"}
    assert db.execute("SELECT count(*) FROM outbox.outbox_view").fetchone()[0] == 0
    [(action, actor, n, _ids, _sel)] = audits(db)
    assert (action, actor, n) == ("cancel", "bob", 3)

    # even once due and with the connector enabled again, nothing cancelled goes out
    db.execute("UPDATE outbox.message SET next_attempt_at = now() - interval '1 second'")
    run(cli_env, "connector", "enable", "sales")
    later = send(db, subject="after the cancel")
    pipeline.until_status(later, "sent")
    assert [r.message["Subject"] for r in smtp.recorder.wait_for(1)] == ["after the cancel"]
    assert {row(db, i)[0] for i in (scheduled, retrying, held)} == {"cancelled"}
    # a second cancel changes nothing (exit 1), and send-now does not revive a cancelled message
    assert refused_json(cli_env, "cancel", str(scheduled))["count"] == 0
    assert refused_json(cli_env, "send-now", str(scheduled))["skipped"][0]["status"] == "cancelled"
    assert smtp.recorder.received[-1].message["Subject"] == "after the cancel"


def test_cancel_by_filter_asks_and_skips_a_message_being_sent(db, cli_env, parked_gateway):
    ids = [send(db, subject=f"s{i}", send_after=datetime.now(UTC) + timedelta(hours=1)) for i in range(3)]
    # as a worker in the middle of SMTP leaves it
    db.execute(
        "UPDATE outbox.message SET status = 'sending', attempts = 1, lease_token = gen_random_uuid(), "
        "lease_expires_at = now() + interval '1 hour' WHERE id = %s",
        [ids[2]],
    )
    assert one_line_error(run(cli_env, "cancel", "--from", "APP@example.com", check=False)).startswith(
        "outbox: error: aborted"
    )
    out = run_json(cli_env, "cancel", "--from", "app@example.com", "--yes")
    assert sorted(out["ids"]) == ids[:2]
    refused = run(cli_env, "cancel", str(ids[2]), check=False)
    sending = refused.stdout
    assert refused.returncode == 1 and "nothing to cancel" in sending
    assert "cannot be cancelled safely" in sending
    assert row(db, ids[2])[0] == "sending"


def test_cancel_of_a_dispatched_message_stops_its_worker(db, smtp, stopped_pipeline, cli_env):
    gateway(db, smtp)
    msg_id = send(db)
    stopped_pipeline.cycle()  # handed to the broker, no worker running yet
    assert stopped_pipeline.status(msg_id) == "dispatched"
    assert run_json(cli_env, "cancel", str(msg_id))["count"] == 1
    stopped_pipeline.start()
    stopped_pipeline.worker.join()  # the worker took the broker message and did nothing
    assert row(db, msg_id) == ("cancelled", 0, 0)
    assert smtp.recorder.received == [] and history(db, msg_id) == []


# -- send-now ------------------------------------------------------------------------------


def test_send_now_delivers_a_message_scheduled_in_a_year(db, smtp, pipeline, cli_env):
    gateway(db, smtp)
    next_year = (datetime.now(UTC) + timedelta(days=365)).isoformat()
    msg_id = int(
        run(
            cli_env,
            "send",
            "--from",
            "app@example.com",
            "--to",
            "x@example.org",
            "--subject",
            "next year",
            "--text",
            "t",
            "--send-at",
            next_year,
        ).stdout
    )
    pipeline.cycle()
    assert row(db, msg_id)[0] == "queued"
    assert "would send now 1 message(s)" in run(cli_env, "send-now", str(msg_id), "--dry-run").stdout
    assert row(db, msg_id, "send_after > now()")[0]

    out = run_json(cli_env, "send-now", str(msg_id), "--actor", "carol")
    assert out["ids"] == [msg_id]
    assert row(db, msg_id, "send_after <= now(), next_attempt_at <= now()") == (True, True)
    pipeline.until_status(msg_id, "sent")
    assert [r.message["Subject"] for r in smtp.recorder.wait_for(1)] == ["next year"]
    [(action, actor, n, ids, _sel)] = audits(db)
    assert (action, actor, n, ids) == ("send-now", "carol", 1, [msg_id])
    refused = run(cli_env, "send-now", str(msg_id), check=False)
    skipped = refused.stdout
    assert refused.returncode == 1 and "nothing to send now" in skipped
    assert "replay sends a finished message again" in skipped
    assert "no message with id 999" in one_line_error(run(cli_env, "send-now", "999", check=False))


# -- prune ---------------------------------------------------------------------------------


def test_prune_deletes_old_finished_messages_and_their_history(db, smtp, pipeline, cli_env):
    gateway(db, smtp)
    with db.transaction():
        old_sent = outbox.enqueue(
            db,
            from_addr="app@example.com",
            to=["a@example.org", "b@example.org"],
            subject="old sent",
            text="t",
            attachments=[Attachment(filename="a.txt", content=b"hello", content_type="text/plain")],
        )
    pipeline.until_status(old_sent, "sent")
    smtp.recorder.data_replies.append("554 5.7.1 no")
    old_failed = send(db, subject="old failed")
    pipeline.until_status(old_failed, "failed")
    recent = send(db, subject="recent")
    pipeline.until_status(recent, "sent")
    old_cancelled = send(db, subject="old cancelled", send_after=datetime.now(UTC) + timedelta(days=1))
    run(cli_env, "cancel", str(old_cancelled))
    old_waiting = send(db, subject="old but scheduled", send_after=datetime.now(UTC) + timedelta(days=1))
    old = [old_sent, old_failed, old_cancelled, old_waiting]
    db.execute("UPDATE outbox.message SET updated_at = now() - interval '100 days' WHERE id = ANY(%s)", [old])

    def counts():
        return db.execute(
            "SELECT (SELECT count(*) FROM outbox.message), (SELECT count(*) FROM outbox.attempt), "
            "(SELECT count(*) FROM outbox.recipient), (SELECT count(*) FROM outbox.attachment)"
        ).fetchone()

    before = counts()
    dry = run_json(cli_env, "prune", "--older-than", "90d", "--dry-run")
    assert (dry["messages"], dry["attempts"], dry["recipients"], dry["attachments"]) == (3, 2, 3, 1)
    assert counts() == before and audits(db, "prune") == []

    done = run_json(cli_env, "prune", "--older-than", "90d", "--batch-size", "2")
    assert (done["messages"], done["attempts"], done["recipients"], done["attachments"]) == (3, 2, 3, 1)
    assert done["batches"] == 2
    left = sorted(r[0] for r in db.execute("SELECT id FROM outbox.message").fetchall())
    assert left == sorted([recent, old_waiting])
    assert counts() == (2, 1, 1, 0)
    [(action, _actor, n, ids, selection)] = audits(db, "prune")
    assert (action, n, ids, selection["older_than"]) == ("prune", 3, None, "90d")
    assert run_json(cli_env, "prune", "--older-than", "90d")["messages"] == 0
    assert "--older-than" in one_line_error(run(cli_env, "prune", "--older-than", "90", check=False), code=2)


# -- status --------------------------------------------------------------------------------


def test_status_watch_refreshes_until_interrupted(db, cli_env, parked_gateway):
    send(db)
    proc = subprocess.Popen(
        [sys.executable, "-m", "outbox.cli", "status", "--watch", "0.2"],
        env=cli_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        headers = 0
        deadline = time.monotonic() + 60
        while headers < 3 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            headers += line.startswith("outbox status, every 0.2s")
            if line.startswith("queued"):
                assert line.split() == ["queued", "1"]
        assert headers == 3
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_status_counts_last_hour_per_connector(db, smtp, pipeline, cli_env):
    gateway(db, smtp)
    smtp.recorder.data_replies.append("554 5.7.1 no")
    failed = send(db)
    pipeline.until_status(failed, "failed")
    sent = send(db)
    pipeline.until_status(sent, "sent")
    wait_until(lambda: len(smtp.recorder.received) == 1)
    hour = run_json(cli_env, "status")["last_hour"]
    assert (hour["sent"], hour["failures"]) == (1, 1)
    assert hour["by_connector"] == {"gw": {"sent": 1, "failures": 1}}
    assert hour["by_outcome"] == {"sent": 1, "failed": 1}
    assert "last hour   1 sent, 1 failures" in run(cli_env, "status").stdout


def test_send_now_warns_when_the_connector_is_backing_off(db, cli_env, parked_gateway):
    msg = send(db)
    db.execute(
        "UPDATE outbox.connector SET failures = 2, backoff_until = now() + interval '1 hour', "
        "last_error = 'SMTPConnectError: refused' WHERE name = 'parked'"
    )
    db.execute(
        "UPDATE outbox.message SET status = 'retry', connector_id = (SELECT id FROM outbox.connector "
        "WHERE name = 'parked'), next_attempt_at = now() + interval '1 hour' WHERE id = %s",
        [msg],
    )
    proc = run(cli_env, "send-now", str(msg))
    assert proc.returncode == 0
    [warning] = proc.stderr.strip().splitlines()
    assert warning.startswith("warning: connector parked is backing off until ")
    assert "SMTPConnectError: refused" in warning and "outbox connector reset parked" in warning
    assert row(db, msg, "status")[0] == "retry"  # due now; the connector's backoff still applies
