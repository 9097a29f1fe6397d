"""Reading and changing the instance-wide settings row (`outbox.settings`)."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql
from pydantic import ValidationError as PydanticError

from outbox.core.errors import ValidationError
from outbox.core.settings import Settings, parse_value
from outbox.store.sql import queries

Q = queries("outbox.store")


def load(conn: psycopg.Connection[Any]) -> Settings:
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        row = cur.execute(Q["settings"]).fetchone()
    return Settings.model_validate(row or {})


def set_value(conn: psycopg.Connection[Any], key: str, raw: str) -> Settings:
    """Validate one setting against the others and store it. Raises ValidationError."""
    field = key.replace("-", "_")
    value = parse_value(key, raw)
    current = load(conn)
    try:
        updated = Settings.model_validate(current.model_dump() | {field: value})
    except PydanticError as exc:
        first = exc.errors()[0]
        raise ValidationError(f"{key}: {first['msg']}") from None
    if updated.retry_max_seconds < updated.retry_base_seconds:
        raise ValidationError("retry-max-seconds must not be below retry-base-seconds")
    stmt = sql.SQL("UPDATE outbox.settings SET {} = %s, updated_at = now()").format(sql.Identifier(field))
    conn.execute(stmt, [getattr(updated, field)])
    return updated
