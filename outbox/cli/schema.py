"""outbox db migrate / status / init."""

from __future__ import annotations

import click
import psycopg

from outbox.cli.base import cli, db_option, emit, json_option
from outbox.store import migrate as migrations

# -- db --------------------------------------------------------------------------------------


@cli.group()
def db() -> None:
    """Database schema: versioned migrations (outbox/store/migrations/)."""


def _migrate(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        result = migrations.migrate(conn)
    click.echo(result.summary())


@db.command("migrate")
@db_option
def db_migrate(database_url: str) -> None:
    """Apply the pending migrations (on an empty database: create everything)."""
    _migrate(database_url)


@db.command("init")
@db_option
def db_init(database_url: str) -> None:
    """Same as `db migrate`: create the schema, or bring it up to date."""
    _migrate(database_url)


def _render(data: dict[str, object]) -> str:
    version = "none" if data["version"] is None else data["version"]
    lines = [f"schema version: {version} (this outbox-worker: {data['code_version']})"]
    if data["kind"] == "unversioned":
        lines.append("schema outbox was made before versioning")
    pending = data["pending"]
    assert isinstance(pending, list)
    if data["status"] == "newer":
        lines.append("the database is newer than this outbox-worker: upgrade outbox-worker")
    elif pending:
        lines.append("pending: " + ", ".join(f"{m['version']:04d}_{m['name']}" for m in pending))
        lines.append("run `outbox db migrate`")
    else:
        lines.append("up to date")
    return "\n".join(lines)


@db.command("status")
@db_option
@json_option
def db_status(database_url: str, as_json: bool) -> None:
    """The database's schema version and the migrations it still needs."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        now = migrations.state(conn)
    emit(now.as_dict(), as_json, _render)
