"""outbox web: the operators' web console."""

from __future__ import annotations

import click

from outbox.cli.base import cli, db_option, require_current_schema


@cli.command("web")
@click.option("--host", envvar="OUTBOX_WEB_HOST", show_envvar=True, default="127.0.0.1", show_default=True)
@click.option(
    "--port",
    envvar="OUTBOX_WEB_PORT",
    show_envvar=True,
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
)
@db_option
def web(host: str, port: int, database_url: str) -> None:
    """Serve the web console (the Outbox, Sent Items, messages, connectors, audit).

    Sessions are signed with $OUTBOX_WEB_SECRET; without it a random secret is made at start,
    so sessions end when the process restarts (and several processes need the same secret).
    Users come from `outbox user add`. Put it behind a TLS-terminating proxy for anything but
    localhost (forwarded headers are trusted from 127.0.0.1 only)."""
    from outbox.web.app import serve

    require_current_schema(database_url)
    serve(database_url, host=host, port=port)
