"""The Outbox and Sent Items lists: filters from the URL, keyset pagination on id, counts per
status capped so that a big table is never counted whole."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from outbox.admin import operations
from outbox.core.errors import ValidationError
from outbox.store.sql import queries

Q = queries("outbox.web")
PAGE_SIZE = 50
COUNT_CAP = 10_000


@dataclass(frozen=True)
class Listing:
    """One of the two lists: which view, its statuses (with labels) and columns."""

    name: str
    path: str
    view: str
    statuses: tuple[tuple[str, str], ...]
    time_column: str
    columns: tuple[str, ...]
    counts_query: str


OUTBOX = Listing(
    name="Outbox",
    path="/",
    view="outbox_view",
    statuses=(
        ("failed", "Failed"),
        ("retry", "Pending Retry"),
        ("queued", "Scheduled"),
        ("held", "Connector Disabled"),
    ),
    time_column="created_at",
    columns=(
        "id",
        "status",
        "state",
        "from_addr",
        "to_list",
        "subject",
        "connector",
        "attempts",
        "last_failure",
        "created_at",
        "next_attempt_at",
    ),
    counts_query="outbox_counts",
)
SENT = Listing(
    name="Sent Items",
    path="/sent",
    view="sent_items",
    statuses=(("sent", "Sent"), ("partial", "Partly refused")),
    time_column="sent_at",
    columns=(
        "id",
        "status",
        "from_addr",
        "to_list",
        "subject",
        "connector",
        "attempts",
        "replays",
        "last_error",
        "created_at",
        "sent_at",
    ),
    counts_query="sent_counts",
)
LISTINGS = {"outbox": OUTBOX, "sent": SENT}


@dataclass(frozen=True)
class Filter:
    """What the operator typed in the filter form (strings, as in the URL)."""

    status: str = ""
    connector: str = ""
    from_addr: str = ""
    recipient: str = ""
    subject: str = ""
    since: str = ""
    until: str = ""

    @classmethod
    def from_form(cls, form: Mapping[str, Any]) -> Filter:
        return cls(**{k: str(form.get(k) or "").strip() for k in cls.__dataclass_fields__})

    @property
    def given(self) -> dict[str, str]:
        return {k: v for k, v in asdict(self).items() if v}

    def query(self, **extra: Any) -> str:
        """The URL query string of this filter (plus `extra`), for links and forms."""
        return urlencode(self.given | {k: v for k, v in extra.items() if v not in (None, "")})

    def params(self, listing: Listing) -> dict[str, Any]:
        """SQL parameters; a bad value is a ValidationError naming the field."""
        if self.status and self.status not in dict(listing.statuses):
            raise ValidationError(f"status must be one of {', '.join(dict(listing.statuses))}")
        return {
            "status": self.status or None,
            "connector": self.connector or None,
            "from_addr": self.from_addr or None,
            "recipient": self.recipient or None,
            "subject": self.subject or None,
            "since": _time(self.since, "from"),
            "until": _time(self.until, "until"),
        }

    def without(self, key: str) -> Filter:
        return replace(self, **{key: ""})


def _time(value: str, what: str) -> datetime | None:
    """An ISO 8601 time (UTC when it has no offset, as a browser's datetime-local sends it) or
    an age like 2h / 3d."""
    if not value:
        return None
    try:
        return operations.parse_time(value, what)
    except ValidationError:
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            raise ValidationError(
                f"{what} {value!r} is neither a time like 2026-12-01T09:00 nor an age like 2h"
            ) from None
        return when.replace(tzinfo=UTC) if when.tzinfo is None else when


def _statement(listing: Listing, flt: Filter, columns: sql.Composable, direction: str) -> sql.Composed:
    # The Outbox is a small part of a big table: with a filter that may match few of its rows
    # (anything but the status, or the scheduled ones), it is read through its partial
    # indexes and sorted, instead of walking every message newest first until enough match.
    narrow = listing is OUTBOX and (flt.status == "queued" or any(k != "status" for k in flt.given))
    return sql.SQL(Q["list_messages"]).format(
        columns=columns,
        view=sql.Identifier("outbox", listing.view),
        time_column=sql.Identifier(listing.time_column),
        order=sql.SQL("v.id + 0" if narrow else "v.id"),
        direction=sql.SQL(direction),
    )


@dataclass
class Page:
    rows: list[dict[str, Any]]
    newer: int | None  # `after` for the page of newer rows, if any
    older: int | None  # `before` for the page of older rows, if any


def page(
    conn: psycopg.Connection[Any],
    listing: Listing,
    flt: Filter,
    *,
    before: int | None = None,
    after: int | None = None,
    size: int = PAGE_SIZE,
) -> Page:
    """One page, newest first: the rows older than `before`, or newer than `after`."""
    columns = sql.SQL(", ").join(sql.SQL("v.") + sql.Identifier(c) for c in listing.columns)
    params = flt.params(listing) | {"before": before, "after": after, "max_id": None, "limit": size + 1}
    direction = "ASC" if after is not None and before is None else "DESC"
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(_statement(listing, flt, columns, direction), params).fetchall()
    more = len(rows) > size
    rows = rows[:size]
    if direction == "ASC":
        rows.reverse()
        newer, older = (rows[0]["id"] if more else None), (rows[-1]["id"] if rows else None)
    else:
        older = rows[-1]["id"] if more else None
        newer = rows[0]["id"] if rows and (before is not None or after is not None) else None
    return Page(rows, newer, older)


def matching_ids(
    conn: psycopg.Connection[Any], listing: Listing, flt: Filter, *, max_id: int | None
) -> list[int]:
    """Every id the filter matches now, up to `max_id` (newest first)."""
    params = flt.params(listing) | {"before": None, "after": None, "max_id": max_id, "limit": None}
    rows = conn.execute(_statement(listing, flt, sql.SQL("v.id"), "DESC"), params).fetchall()
    return [int(r[0]) for r in rows]


def counts(conn: psycopg.Connection[Any], listing: Listing) -> list[dict[str, Any]]:
    """Per status of the list: status, label, n (at most COUNT_CAP + 1), capped (bool)."""
    found = dict(conn.execute(Q[listing.counts_query], {"cap": COUNT_CAP + 1}).fetchall())
    return [
        {
            "status": s,
            "label": label,
            "n": min(found.get(s, 0), COUNT_CAP),
            "capped": found.get(s, 0) > COUNT_CAP,
        }
        for s, label in listing.statuses
    ]
