"""What a claimed row becomes before any server hears of it: the row checked as enqueue
would have checked it, its envelope recipients, and its content (built here when enqueue did
not render it). A row that cannot be made into an email raises `Unbuildable`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from outbox.core.errors import ValidationError
from outbox.core.message import Attachment, check_envelope, check_row, render_row
from outbox.core.settings import Settings


class Unbuildable(Exception):
    """A message whose row cannot be made into MIME (bad data written by SQL: anything
    `enqueue` would have refused, or what the MIME builder refuses): building it again gives
    the same error, so it fails at once with the reason, and no server hears of it."""


def checked(row: dict[str, Any], attachments: Sequence[Attachment]) -> dict[str, Any]:
    """The row as enqueue would have written it, or Unbuildable. A row the worker builds
    (inserted by SQL, or too large to keep its content) goes through enqueue's whole
    validator; one with content rendered at enqueue has its envelope checked again."""
    try:
        return check_envelope(row) if row["content"] is not None else check_row(row, attachments)
    except ValidationError as exc:
        raise Unbuildable(str(exc)) from exc


def envelope(row: Mapping[str, Any], settings: Settings) -> list[str]:
    """Envelope recipients: the message's own, or the test-environment overrides, plus the
    additional BCC. Case-insensitively unique, in order."""
    if settings.overrides_active:
        addrs = [*settings.override_to, *settings.override_cc, *settings.override_bcc]
    else:
        addrs = [*row["to_addrs"], *row["cc_addrs"], *row["bcc_addrs"]]
    addrs += settings.additional_bcc
    seen: dict[str, str] = {}
    for a in addrs:
        if isinstance(a, str):  # a SQL writer's NULL in an array is nobody (the row fails)
            seen.setdefault(a.lower(), a)
    return list(seen.values())


def content(row: Mapping[str, Any], attachments: Sequence[Attachment], settings: Settings) -> bytes:
    """The bytes to send: as rendered at enqueue, or built now for a row inserted by SQL or
    too large to keep its content; refused past the maximum email size as enqueue refuses it
    (system-generated mail, such as bounces, is exempt)."""
    data = row["content"]
    if data is None:
        try:
            data = render_row(row, attachments, date=row["created_at"])
        except Exception as exc:
            raise Unbuildable(f"{type(exc).__name__}: {exc}") from exc
    if len(data) > settings.max_message_bytes and not row["system_generated"]:
        raise Unbuildable(
            f"message is {len(data)} bytes, over the maximum email size of {settings.max_message_bytes} bytes"
        )
    return bytes(data)
