"""End to end: rows inserted -> poller -> Redis -> Dramatiq worker -> real SMTP server ->
status written back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg

import outbox
from tests.conftest import wait_until
from tests.helpers import add_gateway


def gateway(db, server, name="gw", **kw):
    add_gateway(db, server, name, **kw)


def test_enqueued_message_arrives_and_is_marked_sent(db, smtp, pipeline):
    gateway(db, smtp)
    with db.transaction():
        msg_id = outbox.enqueue(
            db,
            from_addr="sales@example.com",
            to=["ann@example.org"],
            cc=["cc@example.org"],
            bcc=["hidden@example.org"],
            subject="Your order",
            text="Thanks!",
        )
    assert pipeline.until_status(msg_id, "sent") == "sent"
    [got] = smtp.recorder.wait_for(1)
    assert got.mail_from == "sales@example.com"
    assert sorted(got.rcpt_tos) == ["ann@example.org", "cc@example.org", "hidden@example.org"]
    assert got.message["Subject"] == "Your order"
    assert got.message["Bcc"] is None
    assert b"hidden@example.org" not in got.content
    row = db.execute(
        "SELECT message_id, attempts, sent_at, last_error FROM outbox.message WHERE id = %s",
        [msg_id],
    ).fetchone()
    assert got.message_id == row[0]
    assert row[1] == 1 and row[2] is not None and row[3] is None
    results = dict(
        db.execute("SELECT addr, status FROM outbox.recipient WHERE message_id = %s", [msg_id]).fetchall()
    )
    assert results == {
        "ann@example.org": "sent",
        "cc@example.org": "sent",
        "hidden@example.org": "sent",
    }


def test_plain_sql_insert_is_delivered(db, smtp, pipeline):
    gateway(db, smtp)
    msg_id = db.execute(
        "INSERT INTO outbox.message (from_addr, to_addrs, subject, text_body) "
        "VALUES ('app@example.com', '{bob@example.org}', 'from SQL', 'hi') RETURNING id"
    ).fetchone()[0]
    pipeline.until_status(msg_id, "sent")
    [got] = smtp.recorder.wait_for(1)
    assert got.rcpt_tos == ["bob@example.org"]
    assert got.message["Message-ID"].endswith("@example.com>")


def test_rolled_back_transaction_sends_nothing(db, smtp, pipeline, database_url):
    gateway(db, smtp)
    with psycopg.connect(database_url) as conn:
        outbox.enqueue(conn, from_addr="a@example.com", to=["x@example.org"], subject="s", text="t")
        conn.rollback()
    pipeline.cycle()
    assert db.execute("SELECT count(*) FROM outbox.message").fetchone()[0] == 0
    # a message committed afterwards goes through, and is the only one the server sees
    with db.transaction():
        kept = outbox.enqueue(db, from_addr="a@example.com", to=["y@example.org"], subject="kept", text="t")
    pipeline.until_status(kept, "sent")
    assert [r.message["Subject"] for r in smtp.recorder.wait_for(1)] == ["kept"]


def test_scheduled_message_waits_until_due(db, smtp, pipeline):
    gateway(db, smtp)
    later = datetime.now(UTC) + timedelta(seconds=2)
    with db.transaction():
        msg_id = outbox.enqueue(
            db,
            from_addr="a@example.com",
            to=["x@example.org"],
            subject="later",
            text="t",
            send_after=later,
        )
        now_id = outbox.enqueue(db, from_addr="a@example.com", to=["x@example.org"], subject="now", text="t")
    pipeline.until_status(now_id, "sent")
    assert pipeline.status(msg_id) == "queued"
    assert [r.message["Subject"] for r in smtp.recorder.received] == ["now"]
    pipeline.until_status(msg_id, "sent")
    sent_at = db.execute("SELECT sent_at FROM outbox.message WHERE id = %s", [msg_id]).fetchone()[0]
    assert sent_at >= later


def test_transient_reply_retries_then_succeeds(db, smtp, pipeline):
    gateway(db, smtp)
    db.execute("UPDATE outbox.settings SET retry_base_seconds = 0.2, retry_max_seconds = 0.5")
    smtp.recorder.data_replies.extend(["451 4.3.0 try again later"])
    with db.transaction():
        msg_id = outbox.enqueue(db, from_addr="a@example.com", to=["x@example.org"], subject="s", text="t")
    pipeline.until_status(msg_id, "retry", "sent")
    row = db.execute(
        "SELECT status, last_error, last_smtp_code, next_attempt_at > now() "
        "FROM outbox.message WHERE id = %s",
        [msg_id],
    ).fetchone()
    assert row[0] == "retry" and row[2] == 451 and "451" in row[1]
    pipeline.until_status(msg_id, "sent")
    [_got] = smtp.recorder.wait_for(1)
    outcomes = db.execute(
        "SELECT outcome, smtp_code FROM outbox.attempt WHERE message_id = %s ORDER BY id", [msg_id]
    ).fetchall()
    assert outcomes == [("retry", 451), ("sent", 250)]
    assert db.execute("SELECT attempts FROM outbox.message WHERE id = %s", [msg_id]).fetchone()[0] == 2


def test_permanent_reply_fails_at_once(db, smtp, pipeline):
    gateway(db, smtp)
    smtp.recorder.data_replies.extend(["554 5.7.1 rejected: spam"])
    with db.transaction():
        msg_id = outbox.enqueue(db, from_addr="a@example.com", to=["x@example.org"], subject="s", text="t")
    pipeline.until_status(msg_id, "failed")
    row = db.execute(
        "SELECT attempts, last_error, last_smtp_code, first_failed_at IS NOT NULL "
        "FROM outbox.message WHERE id = %s",
        [msg_id],
    ).fetchone()
    assert row[0] == 1 and row[2] == 554 and "spam" in row[1] and row[3]
    assert smtp.recorder.received == []


def test_retries_exhausted_end_in_failed(db, smtp, pipeline):
    gateway(db, smtp)
    db.execute(
        "UPDATE outbox.settings SET retry_base_seconds = 0.05, retry_max_seconds = 0.1, max_attempts = 3"
    )
    smtp.recorder.script_rcpt("x@example.org", "450 4.2.1 mailbox busy")
    with db.transaction():
        msg_id = outbox.enqueue(db, from_addr="a@example.com", to=["x@example.org"], subject="s", text="t")
    pipeline.until_status(msg_id, "failed")
    row = db.execute("SELECT attempts, last_error FROM outbox.message WHERE id = %s", [msg_id]).fetchone()
    assert row[0] == 3
    assert "gave up after 3 attempts" in row[1] and "450" in row[1]


def test_duplicate_broker_delivery_sends_once(db, smtp, stopped_pipeline):
    gateway(db, smtp)
    with db.transaction():
        msg_id = outbox.enqueue(db, from_addr="a@example.com", to=["x@example.org"], subject="s", text="t")
    stopped_pipeline.cycle()  # dispatched: one broker message
    token = db.execute("SELECT lease_token::text FROM outbox.message WHERE id = %s", [msg_id]).fetchone()[0]
    stopped_pipeline.worker.actor.send([[msg_id, token]])  # the same hint delivered again
    stopped_pipeline.start()
    stopped_pipeline.until_status(msg_id, "sent")
    stopped_pipeline.worker.join()
    assert len(smtp.recorder.received) == 1
    assert db.execute("SELECT attempts FROM outbox.message WHERE id = %s", [msg_id]).fetchone()[0] == 1


def test_lost_broker_message_is_redispatched_after_lease(db, smtp, stopped_pipeline, config):
    import redis

    gateway(db, smtp)
    db.execute("UPDATE outbox.settings SET lease_seconds = 1")
    with db.transaction():
        msg_id = outbox.enqueue(db, from_addr="a@example.com", to=["x@example.org"], subject="s", text="t")
    stopped_pipeline.cycle()
    assert stopped_pipeline.status(msg_id) == "dispatched"
    # Redis loses every key of ours (restart without persistence)
    client = redis.Redis.from_url(config.redis_url)
    client.delete(*client.scan_iter(match=f"{config.redis_namespace}*"))
    stopped_pipeline.start()
    stopped_pipeline.until_status(msg_id, "sent", timeout=20)
    assert len(smtp.recorder.wait_for(1)) == 1
    expired = db.execute("SELECT count(*) FROM outbox.attempt WHERE message_id = %s", [msg_id]).fetchone()[0]
    assert expired == 1  # only the successful attempt: a lost dispatch costs no attempt


def test_two_pollers_never_double_dispatch(db, smtp, config, parked_gateway):
    from worker.broker import make_broker
    from worker.poller import Poller

    with db.transaction():
        for i in range(300):
            outbox.enqueue(db, from_addr="a@example.com", to=[f"r{i}@example.org"], subject="s", text="t")
    sent: list[list] = []

    class Recording:
        def send(self, chunk):
            sent.append(chunk)

    _, _, _ = make_broker(config)
    import threading

    pollers = [Poller(config, Recording()) for _ in range(2)]
    threads = [threading.Thread(target=p.run_once) for p in pollers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in pollers:
        p.close()
    ids = [row[0] for chunk in sent for row in chunk]
    assert len(ids) == 300 and len(set(ids)) == 300
    assert db.execute("SELECT count(*) FROM outbox.message WHERE status = 'dispatched'").fetchone()[0] == 300


def test_claim_respects_batch_size(db, config, parked_gateway):
    from worker.poller import Poller

    with db.transaction():
        for i in range(120):
            outbox.enqueue(db, from_addr="a@example.com", to=[f"r{i}@example.org"], subject="s", text="t")
    chunks: list[list] = []

    class Recording:
        def send(self, chunk):
            chunks.append(chunk)

    poller = Poller(config.model_copy(update={"claim_batch": 50, "dispatch_batch": 20}), Recording())
    settings = __import__("outbox.core.settings", fromlist=["Settings"]).Settings()
    n = poller._dispatch(poller._connection(), settings)
    poller.close()
    assert n == 50
    assert [len(c) for c in chunks] == [20, 20, 10]
    assert db.execute("SELECT count(*) FROM outbox.message WHERE status = 'dispatched'").fetchone()[0] == 50


def test_insert_wakes_the_poller_without_waiting_for_the_interval(db, smtp, config, stop_event):
    import threading

    from worker.runner import WorkerProcess, run_poller

    gateway(db, smtp)
    slow = config.model_copy(update={"poll_interval_seconds": 600})
    worker = WorkerProcess(slow)
    worker.start()
    thread = threading.Thread(target=run_poller, args=(slow, stop_event), daemon=True)
    thread.start()
    try:
        wait_until(
            lambda: db.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'LISTEN outbox_message' "
                "AND datname = current_database()"
            ).fetchone()[0],
            what="the poller to LISTEN",
        )
        with db.transaction():
            msg_id = outbox.enqueue(
                db, from_addr="a@example.com", to=["x@example.org"], subject="s", text="t"
            )
        wait_until(
            lambda: (
                db.execute("SELECT status FROM outbox.message WHERE id = %s", [msg_id]).fetchone()[0]
                == "sent"
            ),
            timeout=20,
            what="NOTIFY to wake the poller",
        )
    finally:
        stop_event.set()
        thread.join(timeout=10)
        worker.stop(timeout_seconds=10)


def test_worker_lost_while_sending_is_retried(db, smtp, pipeline):
    gateway(db, smtp)
    with db.transaction():
        msg_id = outbox.enqueue(db, from_addr="a@example.com", to=["x@example.org"], subject="s", text="t")
    # as a worker that died mid-send leaves it: sending, attempt counted, lease run out
    db.execute(
        "UPDATE outbox.message SET status = 'sending', attempts = 1, phase = 'rcpt', "
        "lease_token = gen_random_uuid(), lease_expires_at = now() - interval '1 second' WHERE id = %s",
        [msg_id],
    )
    pipeline.until_status(msg_id, "sent")
    history = db.execute(
        "SELECT attempt, outcome FROM outbox.attempt WHERE message_id = %s ORDER BY id", [msg_id]
    ).fetchall()
    assert history == [(1, "lease-expired"), (2, "sent")]
    assert len(smtp.recorder.wait_for(1)) == 1


def test_message_that_kills_its_worker_runs_out_of_attempts(db, smtp, pipeline):
    gateway(db, smtp)
    with db.transaction():
        msg_id = outbox.enqueue(db, from_addr="a@example.com", to=["x@example.org"], subject="s", text="t")
    db.execute(
        "UPDATE outbox.message SET status = 'sending', attempts = 10, lease_token = gen_random_uuid(), "
        "lease_expires_at = now() - interval '1 second' WHERE id = %s",
        [msg_id],
    )
    pipeline.until_status(msg_id, "failed")
    assert (
        "attempts exhausted"
        in db.execute("SELECT last_error FROM outbox.message WHERE id = %s", [msg_id]).fetchone()[0]
    )
    assert smtp.recorder.received == []


def test_mixed_recipient_replies_end_partial(db, smtp, pipeline):
    gateway(db, smtp)
    smtp.recorder.script_rcpt("gone@example.org", "550 5.1.1 no such user")
    with db.transaction():
        msg_id = outbox.enqueue(
            db, from_addr="a@example.com", to=["ok@example.org", "gone@example.org"], subject="s", text="t"
        )
    pipeline.until_status(msg_id, "partial")
    [got] = smtp.recorder.wait_for(1)
    assert got.rcpt_tos == ["ok@example.org"]
    results = dict(
        db.execute("SELECT addr, status FROM outbox.recipient WHERE message_id = %s", [msg_id]).fetchall()
    )
    assert results == {"ok@example.org": "sent", "gone@example.org": "failed"}
    assert (
        "gone@example.org: 550"
        in db.execute("SELECT last_error FROM outbox.message WHERE id = %s", [msg_id]).fetchone()[0]
    )


def test_deferred_recipient_is_retried_alone(db, smtp, pipeline):
    gateway(db, smtp)
    db.execute("UPDATE outbox.settings SET retry_base_seconds = 0.1, retry_max_seconds = 0.2")
    smtp.recorder.script_rcpt("busy@example.org", "452 4.2.2 mailbox full", "250 OK")
    with db.transaction():
        msg_id = outbox.enqueue(
            db, from_addr="a@example.com", to=["ok@example.org", "busy@example.org"], subject="s", text="t"
        )
    pipeline.until_status(msg_id, "sent")
    copies = smtp.recorder.wait_for(2)
    assert [c.rcpt_tos for c in copies] == [["ok@example.org"], ["busy@example.org"]]
    assert copies[0].message_id == copies[1].message_id


def test_connections_are_pooled_per_connector(db, smtp, pipeline):
    gateway(db, smtp, max_connections=2)
    with db.transaction():
        ids = [
            outbox.enqueue(db, from_addr="a@example.com", to=[f"r{i}@example.org"], subject="s", text="t")
            for i in range(30)
        ]
    for msg_id in ids:
        pipeline.until_status(msg_id, "sent")
    assert len(smtp.recorder.wait_for(30)) == 30
    assert 1 <= smtp.recorder.sessions <= 2
