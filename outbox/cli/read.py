"""outbox status / show."""

from __future__ import annotations

from typing import Any

import click
import psycopg

from outbox import report
from outbox.cli.base import (
    cli,
    emit,
    json_option,
    with_conn,
)

# -- reading -------------------------------------------------------------------------------


@cli.command("status")
@json_option
@with_conn
def status(conn: psycopg.Connection[Any], as_json: bool) -> None:
    """Counts per status and per connector, and the queue lag."""
    emit(report.status(conn), as_json, report.render_status)


@cli.command("show")
@click.argument("message_id", type=int)
@json_option
@with_conn
def show(conn: psycopg.Connection[Any], message_id: int, as_json: bool) -> None:
    """One message, its recipients' results and its attempts."""
    emit(report.show(conn, message_id), as_json, report.render_show)
