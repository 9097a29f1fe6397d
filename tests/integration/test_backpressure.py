"""Backpressure: the poller keeps at most `max_in_flight` rows dispatched or sending, so a
backlog larger than the workers get through in a lease waits in the table (no reaping and
re-dispatching rows that are still in Redis), and it waits for room without spinning."""

from __future__ import annotations

import itertools
import threading
import time

import psycopg

from tests.conftest import wait_until
from worker.broker import make_broker
from worker.poller import Poller


def _enqueue(db, n: int) -> None:
    db.execute(
        "INSERT INTO outbox.message (from_addr, to_addrs, subject, text_body) "
        "SELECT 'a@example.com', ARRAY['r' || g || '@example.org'], 's', 't' FROM generate_series(1, %s) g",
        [n],
    )


def _count(db, *statuses: str) -> int:
    return db.execute(
        "SELECT count(*) FROM outbox.message WHERE status = ANY(%s)", [list(statuses)]
    ).fetchone()[0]


def test_poller_dispatches_no_more_than_the_cap(config, db, parked_gateway):
    _enqueue(db, 40)
    capped = config.model_copy(update={"max_in_flight": 15, "claim_batch": 10})
    broker, actor, _ = make_broker(capped)  # no worker consumes: rows stay dispatched
    poller = Poller(capped, actor)
    try:
        assert poller.run_once().dispatched == 15
        assert poller.run_once().dispatched == 0
        assert _count(db, "dispatched") == 15 and _count(db, "queued") == 25
        # two finish (as a worker would write them): two more go out, no more
        db.execute(
            "UPDATE outbox.message SET status = 'sent', sent_at = now(), lease_token = NULL, "
            "lease_expires_at = NULL WHERE id IN "
            "(SELECT id FROM outbox.message WHERE status = 'dispatched' ORDER BY id LIMIT 2)"
        )
        assert poller.run_once().dispatched == 2
        assert _count(db, "dispatched", "sending") == 15
    finally:
        poller.close()
        broker.close()


def test_capped_poller_waits_for_its_interval_instead_of_spinning(config, db, parked_gateway, stop_event):
    _enqueue(db, 30)
    capped = config.model_copy(update={"max_in_flight": 10, "poll_interval_seconds": 0.5})
    broker, actor, _ = make_broker(capped)
    poller = Poller(capped, actor)
    cycles: list[float] = []
    run_once = poller.run_once

    def counted():
        cycles.append(time.monotonic())
        return run_once()

    poller.run_once = counted  # type: ignore[method-assign]
    thread = threading.Thread(target=poller.run, args=(stop_event,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(cycles) >= 4, timeout=10, what="four poller cycles")
        assert _count(db, "dispatched") == 10
        gaps = [b - a for a, b in itertools.pairwise(cycles[1:])]
        assert min(gaps) >= 0.4, gaps  # capped: one look per interval, not a busy loop
    finally:
        stop_event.set()
        thread.join(timeout=10)
        broker.close()


def test_in_flight_count_stays_cheap_with_many_finished_rows(db):
    """The cap is counted in the claim statement itself: on the partial index of in-flight
    rows, whatever the number of finished rows."""
    from outbox.store.sql import queries

    db.execute(
        "INSERT INTO outbox.message (from_addr, to_addrs, subject, text_body, status, sent_at) "
        "SELECT 'a@example.com', '{b@example.org}', 's', 't', 'sent', now() FROM generate_series(1, 100000)"
    )
    db.execute(
        "INSERT INTO outbox.message (from_addr, to_addrs, subject, text_body, status, lease_token, "
        "lease_expires_at) SELECT 'a@example.com', '{b@example.org}', 's', 't', 'dispatched', "
        "gen_random_uuid(), now() + interval '5 minutes' FROM generate_series(1, 2000)"
    )
    _enqueue(db, 1000)
    db.execute("VACUUM ANALYZE outbox.message")
    params = {"limit": 500, "max_in_flight": 5000, "lease_seconds": 60}
    with db.transaction() as tx:
        plan = "\n".join(
            r[0]
            for r in db.execute(
                "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + queries("worker")["claim_due"], params
            )
        )
        raise psycopg.Rollback(tx)
    assert "message_lease_idx" in plan and "message_due_idx" in plan, plan
    assert "Seq Scan" not in plan, plan
