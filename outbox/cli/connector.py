"""outbox connector ...."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import click
import psycopg

from outbox.admin import connectors, operations
from outbox.cli.base import (
    EXIT_ERROR,
    cli,
    emit,
    json_option,
    table,
    with_conn,
)
from outbox.config import Config
from outbox.core import limits
from outbox.core.connector_rules import ENTRA_SMTP_SCOPE
from outbox.core.errors import ConfigurationError, ValidationError
from outbox.store.settings import load as load_settings

# -- connectors ----------------------------------------------------------------------------

F = TypeVar("F", bound=Callable[..., Any])


def oauth_options(*, adding: bool) -> Callable[[F], F]:
    """`--auth` and the `--oauth-*` options of `connector add` and `update`."""
    options = [
        click.option(
            "--auth",
            type=click.Choice(connectors.AUTH_METHODS),
            default="password" if adding else None,
            show_default=adding,
            help="password: AUTH with --username and a password. oauth2: AUTH XOAUTH2 as the mailbox "
            "--username, with an access token of the client-credentials grant.",
        ),
        click.option("--oauth-client-id", metavar="ID", help="OAuth client (application) ID."),
        click.option(
            "--oauth-client-secret-env",
            metavar="VAR",
            help="Name of the worker's environment variable holding the client secret.",
        ),
        click.option(
            "--oauth-client-secret-stdin",
            is_flag=True,
            help="Read the client secret from stdin; stored encrypted with $OUTBOX_SECRET_KEY.",
        ),
        click.option(
            "--oauth-tenant",
            metavar="T",
            help="Microsoft Entra ID tenant (ID or domain): its token endpoint, scope "
            f"{ENTRA_SMTP_SCOPE} unless --oauth-scope is given.",
        ),
        click.option("--oauth-token-url", metavar="URL", help="Any OAuth 2.0 token endpoint (https)."),
        click.option(
            "--oauth-scope",
            "oauth_scopes",
            metavar="S",
            multiple=True,
            help="Scope to ask for; repeat." + ("" if adding else " Replaces the stored scopes."),
        ),
    ]

    def decorate(f: F) -> F:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


class RateLimit(click.ParamType):
    """`N/s|N/min|N/h|N/day`, or `none` (on update: clear every rate limit)."""

    name = "N/UNIT"

    def __init__(self, *, clearable: bool) -> None:
        self.clearable = clearable

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if self.clearable and str(value).strip().lower() == "none":
            return "none"
        try:
            return str(limits.parse_rate(str(value)))
        except ValidationError as exc:
            self.fail(str(exc), param, ctx)


class Cap(click.ParamType):
    """A positive whole number, or `none` (on update: no limit)."""

    name = "N"

    def __init__(self, *, clearable: bool, maximum: int | None = None) -> None:
        self.clearable, self.maximum = clearable, maximum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if self.clearable and str(value).strip().lower() == "none":
            return NONE
        try:
            n = int(str(value))
        except ValueError:
            n = 0
        if n < 1 or (self.maximum is not None and n > self.maximum):
            top = f" and at most {self.maximum}" if self.maximum is not None else ""
            none = " (or none)" if self.clearable else ""
            self.fail(f"{value!r} must be a whole number of at least 1{top}{none}", param, ctx)
        return n


NONE = "none"  # a cap cleared on update


def limit_options(*, adding: bool) -> Callable[[F], F]:
    """The provider limits of `connector add` and `update`."""
    clear = "" if adding else " `none` clears it."
    options = [
        click.option(
            "--rate-limit",
            "rate_limits",
            type=RateLimit(clearable=not adding),
            multiple=True,
            help="At most N messages over any interval of that length, across all workers "
            "(N/s, N/min, N/h, N/day); repeat, every one applies."
            + ("" if adding else " Replaces the stored rate limits; `none` clears them all."),
        ),
        click.option(
            "--max-connections",
            type=Cap(clearable=not adding, maximum=100),
            help="Concurrent SMTP sessions to the server, across all workers (without it: "
            "up to 4 per worker process)." + clear,
        ),
        click.option(
            "--max-recipients",
            type=Cap(clearable=not adding),
            help="Envelope recipients per SMTP transaction; more go out as several transactions "
            "of the same message." + clear,
        ),
        click.option(
            "--max-messages-per-connection",
            type=Cap(clearable=not adding),
            help="QUIT and reconnect after N messages on one session." + clear,
        ),
    ]

    def decorate(f: F) -> F:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def _limit_changes(options: dict[str, Any]) -> dict[str, Any]:
    """The limit options given to `update`, as changes (`none` -> cleared)."""
    changes: dict[str, Any] = {}
    rates = options.pop("rate_limits", ())
    if rates:
        if "none" in rates and len(rates) > 1:
            raise ValidationError("--rate-limit none clears every rate limit: give it alone")
        changes["rate_limits"] = () if "none" in rates else tuple(rates)
    for key in ("max_connections", "max_recipients", "max_messages_per_connection"):
        value = options.pop(key, None)
        if value is not None:
            changes[key] = None if value == NONE else value
    return changes


def _read_secrets(password_stdin: bool, client_secret_stdin: bool) -> tuple[str | None, str | None]:
    if password_stdin and client_secret_stdin:
        raise ValidationError(
            "give either --password-stdin or --oauth-client-secret-stdin: stdin holds one secret"
        )
    password = _read_password() if password_stdin else None
    client_secret = _read_password("--oauth-client-secret-stdin") if client_secret_stdin else None
    return password, client_secret


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
@oauth_options(adding=True)
@click.option("--ca-file", type=click.Path(dir_okay=False), help="CA bundle to verify the SMTP server.")
@click.option("--default-gateway", is_flag=True, help="Make it the System Default Gateway.")
@click.option("--disabled", is_flag=True, help="Register it disabled.")
@limit_options(adding=True)
@click.option(
    "--timeout",
    "timeout_seconds",
    type=click.FloatRange(min=0.1),
    default=60.0,
    show_default=True,
    help="SMTP timeout per command, seconds.",
)
@click.option("--actor", help="Who is making the change (default: the OS user).")
@click.option(
    "--test",
    "test_first",
    is_flag=True,
    help="Save it only after a successful Test Connection (connect, TLS, EHLO, AUTH), as Enate does.",
)
@with_conn
def connector_add(
    conn: psycopg.Connection[Any],
    name: str,
    aliases: tuple[str, ...],
    password_stdin: bool,
    oauth_client_secret_stdin: bool,
    disabled: bool,
    default_gateway: bool,
    actor: str | None,
    test_first: bool,
    rate_limits: tuple[str, ...],
    **options: Any,
) -> None:
    """Register a connector."""
    password, client_secret = _read_secrets(password_stdin, oauth_client_secret_stdin)
    new = connectors.NewConnector(
        name=name,
        aliases=aliases,
        password=password,
        oauth_client_secret=client_secret,
        enabled=not disabled,
        default_gateway=default_gateway,
        rate_limits=rate_limits,
        **options,
    )
    if test_first and new.direction != "incoming":
        result = _probe(conn, connectors.preview(new))
        failed = [s for s in result["steps"] if not s["ok"]]
        if failed:
            raise ConfigurationError(
                f"Test Connection failed at {failed[0]['step']}: {failed[0]['detail']}; connector not saved"
            )
    connectors.add(conn, new, actor=actor)
    click.echo(f"connector {name} added" + (" (Test Connection passed)" if test_first else ""))


def _probe(conn: psycopg.Connection[Any], c: Any) -> dict[str, Any]:
    from worker.probe import probe

    settings = load_settings(conn)
    return probe(
        c,
        timeout=min(settings.smtp_timeout_seconds, c.timeout_seconds),
        local_hostname=Config().local_hostname,
    )


@connector.command("update")
@click.argument("name")
@click.option("--address", help="New primary address.")
@click.option("--alias", "aliases", multiple=True, help="Replace the aliases with these; repeat.")
@click.option("--no-aliases", is_flag=True, help="Remove every alias.")
@click.option("--direction", type=click.Choice(connectors.DIRECTIONS))
@click.option("--host")
@click.option("--port", type=int)
@click.option("--security", type=click.Choice(connectors.SECURITY_MODES))
@click.option("--username")
@click.option("--password-env", metavar="VAR", help="Read the password from this variable from now on.")
@click.option("--password-stdin", is_flag=True, help="Read a new password from stdin (stored encrypted).")
@oauth_options(adding=False)
@click.option("--ca-file", type=click.Path(dir_okay=False))
@limit_options(adding=False)
@click.option("--timeout", "timeout_seconds", type=click.FloatRange(min=0.1))
@click.option("--actor", help="Who is making the change (default: the OS user).")
@with_conn
def connector_update(
    conn: psycopg.Connection[Any],
    name: str,
    aliases: tuple[str, ...],
    no_aliases: bool,
    password_stdin: bool,
    oauth_client_secret_stdin: bool,
    oauth_scopes: tuple[str, ...],
    actor: str | None,
    **options: Any,
) -> None:
    """Change a connector's settings; recorded in its activity history.

    To move a password connector to OAuth 2.0 (Microsoft 365):
    outbox connector update NAME --auth oauth2 --oauth-client-id ID --oauth-tenant T
    --oauth-client-secret-stdin < secret.txt"""
    limit_changes = _limit_changes(options)
    changes = {k: v for k, v in options.items() if v is not None} | limit_changes
    if aliases or no_aliases:
        changes["aliases"] = () if no_aliases else aliases
    if oauth_scopes:
        changes["oauth_scopes"] = oauth_scopes
    password, client_secret = _read_secrets(password_stdin, oauth_client_secret_stdin)
    if not changes and password is None and client_secret is None:
        raise ValidationError("nothing to change: give at least one option")
    done = connectors.update(conn, name, changes, password=password, client_secret=client_secret, actor=actor)
    slowed = (
        f"; slow-down after throttling ended (was slowed to {done.slowdown['rate']})" if done.slowdown else ""
    )
    click.echo(
        f"connector {name} updated: {', '.join(done.changed) or 'no change'}" + slowed + _ended(done.backoff)
    )


def _ended(backoff: connectors.BackoffReset | None) -> str:
    return f"; {backoff.summary()}" if backoff is not None and backoff.reset else ""


def _read_password(option: str = "--password-stdin") -> str:
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise ValidationError(
            f"{option} read an empty {'password' if option == '--password-stdin' else 'secret'}"
        )
    return password


@connector.command("list")
@click.option("--wide", is_flag=True, help="Every column (security, username, secrets, limits).")
@json_option
@with_conn
def connector_list(conn: psycopg.Connection[Any], wide: bool, as_json: bool) -> None:
    """List connectors (passwords and client secrets are never shown, only how they are kept).

    STATE is ok, disabled, failing, or "backing off until T" after failures to reach or log
    in to the server; ERROR is the last error while it is current (nothing got through and no
    reset since); GW marks the System Default Gateway. USAGE is what the workers used of the
    connector's limits, as their limiter keeps it on Redis: "12 of 30/min" (messages within
    the last minute), "2 of 3 conn" (sessions open); `?` when Redis cannot be reached. The
    table fits 100 columns; --wide adds the server, security, username, how secrets are kept
    and LIMITS (rate limits, conn: sessions, rcpt: recipients per transaction, msg/conn:
    messages per session). --json has everything, with the error history (last_error and
    last_error_at), the limits one by one and their usage (`used` null when unknown).

    WAITING, shown while messages wait for a connector's limits, says how many, until when
    and for what, as their rows say (`outbox show`): "12 until 19:58:03Z (30/min)"; --json:
    `waiting`, one entry per thing waited for (for, messages, until)."""
    loaded = connectors.load_all(conn)
    used = _usage(loaded)
    waits = connectors.waiting(conn)
    rows = [
        connectors.describe(c) | {"usage": used.get(c.id), "waiting": waits.get(c.id, [])} for c in loaded
    ]
    compact = {c.name: connectors.limits_summary(c) for c in loaded}

    def render(rs: list[dict[str, Any]]) -> str:
        if not rs:
            return "no connectors"
        waiting = ("waiting",) if any(r["waiting"] for r in rs) else ()
        if wide:
            return table(
                [
                    r
                    | {
                        "limits": compact[r["name"]],
                        "usage": _usage_cell(r["usage"]),
                        "waiting": _waiting_cell(r["waiting"]),
                    }
                    for r in rs
                ],
                (*WIDE_COLUMNS, *waiting),
            )
        columns = (*NARROW_COLUMNS, *waiting)
        shrink = [(c, least) for c, least in NARROW_SHRINK if c in columns]
        return table([_narrow(r) for r in rs], columns, width=100, shrink=shrink)

    emit(rows, as_json, render)


WIDE_COLUMNS = (
    "name",
    "direction",
    "address",
    "host",
    "port",
    "effective_security",
    "username",
    "auth",
    "password",
    "enabled",
    "default_gateway",
    "state",
    "limits",
    "usage",
    "error",
)
NARROW_COLUMNS = ("name", "gw", "address", "state", "usage", "error")
# cut first, to at least (a backing-off connector with a rate limit still fits 100 columns)
NARROW_SHRINK = (("address", 13), ("usage", 11), ("error", 16), ("waiting", 14))


def _usage(loaded: list[Any]) -> dict[int, dict[str, Any]]:
    """Each limited connector's usage as the workers' limiter keeps it on Redis: messages
    within the last interval of each rate limit, and sessions open against
    --max-connections; `used` is None (shown `?`) when Redis cannot be reached."""
    from worker.limiter import usage

    limited = [c for c in loaded if c.rate_limits or c.max_connections is not None]
    if not limited:
        return {}
    config = Config()
    read = usage(config.redis_url, config.redis_namespace, limited)
    out: dict[int, dict[str, Any]] = {}
    for c in limited:
        u = read.get(c.id) if read is not None else None
        counts = dict(u.rates) if u is not None else {}
        out[c.id] = {
            "rate_limits": [
                {"limit": str(r), "window_seconds": r.seconds, "used": counts.get(r)}
                for r in limits.parse_rates(c.rate_limits)
            ],
            "sessions": (
                None
                if c.max_connections is None
                else {"limit": c.max_connections, "used": u.sessions if u is not None else None}
            ),
        }
    return out


def _usage_cell(u: dict[str, Any] | None) -> str | None:
    """`12 of 30/min, 2 of 3 conn`; `?` for what Redis could not tell."""
    if u is None:
        return None

    def n(used: int | None) -> str:
        return "?" if used is None else str(used)

    parts = [f"{n(r['used'])} of {r['limit']}" for r in u["rate_limits"]]
    if u["sessions"] is not None:
        parts.append(f"{n(u['sessions']['used'])} of {u['sessions']['limit']} conn")
    return ", ".join(parts)


# What a message waits for, as its row says, shortened for the table (else shown as it is)
WAITS_FOR = (
    (re.compile(r"rate limit (\S+)"), r"\1"),
    (re.compile(r"slow-down to (\S+) after throttling"), r"slowed to \1"),
    (re.compile(r"a connection \((max-connections \d+)\)"), r"\1"),
)


def _waiting_cell(groups: list[dict[str, Any]]) -> str | None:
    """`12 until 19:58:03Z (30/min)`, one part per thing waited for."""
    parts = []
    for g in groups:
        what = g["for"]
        for pattern, short in WAITS_FOR:
            if m := pattern.fullmatch(what):
                what = m.expand(short)
                break
        parts.append(f"{g['messages']} until {_short_time(g['until'])} ({what})")
    return "; ".join(parts) or None


def _short_time(when: datetime) -> str:
    """`15:38:38Z` when that is today (UTC), else the whole time."""
    when = when.astimezone(UTC)
    same_day = when.date() == datetime.now(UTC).date()
    return when.strftime("%H:%M:%SZ") if same_day else when.isoformat(timespec="seconds")


def _short_state(r: dict[str, Any]) -> str:
    """The state with a shorter time: `backing off until 15:38:38Z` when that is today (UTC)."""
    until = r["backoff_until"]
    if r["health"] != "backing off" or until is None:
        return str(r["state"])
    return f"backing off until {_short_time(until)}"


def _narrow(r: dict[str, Any]) -> dict[str, Any]:
    aliases = f" (+{len(r['aliases'])})" if r["aliases"] else ""
    return {
        "name": r["name"] if r["direction"] != "incoming" else f"{r['name']} (incoming)",
        "address": r["address"] + aliases,
        "gw": "*" if r["default_gateway"] else None,
        "state": _short_state(r),
        "usage": _usage_cell(r["usage"]),
        "error": r["error"],
        "waiting": _waiting_cell(r["waiting"]),
    }


@connector.command("enable")
@click.argument("name")
@click.option("--actor", help="Who is making the change (default: the OS user).")
@with_conn
def connector_enable(conn: psycopg.Connection[Any], name: str, actor: str | None) -> None:
    """Enable a connector, release the messages held for it and end any backoff."""
    done = connectors.set_enabled(conn, name, True, actor=actor)
    click.echo(
        f"connector {name} enabled; {done.released_held} held message(s) released" + _ended(done.backoff)
    )


@connector.command("disable")
@click.argument("name")
@click.option("--actor", help="Who is making the change (default: the OS user).")
@with_conn
def connector_disable(conn: psycopg.Connection[Any], name: str, actor: str | None) -> None:
    """Disable a connector: its messages are held until it is enabled."""
    connectors.set_enabled(conn, name, False, actor=actor)
    click.echo(f"connector {name} disabled")


@connector.command("rotate-key")
@click.option("--actor", help="Who is making the change (default: the OS user).")
@with_conn
def connector_rotate_key(conn: psycopg.Connection[Any], actor: str | None) -> None:
    """Re-encrypt stored passwords and OAuth client secrets under the first key of $OUTBOX_SECRET_KEY.

    To rotate: put the new key first and keep the old one after it
    (OUTBOX_SECRET_KEY=new,old), run this, then drop the old key."""
    done = connectors.rotate_passwords(conn, actor=actor)
    click.echo(
        f"{done.passwords} password(s) re-encrypted, {done.client_secrets} OAuth client secret(s) "
        "re-encrypted with the first key of $OUTBOX_SECRET_KEY"
    )


@connector.command("test")
@click.argument("name")
@click.option("--actor", help="Who is testing (default: the OS user); recorded when it ends a backoff.")
@json_option
@with_conn
def connector_test(conn: psycopg.Connection[Any], name: str, actor: str | None, as_json: bool) -> None:
    """Connect, secure, say EHLO and authenticate; send nothing (Enate's Test Connection).

    A passing test ends the connector's backoff: mail waiting for it is due now."""
    result = _probe(conn, connectors.get(conn, name))
    backoff = connectors.reset_backoff(conn, name, by="test", actor=actor) if result["ok"] else None
    result["backoff_reset"] = backoff.as_dict() if backoff is not None and backoff.reset else None
    emit(
        result,
        as_json,
        lambda r: "\n".join(
            [f"{'ok  ' if s['ok'] else 'FAIL'} {s['step']}: {s['detail']}" for s in r["steps"]]
            + ([f"connector {name}: {backoff.summary()}"] if backoff is not None and backoff.reset else [])
        ),
    )
    if not result["ok"]:
        sys.exit(EXIT_ERROR)


@connector.command("reset")
@click.argument("name")
@click.option("--actor", help="Who is doing this (default: the OS user); audited.")
@json_option
@with_conn
def connector_reset(conn: psycopg.Connection[Any], name: str, actor: str | None, as_json: bool) -> None:
    """End a connector's backoff, and its slow-down after throttling replies, now: mail
    waiting for it is sent within seconds.

    Clears its failure count (its last error stays in the history), ends the slow-down (the
    workers send at its configured limits again), makes the messages that wait for either
    due now and has every worker reload it. Audited. On a healthy connector with nothing
    waiting it changes nothing."""
    done = operations.reset_connector(conn, name, actor=actor)
    emit(done, as_json, _render_reset)


def _render_reset(d: dict[str, Any]) -> str:
    if not d["reset"]:
        return f"connector {d['connector']} is healthy and no mail waits for it: nothing to reset"
    was, parts = d["was"], []
    if was["backoff_until"] or was["failures"]:
        why = f"{was['failures']} failure(s), last: {was['last_error']}"
        if was["backoff_until"]:
            until = datetime.fromisoformat(was["backoff_until"]).isoformat(timespec="seconds")
            why = f"backing off until {until} after {why}"
        parts.append(f"backoff ended (was {why})")
    elif d["backoff_reset"]:
        parts.append("mail waiting for an ended backoff is due again")
    if d["slowdown_ended"]:
        parts.append(f"slow-down after throttling ended (was slowed to {d['slowdown_ended']['rate']})")
    ids = f": {', '.join(map(str, d['ids']))}" if d["ids"] else ""
    return f"connector {d['connector']}: {'; '.join(parts)}; {d['count']} waiting message(s) due now{ids}"
