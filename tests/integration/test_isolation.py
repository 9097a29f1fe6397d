"""Every message on its own: outcomes are written as each message finishes, and whatever
one message (or its connector) does is never charged to the others of its broker batch."""

from __future__ import annotations

import collections
import socket
from collections.abc import Iterator

import pytest

import outbox
from outbox.admin import connectors
from outbox.admin.connectors import NewConnector
from outbox.store.sql import queries
from tests.conftest import wait_until
from tests.helpers import add_gateway

WQ = queries("worker")


def enqueue(db, n, from_addr="a@example.com", to="r{}@example.org"):
    with db.transaction():
        return [
            outbox.enqueue(db, from_addr=from_addr, to=[to.format(i)], subject=f"m{i}", text="t")
            for i in range(n)
        ]


def statuses(db, ids):
    return dict(db.execute("SELECT id, status FROM outbox.message WHERE id = ANY(%s)", [ids]).fetchall())


def copies_per_message(server):
    return collections.Counter(r.message_id for r in server.recorder.received)


@pytest.fixture
def tarpit() -> Iterator[int]:
    """A port that accepts TCP connections (the kernel completes the handshake) and then says
    nothing, like a relay behind a firewall that drops its traffic."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1000)
        yield s.getsockname()[1]


def test_outcome_is_written_when_its_message_finishes_not_with_its_batch(db, smtp, stopped_pipeline):
    add_gateway(db, smtp)
    smtp.recorder.rcpt_replies["slow@example.org"] = collections.deque(["slow:6"])
    [fast] = enqueue(db, 1)
    [slow] = enqueue(db, 1, to="slow@example.org")
    stopped_pipeline.cycle()  # both rows in one broker message
    stopped_pipeline.start()
    wait_until(lambda: statuses(db, [fast])[fast] == "sent", timeout=5, what="the fast message recorded")
    assert statuses(db, [slow])[slow] == "sending"
    stopped_pipeline.until_status(slow, "sent")


def test_a_row_that_cannot_be_built_fails_alone(db, smtp, stopped_pipeline):
    """A SQL writer's row with two From headers: it fails with the reason; every other
    message of its batch is delivered once and charged one attempt."""
    add_gateway(db, smtp)
    good = enqueue(db, 20)
    [poison] = db.execute(
        "INSERT INTO outbox.message (from_addr, to_addrs, subject, text_body, headers) "
        """VALUES ('a@example.com', '{v@example.org}', 'bad', 't', '{"From": "x@evil.example"}') """
        "RETURNING id"
    ).fetchone()
    good += enqueue(db, 20)
    stopped_pipeline.cycle()
    stopped_pipeline.start()
    stopped_pipeline.until_status(poison, "failed")
    wait_until(lambda: set(statuses(db, good).values()) == {"sent"}, what="every good message sent")
    [(error, attempts)] = db.execute(
        "SELECT last_error, attempts FROM outbox.message WHERE id = %s", [poison]
    ).fetchall()
    assert error.startswith("cannot build the message: ") and "From" in error, error
    assert attempts == 1
    assert sorted(copies_per_message(smtp).values()) == [1] * 40
    spent = db.execute("SELECT sum(attempts) FROM outbox.message WHERE id = ANY(%s)", [good]).fetchone()[0]
    assert spent == 40


def test_a_blackholed_connector_delays_no_other_and_spends_no_attempt(db, smtp, stopped_pipeline, tarpit):
    add_gateway(db, smtp)
    connectors.add(
        db,
        NewConnector(
            name="dead",
            direction="outgoing",
            address="dead@example.com",
            host="127.0.0.1",
            port=tarpit,
            timeout_seconds=3,
            max_connections=2,
        ),
    )
    db.execute("UPDATE outbox.settings SET retry_base_seconds = 600, retry_max_seconds = 3600")
    stuck = enqueue(db, 20, from_addr="dead@example.com")
    healthy = enqueue(db, 20)
    stopped_pipeline.cycle()
    stopped_pipeline.start()
    # Healthy mail is recorded at once, not after the blackholed connector's timeout.
    wait_until(lambda: set(statuses(db, healthy).values()) == {"sent"}, timeout=2.5, what="healthy mail sent")
    wait_until(lambda: set(statuses(db, stuck).values()) == {"retry"}, timeout=15, what="stuck mail back off")
    attempts = db.execute(
        "SELECT sum(attempts), max(last_error) FROM outbox.message WHERE id = ANY(%s)", [stuck]
    ).fetchone()
    assert attempts[0] == 0, "waiting for a connector must not spend attempts"
    assert "backing off" in attempts[1] or "Timed out" in attempts[1], attempts[1]
    [(failures, backoff)] = db.execute(
        "SELECT failures, backoff_until > now() FROM outbox.connector WHERE name = 'dead'"
    ).fetchall()
    assert failures == 1 and backoff


def test_lease_is_renewed_while_a_slow_server_answers(db, smtp, pipeline):
    """A reply that takes longer than the lease: the worker keeps the row, nothing is reaped
    or sent twice."""
    add_gateway(db, smtp)
    db.execute("UPDATE outbox.settings SET lease_seconds = 1.5, smtp_dot_timeout_seconds = 30")
    smtp.recorder.data_replies.append("slow:4")
    [msg] = enqueue(db, 1)
    pipeline.until_status(msg, "sent", timeout=30)  # the poller reaps expired leases each cycle
    assert len(smtp.recorder.received) == 1
    outcomes = [r[0] for r in db.execute("SELECT outcome FROM outbox.attempt WHERE message_id = %s", [msg])]
    assert outcomes == ["sent"]


def test_a_row_lost_while_waiting_for_its_connector_gets_its_attempt_back(db, parked_gateway):
    [msg] = enqueue(db, 1)
    db.execute(
        "UPDATE outbox.message SET status = 'sending', attempts = 1, phase = 'waiting', "
        "lease_token = gen_random_uuid(), lease_expires_at = now() - interval '1 s' WHERE id = %s",
        [msg],
    )
    db.execute(WQ["reap_expired"], {"max_attempts": 1, "ambiguous_policy": "retry"})
    [(status, attempts, error)] = db.execute(
        "SELECT status, attempts, last_error FROM outbox.message WHERE id = %s", [msg]
    ).fetchall()
    assert (status, attempts) == ("queued", 0)
    assert "waiting for its connector" in error and "no attempt spent" in error


def test_a_message_that_keeps_killing_its_worker_right_after_its_claim_still_runs_out(db, parked_gateway):
    """A worker lost before it reported progress gives the attempt back, twice at most."""
    [msg] = enqueue(db, 1)
    seen = []
    for _ in range(4):
        db.execute(
            "UPDATE outbox.message SET status = 'sending', attempts = attempts + 1, phase = 'claimed', "
            "lease_token = gen_random_uuid(), lease_expires_at = now() - interval '1 s' WHERE id = %s",
            [msg],
        )
        db.execute(WQ["reap_expired"], {"max_attempts": 10, "ambiguous_policy": "retry"})
        seen.append(db.execute("SELECT attempts FROM outbox.message WHERE id = %s", [msg]).fetchone()[0])
    assert seen == [0, 0, 1, 2]
