"""The connector registry: add, list, update, enable, disable and reset SMTP connectors (with history)."""

from __future__ import annotations

import getpass
import os
import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from outbox.core import limits
from outbox.core.connector_rules import effective_security, oauth_scopes, token_url
from outbox.core.errors import ConfigurationError, ConflictError, NotFoundError, ValidationError
from outbox.core.message import check_address
from outbox.core.resolve import OUTBOUND, Connector, resolve
from outbox.store import secrets
from outbox.store.sql import queries

Q = queries("outbox.store")
SECURITY_MODES = ("auto", "tls", "starttls", "none")
DIRECTIONS = ("outgoing", "both", "incoming")
AUTH_METHODS = ("password", "oauth2")
OAUTH_FIELDS = (
    "oauth_client_id",
    "oauth_client_secret_env",
    "oauth_tenant",
    "oauth_token_url",
    "oauth_scopes",
)
_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,252}$")
_TOKEN = re.compile(r"^[\x21-\x7e]{1,1000}$")  # printable ASCII, no spaces (client ids, scopes)


def default_actor() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in a container
        return os.environ.get("USER", "unknown")


@dataclass(frozen=True)
class NewConnector:
    name: str
    direction: str
    address: str
    host: str | None
    port: int | None
    aliases: tuple[str, ...] = ()
    security: str = "auto"
    username: str | None = None
    password_env: str | None = None
    password: str | None = None
    ca_file: str | None = None
    default_gateway: bool = False
    enabled: bool = True
    max_connections: int | None = None  # across all workers; None: no cap
    timeout_seconds: float = 60.0
    # an already stored encrypted password kept by `update` (never decrypted here)
    password_enc: bytes | None = None
    auth: str = "password"
    oauth_client_id: str | None = None
    oauth_client_secret_env: str | None = None
    oauth_client_secret: str | None = None  # from stdin: stored encrypted
    oauth_client_secret_enc: bytes | None = None  # kept by `update`
    oauth_tenant: str | None = None
    oauth_token_url: str | None = None
    oauth_scopes: tuple[str, ...] = ()
    rate_limits: tuple[str, ...] = ()
    max_recipients: int | None = None
    max_messages_per_connection: int | None = None


def _validate(new: NewConnector) -> dict[str, Any]:
    if new.direction not in DIRECTIONS:
        raise ValidationError(f"direction must be one of {', '.join(DIRECTIONS)}")
    if new.security not in SECURITY_MODES:
        raise ValidationError(f"security must be one of {', '.join(SECURITY_MODES)}")
    address = check_address(new.address, "address").lower()
    aliases = tuple(dict.fromkeys(check_address(a, "alias").lower() for a in new.aliases))
    outbound = new.direction in OUTBOUND
    if outbound and (not new.host or not new.port):
        raise ValidationError("an outgoing or both connector needs --host and --port")
    if new.port is not None and not 1 <= new.port <= 65535:
        raise ValidationError("port must be between 1 and 65535")
    if new.default_gateway and not outbound:
        raise ValidationError("the System Default Gateway must be an outgoing or both connector")
    if new.password_env and new.password is not None:
        raise ValidationError("give either --password-env or --password-stdin, not both")
    if new.auth not in AUTH_METHODS:
        raise ValidationError(f"auth must be one of {', '.join(AUTH_METHODS)}")
    has_secret = bool(new.password_env) or new.password is not None or new.password_enc is not None
    if new.auth == "oauth2":
        _validate_oauth(new, has_secret)
    else:
        if any(getattr(new, k) for k in (*OAUTH_FIELDS, "oauth_client_secret", "oauth_client_secret_enc")):
            raise ValidationError("the --oauth-* options need --auth oauth2")
        if has_secret and not new.username:
            raise ValidationError("a password needs --username")
        if new.username and not has_secret:
            raise ValidationError("--username needs --password-env VAR or --password-stdin")
    if new.username and new.security == "none":
        raise ValidationError("refusing credentials with --security none: AUTH is only ever sent over TLS")
    if new.port == 465 and new.security in ("starttls", "none"):
        raise ValidationError("port 465 is implicit TLS: use --security tls (or auto)")
    if new.security == "tls" and new.port in (25, 587):
        raise ValidationError(f"port {new.port} speaks plain SMTP first: use --security starttls (or auto)")
    if new.ca_file and not os.path.isfile(new.ca_file):
        raise ValidationError(f"CA file {new.ca_file} does not exist")
    return {
        "name": new.name,
        "direction": new.direction,
        "address": address,
        "aliases": list(aliases),
        "host": new.host,
        "port": new.port,
        "security": new.security,
        "username": new.username,
        "password_env": new.password_env,
        "password_enc": secrets.encrypt(new.password) if new.password is not None else new.password_enc,
        "ca_file": os.path.abspath(new.ca_file) if new.ca_file else None,
        "auth": new.auth,
        "oauth_client_id": new.oauth_client_id,
        "oauth_client_secret_env": new.oauth_client_secret_env,
        "oauth_client_secret_enc": (
            secrets.encrypt(new.oauth_client_secret)
            if new.oauth_client_secret is not None
            else new.oauth_client_secret_enc
        ),
        "oauth_tenant": new.oauth_tenant,
        "oauth_token_url": new.oauth_token_url,
        "oauth_scopes": list(dict.fromkeys(new.oauth_scopes)),
        "enabled": new.enabled,
        "is_default_gateway": new.default_gateway,
        "max_connections": new.max_connections,
        "timeout_seconds": new.timeout_seconds,
        **_validate_limits(new),
    }


def _validate_limits(new: NewConnector) -> dict[str, Any]:
    """Provider limits as stored: rate limits canonical (`30/min`), caps positive or None."""
    if new.max_connections is not None and not 1 <= new.max_connections <= 100:
        raise ValidationError("--max-connections must be between 1 and 100 (or none)")
    for flag, value in (
        ("--max-recipients", new.max_recipients),
        ("--max-messages-per-connection", new.max_messages_per_connection),
    ):
        if value is not None and value < 1:
            raise ValidationError(f"{flag} must be at least 1 (or none)")
    return {
        "rate_limits": [str(r) for r in limits.parse_rates(new.rate_limits)],
        "max_recipients": new.max_recipients,
        "max_messages_per_connection": new.max_messages_per_connection,
    }


def _validate_oauth(new: NewConnector, has_password: bool) -> None:
    """An `oauth2` connector: a mailbox, a client with one secret, one token endpoint."""
    if has_password:
        raise ValidationError(
            "--auth oauth2 takes no password: give the client secret with "
            "--oauth-client-secret-env VAR or --oauth-client-secret-stdin"
        )
    if not new.username:
        raise ValidationError("--auth oauth2 needs --username: the mailbox the token sends as")
    if not new.oauth_client_id:
        raise ValidationError("--auth oauth2 needs --oauth-client-id")
    if not _TOKEN.match(new.oauth_client_id):
        raise ValidationError("--oauth-client-id must be printable ASCII without spaces")
    given = bool(new.oauth_client_secret_env) + (new.oauth_client_secret is not None)
    if given > 1:
        raise ValidationError(
            "give either --oauth-client-secret-env or --oauth-client-secret-stdin, not both"
        )
    if not given and new.oauth_client_secret_enc is None:
        raise ValidationError(
            "--auth oauth2 needs --oauth-client-secret-env VAR or --oauth-client-secret-stdin"
        )
    if new.oauth_tenant and new.oauth_token_url:
        raise ValidationError("give either --oauth-tenant or --oauth-token-url, not both")
    if not new.oauth_tenant and not new.oauth_token_url:
        raise ValidationError("--auth oauth2 needs --oauth-tenant (Microsoft 365) or --oauth-token-url URL")
    if new.oauth_tenant and not _TENANT.match(new.oauth_tenant):
        raise ValidationError("--oauth-tenant must be a tenant ID or domain (like contoso.onmicrosoft.com)")
    if new.oauth_token_url:
        url = urlsplit(new.oauth_token_url)
        if url.scheme != "https" or not url.hostname or not new.oauth_token_url.isprintable():
            raise ValidationError(
                "--oauth-token-url must be an https:// URL: the client secret travels to it"
            )
    for scope in new.oauth_scopes:
        if not _TOKEN.match(scope):
            raise ValidationError(
                f"--oauth-scope {scope!r} must be printable ASCII without spaces (repeat the option)"
            )


def preview(new: NewConnector) -> Connector:
    """The connector `add` would register, validated but not stored (for a test first)."""
    return Connector.from_row(_validate(new) | {"id": 0})


def load_all(conn: psycopg.Connection[Any]) -> list[Connector]:
    with conn.cursor(row_factory=dict_row) as cur:
        return [Connector.from_row(r) for r in cur.execute(Q["connectors"]).fetchall()]


def get(conn: psycopg.Connection[Any], name: str) -> Connector:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(Q["connector_by_name"], {"name": name}).fetchone()
    if row is None:
        raise NotFoundError(f"no connector named {name!r}")
    return Connector.from_row(row)


def _event(
    conn: psycopg.Connection[Any],
    c_id: int | None,
    name: str,
    action: str,
    actor: str | None,
    detail: dict[str, Any] | None = None,
) -> None:
    conn.execute(
        Q["insert_connector_event"],
        {
            "connector_id": c_id,
            "connector_name": name,
            "action": action,
            "actor": actor or default_actor(),
            "detail": Jsonb(detail or {}),
        },
    )


def add(conn: psycopg.Connection[Any], new: NewConnector, *, actor: str | None = None) -> int:
    """Register a connector (one transaction). Raises ValidationError on a bad or clashing one."""
    values = _validate(new)
    with conn.transaction():
        conn.execute(Q["lock_connectors"])
        existing = load_all(conn)
        if any(c.name == new.name for c in existing):
            raise ConflictError(f"a connector named {new.name!r} exists already")
        if new.direction in OUTBOUND:
            claimed = {a for c in existing if c.outbound for a in c.addresses}
            clash = sorted({values["address"], *values["aliases"]} & claimed)
            if clash:
                raise ConflictError(f"{', '.join(clash)} already belongs to another outbound connector")
        if new.default_gateway:
            gateway = next((c for c in existing if c.is_default_gateway), None)
            if gateway is not None:
                raise ConflictError(f"connector {gateway.name} is already the System Default Gateway")
        row = conn.execute(Q["insert_connector"], values).fetchone()
        assert row is not None
        _event(
            conn,
            row[0],
            new.name,
            "created",
            actor,
            {
                k: values[k]
                for k in (
                    "direction",
                    "address",
                    "aliases",
                    "host",
                    "port",
                    "security",
                    "is_default_gateway",
                    "enabled",
                )
            },
        )
    return int(row[0])


@dataclass(frozen=True)
class Updated:
    changed: list[str]  # the fields that changed
    backoff: BackoffReset
    slowdown: dict[str, Any] | None = None  # the slow-down a change of limits ended


@dataclass(frozen=True)
class Enabled:
    released_held: int  # held messages back in the queue (enable)
    backoff: BackoffReset | None  # enable ends a backoff; disable leaves it


# What `update` may change, and how a change shows in the activity history.
UPDATABLE = (
    "address",
    "aliases",
    "direction",
    "host",
    "port",
    "security",
    "username",
    "password_env",
    "ca_file",
    "max_connections",
    "timeout_seconds",
    "auth",
    *OAUTH_FIELDS,
    "rate_limits",
    "max_recipients",
    "max_messages_per_connection",
)


# What `describe` shows that is derived or the workers' (not a setting `update` changes).
_DERIVED = (
    "slowdown",
    "health",
    "state",
    "error",
    "effective_security",
    "failures",
    "backoff_until",
    "last_error",
    "last_error_at",
)


def update(
    conn: psycopg.Connection[Any],
    name: str,
    changes: dict[str, Any],
    *,
    password: str | None = None,
    client_secret: str | None = None,
    actor: str | None = None,
) -> Updated:
    """Change a connector's settings (validated like `add`); returns the fields changed.
    A new password (`password`, or `password_env`) replaces the stored one; otherwise the
    stored one is kept; the OAuth client secret (`client_secret`, or `oauth_client_secret_env`)
    likewise. Switching `auth` drops the other method's settings and secret. Workers open new
    SMTP sessions for it at once. Any update ends the connector's backoff (the operator fixed
    something): mail waiting for it is due now."""
    unknown = set(changes) - set(UPDATABLE)
    if unknown:
        raise ValidationError(f"cannot change {', '.join(sorted(unknown))}")
    with conn.transaction():
        conn.execute(Q["lock_connectors"])
        current = get(conn, name)
        fields = _merged(current, changes, password, client_secret)
        merged = NewConnector(
            name=name,
            default_gateway=current.is_default_gateway,
            enabled=current.enabled,
            password=password,
            oauth_client_secret=client_secret,
            **fields,
        )
        values = _validate(merged)
        if merged.direction in OUTBOUND:
            claimed = {a for c in load_all(conn) if c.outbound and c.id != current.id for a in c.addresses}
            clash = sorted({values["address"], *values["aliases"]} & claimed)
            if clash:
                raise ConflictError(f"{', '.join(clash)} already belongs to another outbound connector")
        before = describe(current)
        conn.execute(Q["update_connector"], values | {"id": current.id})
        after = describe(get(conn, name))
        changed = [k for k in before if before[k] != after[k] and k not in _DERIVED]
        if password is not None and "password" not in changed:
            changed.append("password")
        if client_secret is not None:
            changed.append("oauth_client_secret")
        _event(
            conn,
            current.id,
            name,
            "changed",
            actor,
            {
                k: {"from": before.get(k), "to": after.get(k)}
                if k not in ("password", "oauth_client_secret")
                else "replaced"
                for k in changed
            },
        )
        ended = None
        if "limits" in changed:  # what waited for the old limits goes by the new ones
            ended = _end_slowdown(conn, current, by="update", actor=actor)
            conn.execute(Q["release_limit_waits"], {"id": current.id})
        backoff = _reset_backoff(conn, current, by="update", actor=actor)
    return Updated(changed, backoff, ended)


def _end_slowdown(
    conn: psycopg.Connection[Any], connector: Connector, *, by: str, actor: str | None
) -> dict[str, Any] | None:
    """End the workers' slow-down of `connector` after throttling replies, if one lasts (the
    caller holds `lock_connectors` in its transaction), recorded in its activity history; the
    messages waiting for it are due now. Returns what it was (`slowdown_of`), or None."""
    was = slowdown_of(connector)
    row = conn.execute(Q["end_connector_slowdown"], {"id": connector.id}).fetchone()
    if row is None or was is None:  # none, or one that had already worn off
        return None
    conn.execute(Q["release_limit_waits"], {"id": connector.id})
    _event(
        conn,
        connector.id,
        connector.name,
        "slow-down ended",
        actor,
        {
            "by": by,
            "was_rate": was["rate"],
            "was_interval_seconds": row[0],
            "throttled_at": row[1].isoformat(),
        },
    )
    return was | {"since": row[1].isoformat()}


def end_slowdown(
    conn: psycopg.Connection[Any], name: str, *, by: str = "reset", actor: str | None = None
) -> dict[str, Any] | None:
    """End a connector's slow-down after throttling replies now (one transaction): every
    worker sends at its configured limits again; the messages waiting for it are due now.
    Returns the slow-down it ended, or None when there was none."""
    with conn.transaction():
        conn.execute(Q["lock_connectors"])
        return _end_slowdown(conn, get(conn, name), by=by, actor=actor)


def _merged(
    current: Connector, changes: dict[str, Any], password: str | None, client_secret: str | None
) -> dict[str, Any]:
    """The settings after `update`: the current ones with `changes` over them. A secret given
    anew replaces the stored one (a value read from stdin replaces an env reference and the
    reverse); one of tenant and token URL given replaces the other; a change of `auth` drops
    what only the other method used."""
    fields = {k: getattr(current, k) for k in UPDATABLE} | changes
    fields["password_enc"] = current.password_enc
    fields["oauth_client_secret_enc"] = current.oauth_client_secret_enc
    if password is not None or "password_env" in changes:
        fields["password_enc"] = None
        fields["password_env"] = changes.get("password_env") if password is None else None
    if client_secret is not None or "oauth_client_secret_env" in changes:
        fields["oauth_client_secret_enc"] = None
        fields["oauth_client_secret_env"] = (
            changes.get("oauth_client_secret_env") if client_secret is None else None
        )
    if "oauth_tenant" in changes and "oauth_token_url" not in changes:
        fields["oauth_token_url"] = None
    if "oauth_token_url" in changes and "oauth_tenant" not in changes:
        fields["oauth_tenant"] = None
    if fields["auth"] != current.auth:
        if fields["auth"] == "oauth2":  # the password goes, unless given (then refused)
            fields["password_env"] = changes.get("password_env")
            fields["password_enc"] = None
        else:
            for k in OAUTH_FIELDS:
                fields[k] = changes.get(k, () if k == "oauth_scopes" else None)
            fields["oauth_client_secret_enc"] = None
    return fields


def set_enabled(
    conn: psycopg.Connection[Any], name: str, enabled: bool, *, actor: str | None = None
) -> Enabled:
    """Enable (releasing held messages and ending any backoff: mail waiting for it is due
    now) or disable a connector."""
    with conn.transaction():
        conn.execute(Q["lock_connectors"])
        connector = get(conn, name)
        if not enabled and connector.is_default_gateway:
            _check_gateway_can_go(conn, connector)
        conn.execute(Q["set_connector_enabled"], {"id": connector.id, "enabled": enabled})
        released = 0
        if enabled:
            row = conn.execute(Q["release_held_for_connector"], {"id": connector.id}).fetchone()
            released = int(row[0]) if row else 0
        _event(
            conn,
            connector.id,
            name,
            "enabled" if enabled else "disabled",
            actor,
            {"released_held": released} if enabled else {},
        )
        backoff = _reset_backoff(conn, connector, by="enable", actor=actor) if enabled else None
    return Enabled(released, backoff)


@dataclass(frozen=True)
class BackoffReset:
    """What ending a connector's backoff changed. `reset` False: it was healthy and nothing
    waited for it, so nothing changed. `was_*` is the connector's state before."""

    connector: str
    by: str
    reset: bool
    released: tuple[int, ...] = ()
    was_failures: int = 0
    was_backoff_until: datetime | None = None
    last_error: str | None = None
    last_error_at: datetime | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "connector": self.connector,
            "by": self.by,
            "reset": self.reset,
            "count": len(self.released),
            "ids": list(self.released),
            "was": {
                "failures": self.was_failures,
                "backoff_until": self.was_backoff_until.isoformat() if self.was_backoff_until else None,
                "last_error": self.last_error,
                "last_error_at": self.last_error_at.isoformat() if self.last_error_at else None,
            },
        }

    def summary(self) -> str:
        """One clause for the command that caused it ("" when nothing changed)."""
        if not self.reset:
            return ""
        return f"backoff ended; {len(self.released)} waiting message(s) due now"


def _reset_backoff(
    conn: psycopg.Connection[Any], connector: Connector, *, by: str, actor: str | None
) -> BackoffReset:
    """End `connector`'s backoff now (see `reset_connector_backoff`), recorded in its activity
    history and waking the pollers. The caller holds `lock_connectors` in its transaction and
    read `connector` under it. The one place every fix (`update`, `enable`, a passing `test`,
    `reset`) ends a backoff."""
    row = conn.execute(Q["reset_connector_backoff"], {"id": connector.id}).fetchone()
    assert row is not None
    if row[0] is None:
        return BackoffReset(connector.name, by, reset=False)
    done = BackoffReset(
        connector.name,
        by,
        reset=True,
        released=tuple(row[1]),
        was_failures=connector.failures,
        was_backoff_until=connector.backoff_until,
        last_error=connector.last_error,
        last_error_at=connector.last_error_at,
    )
    if done.released:
        conn.execute(Q["wake_pollers"])
    detail = done.as_dict()
    _event(
        conn,
        connector.id,
        connector.name,
        "backoff reset",
        actor,
        {"by": by, "messages_due_now": detail["count"], **detail["was"]},
    )
    return done


def reset_backoff(
    conn: psycopg.Connection[Any], name: str, *, by: str = "reset", actor: str | None = None
) -> BackoffReset:
    """End a connector's backoff at once (one transaction): failures cleared, workers reload
    it, the messages waiting for it are due now. A healthy connector is left as it is."""
    with conn.transaction():
        conn.execute(Q["lock_connectors"])
        return _reset_backoff(conn, get(conn, name), by=by, actor=actor)


@dataclass(frozen=True)
class Rotated:
    passwords: int
    client_secrets: int


def rotate_passwords(conn: psycopg.Connection[Any], *, actor: str | None = None) -> Rotated:
    """Re-encrypt every stored password and OAuth client secret under the first key of
    $OUTBOX_SECRET_KEY (one transaction: all or nothing). Returns how many were re-encrypted."""
    passwords = client_secrets = 0
    with conn.transaction():
        conn.execute(Q["lock_connectors"])
        for c in load_all(conn):
            if c.password_enc is not None:
                conn.execute(
                    Q["set_connector_password"],
                    {"id": c.id, "password_enc": secrets.rotate(c.password_enc, c.name)},
                )
                _event(conn, c.id, c.name, "password re-encrypted", actor)
                passwords += 1
            if c.oauth_client_secret_enc is not None:
                rotated = secrets.rotate(c.oauth_client_secret_enc, c.name, "OAuth client secret")
                conn.execute(Q["set_connector_client_secret"], {"id": c.id, "secret_enc": rotated})
                _event(conn, c.id, c.name, "client secret re-encrypted", actor)
                client_secrets += 1
    return Rotated(passwords, client_secrets)


def _check_gateway_can_go(conn: psycopg.Connection[Any], gateway: Connector) -> None:
    row = conn.execute(Q["unmonitored_address"]).fetchone()
    unmonitored = row[0] if row else None
    if not unmonitored:
        raise ConfigurationError(
            "refusing to disable the System Default Gateway: set unmonitored-address to an "
            "address of an enabled outbound connector first"
        )
    others = [c if c.id != gateway.id else _disabled(c) for c in load_all(conn)]
    route = resolve(unmonitored, others)
    if route.action != "send":
        raise ConfigurationError(
            f"refusing to disable the System Default Gateway: the unmonitored address "
            f"{unmonitored} does not resolve to another enabled outbound connector"
        )


def _disabled(c: Connector) -> Connector:
    return replace(c, enabled=False)


def check_unmonitored(conn: psycopg.Connection[Any], address: str | None) -> None:
    """With the gateway disabled, the unmonitored address must be an enabled connector's."""
    if not address:
        return
    connectors = load_all(conn)
    gateway = next((c for c in connectors if c.is_default_gateway), None)
    if gateway is not None and not gateway.enabled and resolve(address, connectors).action != "send":
        raise ConfigurationError(
            f"the System Default Gateway is disabled, so the unmonitored address must belong "
            f"to an enabled outbound connector; {address} does not"
        )


def describe(c: Connector) -> dict[str, Any]:
    """A connector for listings: never the password, only how it is kept."""
    return {
        "name": c.name,
        "direction": c.direction,
        "address": c.address,
        "aliases": list(c.aliases),
        "host": c.host,
        "port": c.port,
        "security": c.security,
        "effective_security": effective_security(c) if c.outbound else None,
        "username": c.username,
        "password": secrets.describe(c),
        "auth": auth_summary(c),
        "oauth": oauth_settings(c),
        "ca_file": c.ca_file,
        "enabled": c.enabled,
        "default_gateway": c.is_default_gateway,
        "health": health(c),
        "state": state(c),
        "error": current_error(c),
        "failures": c.failures,
        "backoff_until": c.backoff_until,
        "last_error": c.last_error,
        "last_error_at": c.last_error_at,
        "limits": limits_of(c),
        "slowdown": slowdown_of(c),
    }


def waiting(conn: psycopg.Connection[Any]) -> dict[int, list[dict[str, Any]]]:
    """Per connector id, the messages given back to wait for its limits, by what they wait
    for (most first): `{"for": "rate limit 30/min", "messages": 12, "until": datetime}`, as
    their rows say (`outbox show`: `waiting for rate limit 30/min until T`)."""
    out: dict[int, list[dict[str, Any]]] = {}
    for cid, what, n, until in conn.execute(Q["connector_waiting"]).fetchall():
        out.setdefault(cid, []).append({"for": what, "messages": n, "until": until})
    return out


def limits_of(c: Connector) -> dict[str, Any]:
    """A connector's provider limits, for listings (`connector list --json`)."""
    return {
        "rate_limits": list(c.rate_limits),
        "max_connections": c.max_connections,
        "max_recipients": c.max_recipients,
        "max_messages_per_connection": c.max_messages_per_connection,
    }


def limits_summary(c: Connector) -> str:
    """The limits in one cell: `30/min 10000/day conn 4 rcpt 500`, and a throttling
    slow-down while it lasts: `(slowed to 2.5/s)`."""
    cell = limits.summary(
        limits.parse_rates(c.rate_limits), c.max_connections, c.max_recipients, c.max_messages_per_connection
    )
    slowed = slowdown_of(c)
    return f"{cell} (slowed to {slowed['rate']})" if slowed else cell


def slowdown_of(c: Connector) -> dict[str, Any] | None:
    """The workers' slow-down of this connector after throttling replies, while it lasts:
    its current rate (recovering: doubling every 30 s) and when the last throttling was."""
    spacing = limits.slowdown(
        c.throttle_interval_seconds, c.throttled_at, limits.parse_rates(c.rate_limits), datetime.now(UTC)
    )
    if spacing is None:
        return None
    return {"rate": limits.per_second(spacing), "per_second": round(1 / spacing, 3), "since": c.throttled_at}


def health(c: Connector) -> str:
    """`ok`, `disabled`, `backing off` after failures to reach or log in to the server, or
    `failing`: its backoff ran out but nothing got through since (the next message tries)."""
    if not c.enabled:
        return "disabled"
    if c.backoff_until is not None and c.backoff_until > datetime.now(UTC):
        return "backing off"
    return "ok" if not c.failures else "failing"


def state(c: Connector) -> str:
    """`health` for people: with the time a backoff ends."""
    h = health(c)
    if h == "backing off":
        assert c.backoff_until is not None
        return f"backing off until {c.backoff_until.astimezone(UTC).isoformat(timespec='seconds')}"
    return h


def current_error(c: Connector) -> str | None:
    """The last error while it still describes the connector: it failed and nothing got through
    since. A send that went through, or a reset, clears `failures` (`last_error` stays as
    history), so an old error is never shown as current."""
    return c.last_error if c.failures else None


def oauth_settings(c: Connector) -> dict[str, Any] | None:
    """An `oauth2` connector's client, token endpoint and scopes; how its secret is kept."""
    if c.auth != "oauth2":
        return None
    return {
        "client_id": c.oauth_client_id,
        "tenant": c.oauth_tenant,
        "token_url": token_url(c),
        "scopes": list(oauth_scopes(c)),
        "client_secret": secrets.describe_client_secret(c),
    }


def auth_summary(c: Connector) -> str:
    """One line for listings: `password` or `oauth2 (client …, tenant …, scopes …)`."""
    oauth = oauth_settings(c)
    if oauth is None:
        return "password" if c.username else "none"
    where = f"tenant {c.oauth_tenant}" if c.oauth_tenant else f"token URL {c.oauth_token_url}"
    scopes = " ".join(oauth["scopes"]) or "none"
    return f"oauth2 (client {c.oauth_client_id}, {where}, scopes {scopes}, secret {oauth['client_secret']})"
