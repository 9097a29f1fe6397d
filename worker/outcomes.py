"""One attempt's result as `finish_attempts` takes it: the message's new state and one
entry per recipient (`Result.params`), made from a policy decision or from what happened
before any decision (no route, a row that cannot be built, a crash); and many results as the
statement's two JSON arrays (`finish_params`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from psycopg.types.json import Jsonb

from outbox.core.policy import Decision, Verdict, decide, unbuildable
from outbox.core.resolve import Connector, Route, resolve
from outbox.core.settings import Settings
from worker.prepare import envelope
from worker.transport import Outcome

if TYPE_CHECKING:
    from worker.claim import Batch


@dataclass
class Result:
    """One attempt's outcome, ready for `finish_attempts` (see finish_params)."""

    row: dict[str, Any]
    params: dict[str, Any]
    seconds: float = 0.0
    smtp_code: int | None = None


def after_send(
    row: dict[str, Any], connector: Connector, outcome: Outcome, decision: Decision, started: datetime
) -> Result:
    """The result of a conversation with the server (or of skipping one: backoff, nobody left)."""
    result = decided(row, connector, outcome.phase, decision, started, outcome.replies, outcome)
    result.seconds, result.smtp_code = outcome.seconds, outcome.code
    return result


def unrouted(row: dict[str, Any], route: Route, started: datetime) -> Result:
    """No connector sends it: held (a disabled connector spends no attempt) or failed."""
    held = route.action == "hold"
    return _result(
        row,
        {
            "status": "held" if held else "failed",
            "refund": 1 if held else 0,
            "next_attempt_at": None,
            "connector_id": route.connector.id if route.connector else None,
            "connector_name": route.connector.name if route.connector else None,
            "phase": None,
            "outcome": "held" if held else "failed",
            "last_error": route.reason,
            "smtp_code": None,
            "smtp_reply": None,
            "failure": not held,
            "started_at": started,
        },
        {},
    )


def not_built(row: dict[str, Any], settings: Settings, error: str, started: datetime) -> Result:
    """A row that cannot be made into an email fails for every recipient at once."""
    decision = unbuildable(envelope(row, settings), f"cannot build the message: {error}")
    return decided(row, None, "build", decision, started, {})


def crashed(row: dict[str, Any], batch: Batch, exc: Exception, started: datetime) -> Result:
    """A bug or a library error while handling this message: retried like a transient
    failure (so it runs out after max-attempts), with the error on the row."""
    settled = batch.settled.get(row["id"], {})
    recipients = [a for a in envelope(row, batch.settings) if a.lower() not in settled]
    decision = decide(
        verdicts=dict.fromkeys(recipients, Verdict.TRANSIENT),
        settled=settled,
        attempts=row["attempts"],
        created_at=row["round_started_at"],
        now=datetime.now(UTC),
        settings=batch.settings,
        summary=f"internal error: {type(exc).__name__}: {exc}"[:1000],
    )
    route = resolve(row["from_addr"], batch.connectors)
    return decided(row, route.connector, None, decision, started, {})


def refusal(outcome: Outcome, addr: str) -> str:
    """The server's words refusing one recipient for good (its reply, else the attempt's)."""
    code, reply = outcome.replies.get(addr, (None, None))
    return f"{code} {reply}" if code is not None else (reply or outcome.summary)


def decided(
    row: dict[str, Any],
    connector: Connector | None,
    phase: str | None,
    decision: Decision,
    started: datetime,
    replies: Mapping[str, tuple[int | None, str | None]],
    outcome: Outcome | None = None,
) -> Result:
    """A policy decision as a result; each recipient with its own reply, if it had one."""
    return _result(
        row,
        {
            "status": decision.status,
            "refund": 1 if decision.refund else 0,
            "next_attempt_at": decision.next_attempt_at,
            "connector_id": connector.id if connector else None,
            "connector_name": connector.name if connector else None,
            "phase": phase,
            "outcome": decision.outcome,
            "last_error": decision.last_error,
            "smtp_code": outcome.code if outcome else None,
            "smtp_reply": outcome.reply if outcome else None,
            "failure": decision.failure,
            "started_at": started,
        },
        {
            a: (s, *replies.get(a, (None, None if outcome else decision.last_error)))
            for a, s in decision.recipients.items()
        },
    )


def _result(
    row: dict[str, Any], params: dict[str, Any], recipients: Mapping[str, tuple[str, int | None, str | None]]
) -> Result:
    listed = [*row.get("to_addrs", ()), *row.get("cc_addrs", ()), *row.get("bcc_addrs", ())]
    params |= {
        "id": row["id"],
        "lease_token": row["lease_token"],
        # A success whose one envelope recipient is the message's one address: the row tells
        # that recipient's result (finish_attempts writes no recipient row for it).
        "implied_recipient": params["status"] == "sent" and list(recipients) == listed and len(listed) == 1,
        "r_addrs": list(recipients),
        "r_status": [r[0] for r in recipients.values()],
        "r_codes": [r[1] for r in recipients.values()],
        "r_replies": [r[2] for r in recipients.values()],
    }
    return Result(row, params)


def finish_params(outcomes: Sequence[Mapping[str, Any]]) -> dict[str, Jsonb]:
    """Outcomes (one Result.params each) as the two JSON arrays of `finish_attempts`: one
    statement for many messages instead of one per message. orjson writes datetimes as ISO
    8601 with their offset and UUIDs as text, as Postgres reads them; any other type raises."""
    recipients = [
        {"message_id": o["id"], "addr": addr, "status": status, "code": code, "reply": reply}
        for o in outcomes
        for addr, status, code, reply in zip(
            o["r_addrs"], o["r_status"], o["r_codes"], o["r_replies"], strict=True
        )
    ]
    return {
        "outcomes": Jsonb(list(outcomes), dumps=orjson.dumps),
        "recipients": Jsonb(recipients, dumps=orjson.dumps),
    }
