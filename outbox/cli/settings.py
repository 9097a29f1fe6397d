"""outbox settings ...."""

from __future__ import annotations

from typing import Any

import click
import psycopg

from outbox import connectors
from outbox import settings as runtime_settings
from outbox.cli.base import (
    cli,
    emit,
    json_option,
    with_conn,
)

# -- settings ------------------------------------------------------------------------------


@cli.group()
def settings() -> None:
    """Instance-wide settings (retry policy, lease, limits, Enate outgoing-mail settings)."""


@settings.command("set")
@click.argument("key", metavar="KEY", type=click.Choice(runtime_settings.KEYS))
@click.argument("value")
@with_conn
def settings_set(conn: psycopg.Connection[Any], key: str, value: str) -> None:
    """Set KEY to VALUE (lists are comma-separated; an empty value clears)."""
    with conn.transaction():
        if key == "unmonitored-address":
            connectors.check_unmonitored(conn, runtime_settings.parse_value(key, value))
        runtime_settings.set_value(conn, key, value)
    click.echo(f"{key} = {value}")


@settings.command("show")
@json_option
@with_conn
def settings_show(conn: psycopg.Connection[Any], as_json: bool) -> None:
    """Show every setting."""
    data = {k.replace("_", "-"): v for k, v in runtime_settings.load(conn).model_dump().items()}
    emit(
        data,
        as_json,
        lambda d: "\n".join(
            f"{k:<22} {','.join(v) if isinstance(v, list) else ('' if v is None else v)}"
            for k, v in d.items()
        ),
    )
