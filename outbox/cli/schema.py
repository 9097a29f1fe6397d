"""outbox db init."""

from __future__ import annotations

from typing import Any

import click
import psycopg

from outbox.cli.base import (
    cli,
    with_conn,
)
from outbox.sql import schema_sql

# -- db --------------------------------------------------------------------------------------


@cli.group()
def db() -> None:
    """Database schema."""


@db.command("init")
@with_conn
def db_init(conn: psycopg.Connection[Any]) -> None:
    """Apply schema.sql (safe to run again)."""
    with conn.transaction():
        conn.execute(schema_sql())  # type: ignore[arg-type]
    click.echo("schema outbox is up to date")
