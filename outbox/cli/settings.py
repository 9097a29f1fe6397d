"""outbox settings ...."""

from __future__ import annotations

from typing import Any

import click
import psycopg

from outbox.admin import connectors
from outbox.cli.base import (
    cli,
    emit,
    json_option,
    with_conn,
)
from outbox.core.settings import KEYS, Settings, parse_value
from outbox.store import settings as stored_settings

# -- settings ------------------------------------------------------------------------------


@cli.group()
def settings() -> None:
    """Instance-wide settings (retry policy, lease, limits, Enate outgoing-mail settings)."""


def _keys_help() -> str:
    """The keys, what each means and its default, for `settings set --help`."""
    lines = ["\b", "KEY is one of:"]
    for name, field in Settings.model_fields.items():
        default = field.default if field.default not in (None, []) else "none"
        lines.append(f"  {name.replace('_', '-'):<26} {field.description} (default {default})")
    return "\n".join(lines)


@settings.command(
    "set",
    help="Set KEY to VALUE (lists are comma-separated; an empty value clears).\n\n" + _keys_help(),
)
@click.argument("key", metavar="KEY", type=click.Choice(KEYS))
@click.argument("value")
@with_conn
def settings_set(conn: psycopg.Connection[Any], key: str, value: str) -> None:
    with conn.transaction():
        if key == "unmonitored-address":
            connectors.check_unmonitored(conn, parse_value(key, value))
        stored_settings.set_value(conn, key, value)
    click.echo(f"{key} = {value}")


@settings.command("show")
@json_option
@with_conn
def settings_show(conn: psycopg.Connection[Any], as_json: bool) -> None:
    """Show every setting."""
    data = {k.replace("_", "-"): v for k, v in stored_settings.load(conn).model_dump().items()}
    emit(
        data,
        as_json,
        lambda d: "\n".join(
            f"{k:<22} {','.join(v) if isinstance(v, list) else ('' if v is None else v)}"
            for k, v in d.items()
        ),
    )
