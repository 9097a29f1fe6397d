"""One vocabulary: the statuses and outcomes of outbox/core/statuses.py are exactly what the schema's
CHECK constraints allow, every status the SQL names is one of them, and the poller's
`reap_expired` statement decides an expired lease as outbox/core/policy.py does."""

from __future__ import annotations

import itertools
import re
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg
import pytest

from outbox.core.policy import PHASES, UNSTARTED_PHASES, after_lease_expired
from outbox.core.settings import Settings
from outbox.core.statuses import DUE, FINISHED, IN_FLIGHT, OUTCOMES, RECIPIENT_STATUSES, STATUSES, WAITING
from outbox.store.sql import queries

ROOT = Path(__file__).resolve().parent.parent.parent


def allowed(db: psycopg.Connection[Any], constraint: str) -> set[str]:
    [definition] = db.execute(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = %s", [constraint]
    ).fetchone()
    return set(re.findall(r"'([a-z-]+)'::text", definition))


def test_python_and_sql_name_the_same_statuses_and_outcomes(db):
    assert allowed(db, "message_status_valid") == set(STATUSES)
    assert allowed(db, "attempt_outcome_valid") == set(OUTCOMES)
    assert allowed(db, "recipient_status_valid") == set(RECIPIENT_STATUSES)
    assert set(FINISHED) | set(IN_FLIGHT) | set(WAITING) == set(STATUSES)
    assert len(FINISHED + IN_FLIGHT + WAITING) == len(STATUSES) and set(DUE) <= set(WAITING)


def _status_literals(sql: str) -> set[str]:
    found: set[str] = set()
    for group in re.findall(r"status\s+(?:NOT\s+)?IN\s*\(([^)]*)\)", sql, flags=re.IGNORECASE):
        found |= set(re.findall(r"'([a-z-]+)'", group))
    found |= set(re.findall(r"status\s*(?:=|<>)\s*'([a-z-]+)'", sql, flags=re.IGNORECASE))
    return found


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(lambda: (ROOT / "schema.sql").read_text(), id="schema.sql"),
        pytest.param(
            lambda: resources.files("outbox.store").joinpath("queries.sql").read_text(), id="outbox"
        ),
        pytest.param(lambda: resources.files("worker").joinpath("queries.sql").read_text(), id="worker"),
    ],
)
def test_every_status_the_sql_names_is_in_the_vocabulary(text):
    named = _status_literals(text())
    assert named, "no status literal found: the pattern is out of date"
    assert named <= set(STATUSES) | set(OUTCOMES) | set(RECIPIENT_STATUSES) | {"viewer", "operator", "admin"}


def test_finished_means_the_same_to_retention_prune_and_their_index(db):
    [predicate] = db.execute(
        "SELECT pg_get_expr(indpred, indrelid) FROM pg_index"
        " WHERE indexrelid = 'outbox.message_finished_idx'::regclass"
    ).fetchone()
    assert set(re.findall(r"'([a-z-]+)'", predicate)) == set(FINISHED)
    [body] = db.execute("SELECT prosrc FROM pg_proc WHERE proname = 'delete_finished'").fetchone()
    assert set(re.findall(r"'([a-z-]+)'", body)) == set(FINISHED)


CASES = list(
    itertools.product(
        ("dispatched", "sending"),
        (None, *UNSTARTED_PHASES, *PHASES),
        (0, 1, 3),  # attempts counted so far (max-attempts 3)
        (0, 2),  # earlier attempts given back
    )
)


@pytest.mark.parametrize("ambiguous_policy", ["retry", "hold"])
def test_reap_expired_decides_as_the_policy_does(db, ambiguous_policy):
    settings = Settings(max_attempts=3, ambiguous_policy=ambiguous_policy)
    rows = {}
    for was, phase, attempts, refunds in CASES:
        if was == "dispatched" and phase is not None:
            continue
        msg_id = db.execute(
            "INSERT INTO outbox.message (from_addr, to_addrs, text_body, status, phase, attempts,"
            " lease_token, lease_expires_at) VALUES ('a@example.com', '{b@example.org}', 't', %s, %s, %s,"
            " gen_random_uuid(), now() - interval '1 minute') RETURNING id",
            [was, phase, attempts],
        ).fetchone()[0]
        for n in range(refunds):
            db.execute(
                "INSERT INTO outbox.attempt (message_id, attempt, started_at, phase, outcome)"
                " VALUES (%s, %s, now(), 'claimed', 'lease-expired')",
                [msg_id, n + 1],
            )
        rows[msg_id] = (was, phase, attempts, refunds)
    db.execute(
        queries("worker")["reap_expired"],
        {"max_attempts": settings.max_attempts, "ambiguous_policy": settings.ambiguous_policy},
    )
    for msg_id, (was, phase, attempts, refunds) in rows.items():
        expected = after_lease_expired(
            was=was, phase=phase, attempts=attempts, earlier_refunds=refunds, settings=settings
        )
        status, left = db.execute(
            "SELECT status, attempts FROM outbox.message WHERE id = %s", [msg_id]
        ).fetchone()
        outcomes = db.execute(
            "SELECT outcome FROM outbox.attempt WHERE message_id = %s ORDER BY id OFFSET %s",
            [msg_id, refunds],
        ).fetchall()
        got = (status, left, outcomes[0][0] if outcomes else None)
        assert got == (expected.status, expected.attempts, expected.outcome), (was, phase, attempts, refunds)
