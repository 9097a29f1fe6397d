"""outbox send."""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import click
import psycopg

from outbox.cli.base import (
    cli,
    with_conn,
)
from outbox.core.errors import ValidationError
from outbox.core.message import Attachment
from outbox.enqueue import enqueue_routed

# -- sending -------------------------------------------------------------------------------


def _parse_when(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValidationError(f"--send-at {value!r} is not an ISO 8601 time") from None
    if when.tzinfo is None:
        raise ValidationError("--send-at needs a time zone offset, e.g. 2026-12-01T09:00:00+01:00")
    return when


def _parse_headers(values: Iterable[str]) -> dict[str, str]:
    headers = {}
    for h in values:
        name, sep, value = h.partition(":")
        if not sep:
            raise ValidationError(f"--header {h!r} must look like 'Name: value'")
        headers[name.strip()] = value.strip()
    return headers


# `outbox.enqueue`'s argument names as `send`'s flags, for its error messages.
_FLAGS = {
    "from": "--from",
    "from_name": "--from-name",
    "to": "--to",
    "cc": "--cc",
    "bcc": "--bcc",
    "reply_to": "--reply-to",
    "subject": "--subject",
    "importance": "--importance",
    "idempotency_key": "--idempotency-key",
    "reference": "--reference",
    "send_after": "--send-at",
}
_NAMED = re.compile(
    r"\b(" + "|".join(sorted(_FLAGS, key=len, reverse=True)) + r")\b(?=[:=;,)]| must| is| or| looks)"
)


def _as_flags(message: str) -> str:
    """Name what the user typed: `to: invalid address …` becomes `--to: invalid address …`."""
    return _NAMED.sub(lambda m: _FLAGS[m.group(1)], message).replace("--importance=", "--importance")


@cli.command("send")
@click.option("--from", "from_addr", help="From address (omit with --system for the unmonitored address).")
@click.option("--from-name", help="Display name of the sender.")
@click.option("--to", multiple=True, help="Recipient; repeat.")
@click.option("--cc", multiple=True, help="Cc recipient; repeat.")
@click.option("--bcc", multiple=True, help="Bcc recipient (never in the headers); repeat.")
@click.option("--reply-to")
@click.option("--subject", required=True)
@click.option("--text", help="Plain-text body.")
@click.option("--html", help="HTML body.")
@click.option(
    "--attach",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="File to attach; repeat.",
)
@click.option("--header", "headers", multiple=True, help="Extra header 'X-Name: value'; repeat.")
@click.option("--send-at", help="Send at this ISO 8601 time (with offset).")
@click.option(
    "--importance",
    type=click.Choice(["high", "normal", "low"]),
    default="normal",
    show_default=True,
)
@click.option("--idempotency-key", help="A repeat with the same key inserts nothing.")
@click.option("--reference", help="Your reference (e.g. a case number).")
@click.option("--system", "system_generated", is_flag=True, help="System-generated mail.")
@with_conn
def send(
    conn: psycopg.Connection[Any],
    attach: tuple[str, ...],
    headers: tuple[str, ...],
    send_at: str | None,
    to: tuple[str, ...],
    cc: tuple[str, ...],
    bcc: tuple[str, ...],
    **fields: Any,
) -> None:
    """Enqueue one message; print its id."""
    if fields["text"] is None and fields["html"] is None:
        raise ValidationError("give --text or --html")
    try:
        new = enqueue_routed(
            conn,
            to=list(to),
            cc=list(cc),
            bcc=list(bcc),
            attachments=[Attachment.from_path(p) for p in attach],
            headers=_parse_headers(headers),
            send_after=_parse_when(send_at),
            **fields,
        )
    except ValidationError as exc:
        raise ValidationError(_as_flags(str(exc))) from None
    conn.commit()
    if not new.routable:
        click.echo(
            f"warning: no connector or enabled gateway routes {new.from_addr} right now; the message "
            f"will fail unless one is added: `outbox connector add NAME --address {new.from_addr} …` "
            f"or an enabled System Default Gateway, then `outbox replay {new.id}`",
            err=True,
        )
    click.echo(new.id)
