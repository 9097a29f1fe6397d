"""A Hypothesis state machine over the real SQL that moves a row: poller claims, worker
claims (with fresh, duplicate or stale tokens), outcomes written with live or stale leases,
leases expiring and being reaped. Invariants: a row is `sent` only after a 250 written under
its live lease; at most one live lease; attempts only grow; stale tokens change nothing."""

from __future__ import annotations

from typing import Any

import psycopg
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test
from psycopg.rows import dict_row

from outbox.store.sql import queries
from worker.outcomes import finish_params

Q = queries("worker")
OUTCOMES = {
    # outcome -> (status written, smtp code)
    "sent": ("sent", 250),
    "retry": ("retry", 451),
    "failed": ("failed", 550),
    "partial": ("partial", 250),
    "held": ("held", None),
}


def make_machine(database_url: str) -> type[RuleBasedStateMachine]:
    class RowLifecycle(RuleBasedStateMachine):
        @initialize()
        def new_row(self) -> None:
            self.conn = psycopg.connect(database_url, autocommit=True, row_factory=dict_row)
            self.conn.execute("DELETE FROM outbox.message")
            self.id = self.conn.execute(
                "INSERT INTO outbox.message (from_addr, to_addrs, subject, text_body) "
                "VALUES ('a@example.com', '{b@example.org}', 's', 't') RETURNING id"
            ).fetchone()["id"]
            self.tokens: list[str] = []  # every token ever handed out (dispatch or send)
            self.max_attempts_seen = 0
            self.written_250_live = False

        def row(self) -> dict[str, Any]:
            r = self.conn.execute("SELECT * FROM outbox.message WHERE id = %s", [self.id]).fetchone()
            assert r is not None
            return r

        @rule()
        def poller_claims(self) -> None:
            self.conn.execute(
                "UPDATE outbox.message SET next_attempt_at = now() WHERE id = %s "
                "AND status IN ('queued', 'retry')",
                [self.id],
            )
            claimed = self.conn.execute(
                Q["claim_due"], {"limit": 10, "max_in_flight": 5000, "lease_seconds": 300}
            ).fetchall()
            self.tokens += [r["lease_token"] for r in claimed]

        @rule(which=st.integers(min_value=-3, max_value=-1))
        def worker_claims(self, which: int) -> None:
            if not self.tokens:
                return
            token = self.tokens[max(which, -len(self.tokens))]
            before = self.row()
            rows = self.conn.execute(
                Q["claim"], {"ids": [self.id], "tokens": [token], "lease_seconds": 300}
            ).fetchall()
            if rows:
                assert before["status"] == "dispatched" and str(before["lease_token"]) == token
                self.tokens.append(str(rows[0]["lease_token"]))
            else:
                after = self.row()
                assert (after["status"], after["attempts"], after["lease_token"]) == (
                    before["status"],
                    before["attempts"],
                    before["lease_token"],
                )

        @rule(outcome=st.sampled_from(sorted(OUTCOMES)), which=st.integers(min_value=-3, max_value=-1))
        def worker_finishes(self, outcome: str, which: int) -> None:
            if not self.tokens:
                return
            token = self.tokens[max(which, -len(self.tokens))]
            before = self.row()
            status, code = OUTCOMES[outcome]
            written = self.conn.execute(
                Q["finish_attempts"],
                finish_params(
                    [
                        {
                            "id": self.id,
                            "lease_token": token,
                            "status": status,
                            "refund": 0,
                            "next_attempt_at": None,
                            "connector_id": None,
                            "connector_name": "c",
                            "phase": "dot",
                            "outcome": outcome,
                            "last_error": None,
                            "smtp_code": code,
                            "smtp_reply": "x",
                            "failure": status != "sent",
                            "started_at": before["created_at"],
                            "r_addrs": ["b@example.org"],
                            "r_status": ["sent" if code == 250 else "failed"],
                            "r_codes": [code],
                            "r_replies": ["x"],
                        }
                    ]
                ),
            ).rowcount
            live = before["status"] == "sending" and str(before["lease_token"]) == token
            assert written == (1 if live else 0), (before, token)
            if written and status == "sent":
                self.written_250_live = True
            if not written:
                after = self.row()
                assert (after["status"], after["lease_token"]) == (before["status"], before["lease_token"])

        @rule()
        def lease_runs_out_and_poller_reaps(self) -> None:
            before = self.row()
            self.conn.execute(
                "UPDATE outbox.message SET lease_expires_at = now() - interval '1 second' "
                "WHERE id = %s AND status IN ('dispatched', 'sending')",
                [self.id],
            )
            self.conn.execute(Q["reap_expired"], {"max_attempts": 3, "ambiguous_policy": "retry"})
            after = self.row()
            if after["attempts"] < before["attempts"]:
                # a worker lost before it reported progress gives its attempt back, one
                assert before["status"] == "sending" and before["phase"] in ("claimed", "waiting")
                assert after["attempts"] == before["attempts"] - 1
                self.max_attempts_seen = after["attempts"]

        @invariant()
        def status_is_known_and_lease_matches(self) -> None:
            if not hasattr(self, "conn"):
                return
            r = self.row()
            assert r["status"] in (
                "queued",
                "dispatched",
                "sending",
                "retry",
                "held",
                "sent",
                "partial",
                "failed",
                "cancelled",
            )
            live = r["status"] in ("dispatched", "sending")
            assert (r["lease_token"] is not None) == live, r
            if r["status"] == "sent":
                assert self.written_250_live, "sent without a 250 written under a live lease"

        @invariant()
        def attempts_only_grow_but_for_refunds(self) -> None:
            if not hasattr(self, "conn"):
                return
            attempts = self.row()["attempts"]
            assert attempts >= self.max_attempts_seen
            self.max_attempts_seen = attempts

        def teardown(self) -> None:
            if hasattr(self, "conn"):
                self.conn.close()

    return RowLifecycle


def test_row_lifecycle_invariants(database_url):
    run_state_machine_as_test(
        make_machine(database_url),
        settings=settings(
            max_examples=60,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
