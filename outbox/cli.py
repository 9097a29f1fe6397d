"""The `outbox` command line. Errors are one line on stderr and a non-zero exit code."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from functools import wraps
from typing import Any

import click
import psycopg

from outbox import connectors, logs, report
from outbox import settings as runtime_settings
from outbox.config import Config
from outbox.enqueue import enqueue
from outbox.errors import OutboxError, ValidationError
from outbox.message import Attachment
from outbox.sql import schema_sql

EXIT_ERROR, EXIT_USAGE, EXIT_UNAVAILABLE = 1, 2, 3


def _db_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--database-url",
        envvar="OUTBOX_DATABASE_URL",
        show_envvar=True,
        default=Config.model_fields["database_url"].default,
        show_default=True,
        help="Postgres connection URL.",
    )(f)


def _json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(f)


def with_conn(f: Callable[..., Any]) -> Callable[..., Any]:
    """Give the command an open connection (`conn`) from --database-url; commit on success."""

    @_db_option
    @wraps(f)
    def wrapper(database_url: str, **kwargs: Any) -> Any:
        with psycopg.connect(database_url) as conn:
            return f(conn=conn, **kwargs)

    return wrapper


def emit(data: Any, as_json: bool, render: Callable[[Any], str]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        click.echo(render(data))


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain aligned table for terminals."""
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="outbox-worker")
@click.option(
    "--log-level",
    envvar="OUTBOX_LOG_LEVEL",
    show_envvar=True,
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@click.option(
    "--log-format",
    envvar="OUTBOX_LOG_FORMAT",
    show_envvar=True,
    default="console",
    show_default=True,
    type=click.Choice(["console", "json"]),
)
def cli(log_level: str, log_format: str) -> None:
    """outbox-worker: a durable Postgres outbox for outbound email."""
    logs.configure(level=log_level, fmt=log_format)


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


# -- connectors ----------------------------------------------------------------------------


@cli.group()
def connector() -> None:
    """SMTP connectors (Enate's Outgoing/Both connectors and the System Default Gateway)."""


@connector.command("add")
@click.argument("name")
@click.option("--address", required=True, help="Primary address (From) of the connector.")
@click.option("--alias", "aliases", multiple=True, help="More From addresses (routes); repeat.")
@click.option("--direction", type=click.Choice(connectors.DIRECTIONS), default="outgoing", show_default=True)
@click.option("--host", help="SMTP server host.")
@click.option("--port", type=int, help="SMTP server port (25, 587, 465, ...).")
@click.option(
    "--security",
    type=click.Choice(connectors.SECURITY_MODES),
    default="auto",
    show_default=True,
    help="auto: 465 implicit TLS, 587 STARTTLS, 25 STARTTLS when offered (required with credentials).",
)
@click.option("--username", help="SMTP AUTH user (for `both`: the incoming-mail login).")
@click.option(
    "--password-env",
    metavar="VAR",
    help="Name of the worker's environment variable holding the password.",
)
@click.option(
    "--password-stdin",
    is_flag=True,
    help="Read the password from stdin; stored encrypted with $OUTBOX_SECRET_KEY.",
)
@click.option("--ca-file", type=click.Path(dir_okay=False), help="CA bundle to verify the server.")
@click.option("--default-gateway", is_flag=True, help="Make it the System Default Gateway.")
@click.option("--disabled", is_flag=True, help="Register it disabled.")
@click.option("--max-connections", type=click.IntRange(1, 100), default=4, show_default=True)
@click.option(
    "--timeout",
    "timeout_seconds",
    type=click.FloatRange(min=0.1),
    default=60.0,
    show_default=True,
    help="SMTP timeout per command, seconds.",
)
@click.option("--actor", help="Who is making the change (default: the OS user).")
@with_conn
def connector_add(
    conn: psycopg.Connection[Any],
    name: str,
    aliases: tuple[str, ...],
    password_stdin: bool,
    disabled: bool,
    default_gateway: bool,
    actor: str | None,
    **options: Any,
) -> None:
    """Register a connector."""
    password = None
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise ValidationError("--password-stdin read an empty password")
    new = connectors.NewConnector(
        name=name,
        aliases=aliases,
        password=password,
        enabled=not disabled,
        default_gateway=default_gateway,
        **options,
    )
    connectors.add(conn, new, actor=actor)
    click.echo(f"connector {name} added")


@connector.command("list")
@_json_option
@with_conn
def connector_list(conn: psycopg.Connection[Any], as_json: bool) -> None:
    """List connectors (passwords are never shown, only how they are kept)."""
    rows = [connectors.describe(c) for c in connectors.load_all(conn)]
    emit(
        rows,
        as_json,
        lambda rs: (
            table(
                rs,
                [
                    "name",
                    "direction",
                    "address",
                    "host",
                    "port",
                    "effective_security",
                    "username",
                    "password",
                    "enabled",
                    "default_gateway",
                ],
            )
            if rs
            else "no connectors"
        ),
    )


@connector.command("enable")
@click.argument("name")
@click.option("--actor", help="Who is making the change (default: the OS user).")
@with_conn
def connector_enable(conn: psycopg.Connection[Any], name: str, actor: str | None) -> None:
    """Enable a connector and release the messages held for it."""
    released = connectors.set_enabled(conn, name, True, actor=actor)
    click.echo(f"connector {name} enabled; {released} held message(s) released")


@connector.command("disable")
@click.argument("name")
@click.option("--actor", help="Who is making the change (default: the OS user).")
@with_conn
def connector_disable(conn: psycopg.Connection[Any], name: str, actor: str | None) -> None:
    """Disable a connector: its messages are held until it is enabled."""
    connectors.set_enabled(conn, name, False, actor=actor)
    click.echo(f"connector {name} disabled")


@connector.command("test")
@click.argument("name")
@_json_option
@with_conn
def connector_test(conn: psycopg.Connection[Any], name: str, as_json: bool) -> None:
    """Connect, secure, say EHLO and authenticate; send nothing (Enate's Test Connection)."""
    from worker.probe import probe

    c = connectors.get(conn, name)
    settings = runtime_settings.load(conn)
    result = probe(
        c,
        timeout=min(settings.smtp_timeout_seconds, c.timeout_seconds),
        local_hostname=Config().local_hostname,
    )
    emit(
        result,
        as_json,
        lambda r: "\n".join(
            f"{'ok  ' if s['ok'] else 'FAIL'} {s['step']}: {s['detail']}" for s in r["steps"]
        ),
    )
    if not result["ok"]:
        sys.exit(EXIT_ERROR)


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
@_json_option
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


# -- sending -------------------------------------------------------------------------------


def _parse_when(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValidationError(f"--send-at {value!r} is not an ISO 8601 time") from None
    if when.tzinfo is None:
        raise ValidationError("--send-at needs a time zone offset, e.g. 2026-12-01T09:00:00+01:00")
    return when


def _parse_headers(values: Iterable[str]) -> dict[str, str]:
    headers = {}
    for h in values:
        name, sep, value = h.partition(":")
        if not sep:
            raise ValidationError(f"--header {h!r} must look like 'Name: value'")
        headers[name.strip()] = value.strip()
    return headers


@cli.command("send")
@click.option("--from", "from_addr", help="From address (omit with --system for the unmonitored address).")
@click.option("--from-name", help="Display name of the sender.")
@click.option("--to", multiple=True, help="Recipient; repeat.")
@click.option("--cc", multiple=True, help="Cc recipient; repeat.")
@click.option("--bcc", multiple=True, help="Bcc recipient (never in the headers); repeat.")
@click.option("--reply-to")
@click.option("--subject", required=True)
@click.option("--text", help="Plain-text body.")
@click.option("--html", help="HTML body.")
@click.option(
    "--attach",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="File to attach; repeat.",
)
@click.option("--header", "headers", multiple=True, help="Extra header 'X-Name: value'; repeat.")
@click.option("--send-at", help="Send at this ISO 8601 time (with offset).")
@click.option(
    "--importance",
    type=click.Choice(["high", "normal", "low"]),
    default="normal",
    show_default=True,
)
@click.option("--idempotency-key", help="A repeat with the same key inserts nothing.")
@click.option("--reference", help="Your reference (e.g. a case number).")
@click.option("--system", "system_generated", is_flag=True, help="System-generated mail.")
@with_conn
def send(
    conn: psycopg.Connection[Any],
    attach: tuple[str, ...],
    headers: tuple[str, ...],
    send_at: str | None,
    to: tuple[str, ...],
    cc: tuple[str, ...],
    bcc: tuple[str, ...],
    **fields: Any,
) -> None:
    """Enqueue one message; print its id."""
    if fields["text"] is None and fields["html"] is None:
        raise ValidationError("give --text or --html")
    msg_id = enqueue(
        conn,
        to=list(to),
        cc=list(cc),
        bcc=list(bcc),
        attachments=[Attachment.from_path(p) for p in attach],
        headers=_parse_headers(headers),
        send_after=_parse_when(send_at),
        **fields,
    )
    conn.commit()
    click.echo(msg_id)


# -- running -------------------------------------------------------------------------------


def _runner_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        _db_option,
        click.option(
            "--redis-url",
            envvar="OUTBOX_REDIS_URL",
            show_envvar=True,
            default=Config.model_fields["redis_url"].default,
            show_default=True,
        ),
        click.option(
            "--queue",
            envvar="OUTBOX_QUEUE",
            show_envvar=True,
            default=Config.model_fields["queue"].default,
            show_default=True,
            help="Dramatiq queue name.",
        ),
        click.option(
            "--redis-namespace",
            envvar="OUTBOX_REDIS_NAMESPACE",
            show_envvar=True,
            default=Config.model_fields["redis_namespace"].default,
            show_default=True,
            help="Prefix of every Redis key.",
        ),
        click.option(
            "--metrics-port",
            envvar="OUTBOX_METRICS_PORT",
            show_envvar=True,
            type=int,
            default=None,
            help="Serve Prometheus metrics on 127.0.0.1:PORT.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _worker_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--threads",
        "worker_threads",
        envvar="OUTBOX_WORKER_THREADS",
        show_envvar=True,
        type=click.IntRange(1, 256),
        default=Config.model_fields["worker_threads"].default,
        show_default=True,
        help="Concurrent broker messages per worker process.",
    )(f)
    f = click.option(
        "--processes",
        "worker_processes",
        envvar="OUTBOX_WORKER_PROCESSES",
        show_envvar=True,
        type=click.IntRange(1, 64),
        default=Config.model_fields["worker_processes"].default,
        show_default=True,
        help="Worker processes.",
    )(f)
    return f


def _config(**flags: Any) -> Config:
    return Config(**{k: v for k, v in flags.items() if v is not None})


@cli.command("run")
@_runner_options
@_worker_options
@click.option(
    "--until-idle", is_flag=True, help="Exit once nothing is due, in flight or waiting for a retry."
)
def run(until_idle: bool, **flags: Any) -> None:
    """Poller and workers together, for one machine."""
    from worker.runner import install_signal_handlers, run_all

    stop = threading.Event()
    install_signal_handlers(stop)
    run_all(_config(**flags), stop, until_idle=until_idle)


@cli.command("poll")
@_runner_options
def poll(**flags: Any) -> None:
    """Only the poller: claim due rows and hand them to the broker."""
    from worker import metrics
    from worker.runner import install_signal_handlers, run_poller

    config = _config(**flags)
    stop = threading.Event()
    install_signal_handlers(stop)
    metrics.serve(config.metrics_port)
    run_poller(config, stop)


@cli.command("worker")
@_runner_options
@_worker_options
def worker_cmd(**flags: Any) -> None:
    """Only workers: consume the broker queue and send mail."""
    from worker.runner import install_signal_handlers, run_all_workers

    stop = threading.Event()
    install_signal_handlers(stop)
    run_all_workers(_config(**flags), stop)


# -- reading -------------------------------------------------------------------------------


@cli.command("status")
@_json_option
@with_conn
def status(conn: psycopg.Connection[Any], as_json: bool) -> None:
    """Counts per status and per connector, and the queue lag."""
    emit(report.status(conn), as_json, report.render_status)


@cli.command("show")
@click.argument("message_id", type=int)
@_json_option
@with_conn
def show(conn: psycopg.Connection[Any], message_id: int, as_json: bool) -> None:
    """One message, its recipients' results and its attempts."""
    emit(report.show(conn, message_id), as_json, report.render_show)


@cli.command("catcher")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=1025, show_default=True)
@click.option(
    "--maildir",
    type=click.Path(file_okay=False),
    required=True,
    help="Where received messages are kept (one .eml file each).",
)
def catcher(host: str, port: int, maildir: str) -> None:
    """A local SMTP catcher that keeps what it receives (for trying things out)."""
    from outbox.catcher import serve

    serve(host, port, maildir)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: one-line errors, no tracebacks for a user's mistake."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="outbox", standalone_mode=False)
    except click.exceptions.Abort:
        _fail("aborted", EXIT_ERROR)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except OutboxError as exc:
        _fail(str(exc), EXIT_ERROR)
    except psycopg.errors.UndefinedTable:
        _fail("the outbox schema is missing: run `outbox db init`", EXIT_ERROR)
    except psycopg.errors.IntegrityError as exc:
        _fail(f"refused by the database: {exc.diag.message_primary}", EXIT_ERROR)
    except psycopg.OperationalError as exc:
        _fail(f"cannot reach the database: {str(exc).strip().splitlines()[0]}", EXIT_UNAVAILABLE)


def _fail(message: str, code: int) -> None:
    click.echo(f"outbox: error: {message}", err=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
