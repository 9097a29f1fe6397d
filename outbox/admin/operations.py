"""Operator actions: replay, cancel, send-now, prune and connector reset (audited in
`outbox.operator_audit`).

Each selective action runs in two steps so a human can look before anything changes:
`plan_*` reads what the selection matches (nothing is locked or written), then `apply`
changes only the planned rows that are *still* eligible, under row locks, in one short
transaction, and records who did it. A second identical run finds nothing left to change.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from outbox.admin import connectors
from outbox.core.errors import NotFoundError, ValidationError
from outbox.core.statuses import FINISHED, IN_FLIGHT, WAITING
from outbox.store.sql import queries

Q = queries("outbox.store")

# What replay takes without being told: the statuses that need a human.
REPLAY_DEFAULT = ("failed", "partial")
# `sent` needs --force; `cancelled` only when named (by id or --status cancelled).
REPLAYABLE = ("failed", "partial", "cancelled", "sent")
# Not sent yet. `dispatched` is safe to cancel (the worker claims a row only while it is
# still dispatched under its token); `sending` is not (the server may already have it).
CANCELLABLE = ("queued", "retry", "held", "failed", "dispatched")
# What a bare filter cancels: everything still to go out (failed ones only when named).
CANCEL_DEFAULT = ("queued", "retry", "held", "dispatched")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(value: str, what: str = "duration") -> timedelta:
    """`90d`, `12h`, `30m`, `45s`, `2w` -> timedelta (positive)."""
    match = _DURATION.match(value)
    if not match:
        raise ValidationError(f"{what} {value!r} must look like 90d, 12h, 30m, 45s or 2w")
    delta = timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
    if delta <= timedelta(0):
        raise ValidationError(f"{what} must be more than zero")
    return delta


def parse_time(value: str | None, what: str, now: datetime | None = None) -> datetime | None:
    """An ISO 8601 time with offset, or a duration meaning that long ago (`2h`)."""
    if value is None:
        return None
    if _DURATION.match(value):
        return (now or datetime.now(UTC)) - parse_duration(value, what)
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValidationError(
            f"{what} {value!r} is neither an ISO 8601 time nor a duration like 2h"
        ) from None
    if when.tzinfo is None:
        raise ValidationError(f"{what} needs a time zone offset, e.g. 2026-12-01T09:00:00+01:00")
    return when


@dataclass(frozen=True)
class Selection:
    """Which messages: explicit ids and/or a filter (all given parts must match)."""

    ids: tuple[int, ...] = ()
    statuses: tuple[str, ...] = ()
    connector: str | None = None
    from_addr: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    error_contains: str | None = None

    @property
    def has_filter(self) -> bool:
        return bool(
            self.statuses
            or self.connector
            or self.from_addr
            or self.since
            or self.until
            or self.error_contains
        )

    def describe(self) -> dict[str, Any]:
        """For the audit and JSON output: only what was given."""
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if value in (None, (), ""):
                continue
            out[key] = value.isoformat() if isinstance(value, datetime) else value
        for key in ("ids", "statuses"):
            if key in out:
                out[key] = list(out[key])
        return out


@dataclass
class Plan:
    """What an action would change (`rows`) and what it leaves alone, with why (`skipped`)."""

    action: str
    selection: Selection
    rows: list[dict[str, Any]]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    statuses: tuple[str, ...] = ()  # statuses still eligible when applying
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def ids(self) -> list[int]:
        return [r["id"] for r in self.rows]


@dataclass
class Applied:
    action: str
    dry_run: bool
    ids: list[int]
    skipped: list[dict[str, Any]]
    messages: list[dict[str, Any]]
    selection: dict[str, Any]
    audit_id: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.ids)

    def as_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "dry_run": self.dry_run,
            "count": self.count,
            "ids": self.ids,
            "skipped": self.skipped,
            "selection": self.selection,
            "audit_id": self.audit_id,
            "messages": self.messages,
            **self.detail,
        }


def _select(
    conn: psycopg.Connection[Any], sel: Selection, statuses: Sequence[str] | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows matching the selection, and (as skipped entries) requested ids that exist but do
    not match the rest of the filter. A requested id that does not exist is an error."""
    params = {
        "ids": list(sel.ids) or None,
        "statuses": list(statuses) if statuses else None,
        "connector": sel.connector,
        "from_addr": sel.from_addr,
        "since": sel.since,
        "until": sel.until,
        "error_contains": sel.error_contains,
    }
    unmatched: list[dict[str, Any]] = []
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        if sel.connector is not None:
            connectors.get(conn, sel.connector)  # a typo is an error, not "nothing matched"
        rows = cur.execute(Q["select_messages"], params).fetchall()
        if sel.ids:
            existing = {
                r["id"]: r["status"]
                for r in cur.execute(Q["existing_messages"], {"ids": list(sel.ids)}).fetchall()
            }
            missing = sorted(set(sel.ids) - set(existing))
            if missing:
                raise NotFoundError(f"no message with id {', '.join(map(str, missing))}")
            matched = {r["id"] for r in rows}
            unmatched = [
                {"id": i, "status": existing[i], "reason": f"{existing[i]}: does not match the filter"}
                for i in sorted(set(sel.ids) - matched)
            ]
    return rows, unmatched


def _require_selection(sel: Selection, action: str) -> None:
    if not sel.ids and not sel.has_filter:
        raise ValidationError(
            f"{action}: give message ids or a filter (--status, --connector, --from, --since, "
            f"--until, --error-contains)"
        )


def _why_not(status: str, action: str) -> str:
    if status in IN_FLIGHT:
        return f"{status}: being delivered right now"
    if status in WAITING:
        return f"{status}: not finished, already waiting to be sent"
    if action == "cancel" and status in FINISHED:
        return f"{status}: finished already"
    return f"{status}: not eligible"


def plan_replay(conn: psycopg.Connection[Any], sel: Selection, *, force: bool = False) -> Plan:
    """Finished messages to requeue. `sent` ones only with `force`; by id, anything not
    finished is skipped (a second identical replay is harmless)."""
    _require_selection(sel, "replay")
    for s in sel.statuses:
        if s not in REPLAYABLE:
            raise ValidationError(f"replay --status must be one of {', '.join(REPLAYABLE)}")
    if "sent" in sel.statuses and not force:
        raise ValidationError("replaying sent messages sends them again: add --force")
    allowed = sel.statuses or (REPLAYABLE if sel.ids else REPLAY_DEFAULT)
    if not force:
        allowed = tuple(s for s in allowed if s != "sent")
    rows, unmatched = _select(conn, sel, None if sel.ids else allowed)
    if not force:
        sent = [r["id"] for r in rows if r["status"] == "sent" and not sel.statuses]
        if sent:
            raise ValidationError(
                f"message {', '.join(map(str, sent))} was sent already; replaying sends it again: add --force"
            )
    plan = Plan("replay", sel, [], unmatched, statuses=allowed, options={"force": force})
    for r in rows:
        if r["status"] in allowed:
            plan.rows.append(r)
        else:
            plan.skipped.append(
                {"id": r["id"], "status": r["status"], "reason": _why_not(r["status"], "replay")}
            )
    return plan


def plan_cancel(conn: psycopg.Connection[Any], sel: Selection) -> Plan:
    """Messages not sent yet (scheduled, waiting, pending retry, held, failed, dispatched).
    A message being sent right now is skipped: the server may already have it."""
    _require_selection(sel, "cancel")
    for s in sel.statuses:
        if s not in CANCELLABLE:
            raise ValidationError(f"cancel --status must be one of {', '.join(CANCELLABLE)}")
    allowed = sel.statuses or (CANCELLABLE if sel.ids else CANCEL_DEFAULT)
    rows, unmatched = _select(conn, sel, None if sel.ids else allowed)
    plan = Plan("cancel", sel, [], unmatched, statuses=allowed)
    for r in rows:
        if r["status"] in allowed:
            plan.rows.append(r)
        else:
            reason = (
                "sending: the server may already have it; cannot be cancelled safely"
                if r["status"] == "sending"
                else _why_not(r["status"], "cancel")
            )
            plan.skipped.append({"id": r["id"], "status": r["status"], "reason": reason})
    return plan


def plan_send_now(conn: psycopg.Connection[Any], ids: Iterable[int]) -> Plan:
    """Scheduled (or pending-retry) messages to make due at once."""
    sel = Selection(ids=tuple(ids))
    _require_selection(sel, "send-now")
    rows, _ = _select(conn, sel, None)
    plan = Plan("send-now", sel, [], statuses=("queued", "retry"))
    for r in rows:
        if r["status"] in ("queued", "retry"):
            plan.rows.append(r)
        else:
            reason = {
                "held": "held: its connector is disabled; enable it to release the message",
            }.get(r["status"])
            if reason is None and r["status"] in FINISHED:
                reason = f"{r['status']}: finished (replay sends a finished message again)"
            plan.skipped.append(
                {"id": r["id"], "status": r["status"], "reason": reason or _why_not(r["status"], "send-now")}
            )
    return plan


def backing_off(conn: psycopg.Connection[Any], plan: Plan) -> list[dict[str, Any]]:
    """The connectors of a plan's messages that are backing off now: their mail waits for
    the backoff (or `outbox connector reset`) whatever the message's own schedule says."""
    names = sorted({r["connector"] for r in plan.rows if r.get("connector")})
    if not names:
        return []
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(Q["connectors_backing_off"], {"names": names}).fetchall()


_APPLY = {"replay": "replay_messages", "cancel": "cancel_messages", "send-now": "send_now"}


def apply(
    conn: psycopg.Connection[Any], plan: Plan, *, actor: str | None = None, dry_run: bool = False
) -> Applied:
    """Carry out a plan: only its rows still eligible now change; audited; wakes the poller
    (replay, send-now). With `dry_run`, reports the plan and changes nothing."""
    selection = plan.selection.describe() | {k: v for k, v in plan.options.items() if v}
    result = Applied(plan.action, dry_run, [], list(plan.skipped), [], selection)
    if dry_run:
        result.ids = plan.ids
        result.messages = plan.rows
        return result
    if not plan.rows:
        return result
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        changed = cur.execute(
            Q[_APPLY[plan.action]], {"ids": plan.ids, "statuses": list(plan.statuses)}
        ).fetchall()
        by_id = {c["id"]: c for c in changed}
        result.ids = [i for i in plan.ids if i in by_id]
        result.messages = [r | {"was": by_id[r["id"]]["was"]} for r in plan.rows if r["id"] in by_id]
        for r in plan.rows:  # changed by someone else between plan and apply
            if r["id"] not in by_id:
                result.skipped.append(
                    {"id": r["id"], "status": r["status"], "reason": "changed meanwhile; left alone"}
                )
        if not result.ids:
            return result
        detail: dict[str, Any] = {"from_status": _tally(c["was"] for c in changed)}
        if plan.action == "replay":
            detail["recipients_reset"] = sum(int(c["recipients_reset"]) for c in changed)
        if plan.action == "send-now":
            detail["send_after_was"] = {
                str(c["id"]): c["was_send_after"].isoformat() for c in changed if c["was_send_after"]
            }
        if plan.action in ("replay", "send-now"):
            cur.execute(Q["wake_pollers"])
        result.audit_id = _audit(cur, plan.action, actor, selection, result.ids, detail)
        result.detail = {"from_status": detail["from_status"]}
    return result


def _tally(values: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def _audit(
    cur: psycopg.Cursor[dict[str, Any]],
    action: str,
    actor: str | None,
    selection: dict[str, Any],
    ids: list[int] | None,
    detail: dict[str, Any],
    count: int | None = None,
) -> int:
    row = cur.execute(
        Q["insert_operator_audit"],
        {
            "action": action,
            "actor": actor or connectors.default_actor(),
            "selection": Jsonb(selection),
            "count": len(ids) if count is None and ids is not None else (count or 0),
            "message_ids": ids,
            "detail": Jsonb(detail),
        },
    ).fetchone()
    assert row is not None
    return int(row["id"])


def replay(
    conn: psycopg.Connection[Any],
    sel: Selection,
    *,
    force: bool = False,
    actor: str | None = None,
    dry_run: bool = False,
) -> Applied:
    """Requeue finished messages (same Message-ID, fresh retries, history kept, audited)."""
    return apply(conn, plan_replay(conn, sel, force=force), actor=actor, dry_run=dry_run)


def cancel(
    conn: psycopg.Connection[Any], sel: Selection, *, actor: str | None = None, dry_run: bool = False
) -> Applied:
    """Cancel messages not sent yet (audited)."""
    return apply(conn, plan_cancel(conn, sel), actor=actor, dry_run=dry_run)


def send_now(
    conn: psycopg.Connection[Any], ids: Iterable[int], *, actor: str | None = None, dry_run: bool = False
) -> Applied:
    """Make scheduled messages due at once and wake the poller (audited)."""
    return apply(conn, plan_send_now(conn, ids), actor=actor, dry_run=dry_run)


def reset_connector(conn: psycopg.Connection[Any], name: str, *, actor: str | None = None) -> dict[str, Any]:
    """`outbox connector reset NAME`: end the connector's backoff now (see
    `connectors.reset_backoff`) and its slow-down after throttling replies (`end_slowdown`),
    and audit it with the messages it made due, in one transaction. A healthy connector with
    nothing waiting changes nothing and is not audited. `reset`: anything changed."""
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        done = connectors.reset_backoff(conn, name, by="reset", actor=actor)
        slowdown = connectors.end_slowdown(conn, name, by="reset", actor=actor)
        out = {
            "action": "connector-reset",
            **done.as_dict(),
            "backoff_reset": done.reset,
            "slowdown_ended": slowdown,
            "audit_id": None,
        }
        if done.reset or slowdown is not None:
            out["reset"] = True
            out["audit_id"] = _audit(
                cur,
                "connector-reset",
                actor,
                {"connector": name},
                list(done.released),
                {"connector": name, "was": out["was"], "slowdown_ended": slowdown},
            )
    return out


@dataclass
class PruneResult:
    dry_run: bool
    older_than: str
    cutoff: datetime
    messages: int = 0
    attempts: int = 0
    recipients: int = 0
    attachments: int = 0
    batches: int = 0
    audit_id: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"action": "prune", "cutoff": self.cutoff.isoformat()}


def prune(
    conn: psycopg.Connection[Any],
    older_than: str,
    *,
    batch_size: int = 1000,
    actor: str | None = None,
    dry_run: bool = False,
) -> PruneResult:
    """Delete finished messages (sent, partial, failed, cancelled) last changed longer than
    `older_than` ago, with their attempts, recipient results and attachments, in batches of
    `batch_size`, each its own short transaction."""
    if batch_size < 1:
        raise ValidationError("batch size must be at least 1")
    age = parse_duration(older_than, "--older-than")
    with conn.transaction():
        row = conn.execute(Q["db_now"]).fetchone()
    assert row is not None
    cutoff = row[0] - age
    result = PruneResult(dry_run, older_than, cutoff)
    keys = ("messages", "attempts", "recipients", "attachments")
    if dry_run:
        with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            counts = cur.execute(Q["prune_count"], {"cutoff": cutoff}).fetchone() or {}
        for k in keys:
            setattr(result, k, int(counts.get(k, 0)))
        return result
    while True:
        with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            counts = cur.execute(Q["prune_batch"], {"cutoff": cutoff, "batch": batch_size}).fetchone() or {}
        for k in keys:
            setattr(result, k, getattr(result, k) + int(counts.get(k, 0)))
        if not counts.get("messages"):
            break
        result.batches += 1
        if counts["messages"] < batch_size:
            break
    if result.messages:
        with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            result.audit_id = _audit(
                cur,
                "prune",
                actor,
                {"older_than": older_than, "cutoff": cutoff.isoformat(), "batch_size": batch_size},
                None,
                {k: getattr(result, k) for k in keys} | {"batches": result.batches},
                count=result.messages,
            )
    return result
