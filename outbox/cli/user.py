"""outbox user add / list / remove / passwd: the web console's users."""

from __future__ import annotations

import sys
from typing import Any

import click
import psycopg

from outbox.cli.base import cli, emit, json_option, table, with_conn
from outbox.core.errors import ValidationError
from outbox.web import users


@cli.group("user")
def user() -> None:
    """Users of the web console (`outbox web`) and their roles."""


def _read_password() -> str:
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise ValidationError("--password-stdin read an empty password")
    return password


def _require_stdin(password_stdin: bool) -> None:
    if not password_stdin:
        raise click.UsageError("give the password on stdin with --password-stdin (never as an argument)")


@user.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(users.ROLES), required=True, help="What the user may do.")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin (required).")
@with_conn
def user_add(conn: psycopg.Connection[Any], name: str, role: str, password_stdin: bool) -> None:
    """Create a user: viewer (reads), operator (also replays, cancels, sends now, tests and
    resets connectors) or admin (also enables and disables connectors)."""
    _require_stdin(password_stdin)
    users.check_name(name)
    users.add(conn, name, role, _read_password())
    click.echo(f"user {name} added ({role})")


@user.command("list")
@json_option
@with_conn
def user_list(conn: psycopg.Connection[Any], as_json: bool) -> None:
    """List users and their roles (never a password or its hash)."""
    rows = [users.describe(r) for r in users.list_all(conn)]
    emit(
        rows,
        as_json,
        lambda rs: table(rs, ["name", "role", "created_at", "updated_at"]) if rs else "no users",
    )


@user.command("remove")
@click.argument("name")
@with_conn
def user_remove(conn: psycopg.Connection[Any], name: str) -> None:
    """Delete a user; their open sessions end at once."""
    users.remove(conn, name)
    click.echo(f"user {name} removed")


@user.command("passwd")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the new password from stdin (required).")
@with_conn
def user_passwd(conn: psycopg.Connection[Any], name: str, password_stdin: bool) -> None:
    """Set a user's password; their open sessions end at once."""
    _require_stdin(password_stdin)
    users.passwd(conn, name, _read_password())
    click.echo(f"password of {name} changed")
