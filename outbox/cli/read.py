"""outbox status / show."""

from __future__ import annotations

import time
from typing import Any

import click
import psycopg

from outbox.admin import report
from outbox.cli.base import (
    cli,
    emit,
    json_option,
    with_conn,
)

# -- reading -------------------------------------------------------------------------------


@cli.command("status")
@json_option
@click.option(
    "--watch",
    type=click.FloatRange(min=0.1),
    is_flag=False,
    flag_value=2.0,
    default=None,
    metavar="[SECONDS]",
    help="Refresh every SECONDS (2 when no value is given) until interrupted.",
)
@with_conn
def status(conn: psycopg.Connection[Any], as_json: bool, watch: float | None) -> None:
    """Counts per status and per connector, the queue lag, sends and failures in the last hour."""
    if watch is None:
        emit(report.status(conn), as_json, report.render_status)
        return
    try:
        while True:
            data = report.status(conn)
            conn.rollback()  # a fresh now() and snapshot on every refresh
            if not as_json:
                click.clear()
                click.echo(f"outbox status, every {watch:g}s (Ctrl-C to stop)  {time.strftime('%H:%M:%S')}")
            emit(data, as_json, report.render_status)
            time.sleep(watch)
    except KeyboardInterrupt:
        return


@cli.command("show")
@click.argument("message_id", type=int)
@json_option
@with_conn
def show(conn: psycopg.Connection[Any], message_id: int, as_json: bool) -> None:
    """One message, its recipients' results and its attempts."""
    emit(report.show(conn, message_id), as_json, report.render_show)
