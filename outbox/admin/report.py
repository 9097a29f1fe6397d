"""What operators and scripts read: `outbox status` and `outbox show`."""

from __future__ import annotations

import base64
from typing import Any

import psycopg
from psycopg.rows import dict_row

from outbox.core.errors import NotFoundError
from outbox.core.statuses import STATUSES
from outbox.store.settings import load as load_settings
from outbox.store.sql import queries

Q = queries("outbox.store")


def status(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """Counts per status and per connector, the lag of the oldest due message, warnings."""
    with conn.cursor(row_factory=dict_row) as cur:
        counts = {s: 0 for s in STATUSES}
        counts.update({r["status"]: r["n"] for r in cur.execute(Q["status_counts"])})
        by_connector: dict[str, dict[str, int]] = {}
        for r in cur.execute(Q["status_by_connector"]):
            by_connector.setdefault(r["connector"] or "(not routed yet)", {})[r["status"]] = r["n"]
        lag = cur.execute(Q["queue_lag"]).fetchone() or {}
        last_hour = _last_hour(cur.execute(Q["attempts_last_hour"]).fetchall())
    settings = load_settings(conn)
    warnings = []
    if settings.overrides_active:
        warnings.append("test-environment override of To/CC/BCC is set: real recipients get no mail")
    return {
        "counts": counts,
        "by_connector": by_connector,
        "due_now": lag.get("due", 0),
        "lag_seconds": float(lag["lag_seconds"]) if lag.get("lag_seconds") is not None else 0.0,
        "last_hour": last_hour,
        "warnings": warnings,
    }


# Attempt outcomes over the last hour: `sent` counts deliveries (every recipient accepted);
# `failures` counts every other finished attempt (partial, failed, retry, ambiguous, lost
# lease). `held` is not an attempt (nothing was sent; no attempt was spent).
def _last_hour(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"sent": 0, "failures": 0, "by_outcome": {}, "by_connector": {}}
    for r in rows:
        if r["outcome"] == "held":
            continue
        kind = "sent" if r["outcome"] == "sent" else "failures"
        out[kind] += r["n"]
        out["by_outcome"][r["outcome"]] = out["by_outcome"].get(r["outcome"], 0) + r["n"]
        per = out["by_connector"].setdefault(r["connector"] or "(no connector)", {"sent": 0, "failures": 0})
        per[kind] += r["n"]
    return out


def render_status(data: dict[str, Any]) -> str:
    lines = [f"{s:<11} {n}" for s, n in data["counts"].items()]
    lines.append(f"due now     {data['due_now']} (oldest waiting {data['lag_seconds']:.1f}s)")
    hour = data.get("last_hour")
    if hour is not None:
        lines.append(f"last hour   {hour['sent']} sent, {hour['failures']} failures")
        for name, n in hour["by_connector"].items():
            lines.append(f"  {name}: {n['sent']} sent, {n['failures']} failures")
    if data["by_connector"]:
        lines.append("")
        lines.append("by connector:")
        for name, counts in data["by_connector"].items():
            lines.append(f"  {name}: " + ", ".join(f"{s} {n}" for s, n in counts.items()))
    for w in data["warnings"]:
        lines.append(f"WARNING: {w}")
    return "\n".join(lines)


def show(conn: psycopg.Connection[Any], message_id: int) -> dict[str, Any]:
    """A message with its recipients' results and its attempt timeline (bodies left out)."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(Q["message_by_id"], {"id": message_id}).fetchone()
        if row is None:
            raise NotFoundError(f"no message with id {message_id}")
        attempts = cur.execute(Q["attempts_of_message"], {"id": message_id}).fetchall()
        recipients = cur.execute(Q["recipients_of_message"], {"id": message_id}).fetchall()
    for key in ("text_body", "html_body", "lease_token"):
        row.pop(key, None)
    content = row.pop("content", None)
    row["content"] = row["content_base64"] = None  # the rendered MIME message, when stored
    if content is not None:
        try:
            row["content"] = bytes(content).decode("utf-8")
        except UnicodeDecodeError:
            row["content_base64"] = base64.b64encode(bytes(content)).decode("ascii")
    row["recipients"] = recipients
    row["attempts_history"] = attempts
    return row


def render_show(m: dict[str, Any]) -> str:
    when = "%Y-%m-%d %H:%M:%S%z"
    replayed = f"{m['replays']}x, last {m['replayed_at']:{when}}" if m.get("replays") else None
    fields = [  # (label, value): None leaves the line out
        ("Message-ID", f"{m['message_id']}"),
        ("From", m["from_addr"]),
        ("To", ", ".join(m["to_addrs"])),
        ("Cc", ", ".join(m["cc_addrs"]) or None),
        ("Bcc", ", ".join(m["bcc_addrs"]) or None),
        ("Subject", m["subject"]),
        ("Connector", m["connector_name"] or "-"),
        ("Created", f"{m['created_at']:{when}}"),
        ("Send after", f"{m['send_after']:{when}}" if m["send_after"] else None),
        ("Sent", f"{m['sent_at']:{when}}" if m["sent_at"] else None),
        ("Next try", f"{m['next_attempt_at']:{when}}" if m["status"] == "retry" else None),
        ("Last error", m["last_error"] or None),
        ("Replayed", replayed),
    ]
    lines = [f"message {m['id']}  {m['status']}  (attempts {m['attempts']})"]
    lines += [f"  {label:<10}  {value}" for label, value in fields if value is not None]
    if m["recipients"]:
        lines.append("recipients:")
        for r in m["recipients"]:
            reply = (
                f"{r['smtp_code']} {r['smtp_reply'] or ''}".strip()
                if r["smtp_code"]
                else (r["smtp_reply"] or "")
            )
            lines.append(f"  {r['addr']:<32} {r['status']:<9} {reply}")
    if m["attempts_history"]:
        lines.append("attempts:")
        for a in m["attempts_history"]:
            reply = (
                f"{a['smtp_code']} {a['smtp_reply'] or ''}".strip() if a["smtp_code"] else (a["error"] or "")
            )
            lines.append(
                f"  #{a['attempt']} {a['started_at']:%Y-%m-%d %H:%M:%S} "
                f"{a['connector_name'] or '-'} {a['outcome']} at {a['phase'] or '-'} "
                f"({a['duration_ms']} ms) {reply}".rstrip()
            )
    return "\n".join(lines)
