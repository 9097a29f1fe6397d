"""Shared pieces of the CLI: the root group, common options, output helpers."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from datetime import date, datetime, timedelta
from datetime import time as dt_time
from functools import wraps
from typing import Any

import click
import psycopg

from outbox import logs
from outbox.config import Config
from outbox.connections import check_database_url, check_redis_url

EXIT_ERROR, EXIT_USAGE, EXIT_UNAVAILABLE = 1, 2, 3


def _checked(check: Callable[[str], None]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback: a malformed value is a usage error (one line, exit 2), found before
    anything connects, so it is never mistaken for a service that cannot be reached."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is not None:
            try:
                check(value)
            except ValueError as exc:
                raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
        return value

    return callback


check_database_url_option = _checked(check_database_url)
check_redis_url_option = _checked(check_redis_url)


def config_option(flag: str, field: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A flag for the setting `Config.<field>`: read from OUTBOX_<FIELD> when not given, its
    default the configuration's (both shown in --help)."""
    default = Config.model_fields[field].default
    return click.option(
        flag,
        field,
        envvar=f"OUTBOX_{field.upper()}",
        show_envvar=True,
        default=default,
        show_default=default is not None,
        **kwargs,
    )


def db_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return config_option(
        "--database-url", "database_url", callback=check_database_url_option, help="Postgres connection URL."
    )(f)


def json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(f)


def with_conn(f: Callable[..., Any]) -> Callable[..., Any]:
    """Give the command an open connection (`conn`) from --database-url; commit on success."""

    @db_option
    @wraps(f)
    def wrapper(database_url: str, **kwargs: Any) -> Any:
        with psycopg.connect(database_url) as conn:
            return f(conn=conn, **kwargs)

    return wrapper


def _json_value(value: Any) -> Any:
    """What `--json` prints for values JSON has no type for: ISO 8601 timestamps (with `T`),
    durations in seconds, bytes as UTF-8 text (callers give undecodable bytes as base64 with a
    field saying so, see `report.show`)."""
    if isinstance(value, datetime | date | dt_time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    return str(value)  # UUID, Decimal, IP addresses


def emit(data: Any, as_json: bool, render: Callable[[Any], str]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=_json_value))
    else:
        click.echo(render(data))


def table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    *,
    width: int | None = None,
    shrink: Sequence[tuple[str, int]] = (),
) -> str:
    """A plain aligned table for terminals. With `width`, the `shrink` columns (first named,
    first cut, each to no less than its minimum) are clipped with "…" until a line fits."""
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    if width is not None:
        for name, least in shrink:
            i = columns.index(name)
            excess = sum(widths) + 2 * (len(columns) - 1) - width
            if excess <= 0:
                break
            widths[i] = max(least, len(name), widths[i] - excess)
            cells = [[*row[:i], clip(row[i], widths[i]), *row[i + 1 :]] for row in cells]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def clip(text: str, width: int) -> str:
    """At most `width` characters, the last an ellipsis when cut."""
    return text if len(text) <= width else text[: width - 1] + "…"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="outbox-worker")
@config_option("--log-level", "log_level", type=click.Choice(["debug", "info", "warning", "error"]))
@config_option("--log-format", "log_format", type=click.Choice(["console", "json"]))
@click.option(
    "--database-url",
    "group_database_url",
    metavar="URL",
    callback=check_database_url_option,
    help="Postgres connection URL for the command that follows (same as its own --database-url).",
)
def cli(log_level: str, log_format: str, group_database_url: str | None) -> None:
    """outbox-worker: a durable Postgres outbox for outbound email."""
    logs.configure(level=log_level, fmt=log_format)
    if group_database_url:
        # `outbox --database-url URL status` as well as `outbox status --database-url URL`
        os.environ["OUTBOX_DATABASE_URL"] = group_database_url


def require_current_schema(database_url: str) -> None:
    """Refuse to start a long-running process on a schema that needs migrating or is newer than
    this code (one line, exit 1). An unreachable database is left to the process, which keeps
    retrying it; the check is made when it starts while Postgres is up."""
    from outbox.store import migrate

    try:
        conn = psycopg.connect(database_url, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError:
        return
    with conn:
        migrate.check(conn)
