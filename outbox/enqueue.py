"""`enqueue`: write an email into the outbox on the caller's connection, inside the caller's
transaction. Nothing is committed here: a rolled-back transaction leaves no email."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, NamedTuple

import psycopg
from psycopg.types.json import Jsonb

from outbox.core.errors import ValidationError
from outbox.core.message import Attachment, Draft, draft_fields, prepare
from outbox.store.sql import queries

Q = queries("outbox.store")


def _params(draft: Draft) -> dict[str, Any]:
    params = draft_fields(draft)
    params["headers"] = Jsonb(params["headers"])
    return params


def _attachment_params(message_id: int, draft: Draft) -> list[dict[str, Any]]:
    return [
        {
            "message_id": message_id,
            "filename": a.filename,
            "content_type": a.content_type,
            "content": a.content,
        }
        for a in draft.attachments
    ]


class Enqueued(NamedTuple):
    """The row id, and whether a connector or an enabled gateway routes its From right now
    (a message without a route is written all the same, and fails at send time)."""

    id: int
    from_addr: str
    routable: bool


def _refused(draft: Draft, limit: int) -> ValidationError | None:
    """Why the insert wrote nothing: an error, or None for a repeated idempotency key."""
    if draft.size_bytes > limit and not draft.system_generated:
        return ValidationError(
            f"message is {draft.size_bytes} bytes, over the maximum email size of {limit} bytes"
        )
    return None


def _draft(conn_unmonitored: str | None, kwargs: dict[str, Any]) -> Draft:
    if kwargs.get("from_addr") is None:
        if not kwargs.get("system_generated"):
            raise ValidationError("from_addr is required (only system-generated mail may omit it)")
        if not conn_unmonitored:
            raise ValidationError("system mail without from_addr needs the unmonitored-address setting")
        kwargs["from_addr"] = conn_unmonitored
    return prepare(**kwargs)


def enqueue(
    conn: psycopg.Connection[Any],
    *,
    from_addr: str | None,
    to: list[str] | tuple[str, ...] | str = (),
    subject: str,
    text: str | None = None,
    html: str | None = None,
    attachments: list[Attachment] | tuple[Attachment, ...] = (),
    **options: Any,
) -> int:
    """Validate and insert one email on `conn` (never commits); return its row id.

    Options: cc, bcc, from_name, reply_to, headers, importance ('high'|'normal'|'low'),
    priority, system_generated, reference, idempotency_key, send_after (aware datetime).
    A repeated `idempotency_key` returns the existing row's id and writes nothing.
    `from_addr=None` with `system_generated=True` sends from the unmonitored address.
    Raises `outbox.ValidationError` before anything is written. Routing never refuses: a
    message whose From has no connector and no enabled gateway is written, and ends `failed`
    with the reason when the worker takes it (fix the route, then `outbox replay`).
    """
    email = dict(options, to=to, text=text, html=html, attachments=attachments)
    return enqueue_routed(conn, from_addr=from_addr, subject=subject, **email).id


def enqueue_routed(conn: psycopg.Connection[Any], **email: Any) -> Enqueued:
    """`enqueue`, also saying whether the message's From has a route right now."""
    steps = _statements(email)
    with conn.cursor() as cur:
        try:
            name, params = next(steps)
            while True:
                if isinstance(params, list):
                    cur.executemany(Q[name], params)
                    name, params = steps.send(None)
                else:
                    name, params = steps.send(cur.execute(Q[name], params).fetchone())
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


async def enqueue_async(
    conn: psycopg.AsyncConnection[Any], *, from_addr: str | None, subject: str, **email: Any
) -> int:
    """The async twin of `enqueue` (the same arguments), on a psycopg `AsyncConnection`."""
    steps = _statements(dict(email, from_addr=from_addr, subject=subject))
    async with conn.cursor() as cur:
        try:
            name, params = next(steps)
            while True:
                if isinstance(params, list):
                    await cur.executemany(Q[name], params)
                    name, params = steps.send(None)
                else:
                    await cur.execute(Q[name], params)
                    name, params = steps.send(await cur.fetchone())
        except StopIteration as done:
            return int(done.value.id)


# A statement to run: a query's name and its parameters (a list: one execution per item).
Statement = tuple[str, dict[str, Any] | list[dict[str, Any]] | None]


def _statements(email: dict[str, Any]) -> Generator[Statement, Any, Enqueued]:
    """What enqueueing runs, written once for both connection kinds: yields each statement
    and is sent back its first row (None after a list)."""
    unmonitored = None
    if email.get("from_addr") is None:
        row = yield "unmonitored_address", None
        unmonitored = row[0] if row else None
    draft = _draft(unmonitored, email)
    params = _params(draft)
    new_id, limit, routable = yield "insert_message", params
    if new_id is None:
        if error := _refused(draft, limit):
            raise error
        existing = yield "message_by_idempotency_key", params
        return Enqueued(int(existing[0]), draft.from_addr, routable)
    if draft.attachments:
        yield "insert_attachment", _attachment_params(new_id, draft)
    return Enqueued(int(new_id), draft.from_addr, routable)
