"""How the poller and workers connect to Postgres and Redis: the one place that sets the
timeouts and keepalives, so that no peer (a dead server, a half-open socket behind a
firewall, a blackholed address) can hang them forever."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis

# -- Postgres -------------------------------------------------------------------------------

PG_CONNECT_TIMEOUT_SECONDS = 10
# TCP keepalives: a connection whose peer vanished (machine lost, NAT state dropped) is
# noticed after about idle + interval * count = 30 + 10 * 3 = 60 s instead of hours.
PG_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
# The poller holds row locks while it hands a batch to Redis inside a transaction: if it
# stalls there (stopped, or stuck past the Redis socket timeout), Postgres ends its session
# and releases the rows. Longer than any broker round trip may take (REDIS_OPTIONS).
POLLER_IDLE_IN_TRANSACTION_SECONDS = 30


def pg_kwargs(database_url: str) -> dict[str, Any]:
    """Connection parameters for every long-lived connection of the poller and the workers
    (`psycopg.connect(url, **pg_kwargs(url))`, or a pool's `kwargs`): the defaults above, for
    each one the URL does not set itself."""
    defaults: dict[str, Any] = {"connect_timeout": PG_CONNECT_TIMEOUT_SECONDS, **PG_KEEPALIVES}
    try:
        given = psycopg.conninfo.conninfo_to_dict(database_url)
    except psycopg.ProgrammingError:
        given = {}  # connecting will say what is wrong with it
    return {key: value for key, value in defaults.items() if key not in given}


def connect_poller(database_url: str) -> psycopg.Connection[Any]:
    """An autocommit connection for the poller, with the idle-in-transaction timeout set by
    a statement (a startup `options` parameter would be refused by PgBouncer)."""
    conn = psycopg.connect(database_url, autocommit=True, **pg_kwargs(database_url))
    try:
        conn.execute(
            "SELECT set_config('idle_in_transaction_session_timeout', %s, false)",
            [f"{POLLER_IDLE_IN_TRANSACTION_SECONDS}s"],
        )
    except BaseException:
        conn.close()
        raise
    return conn


PG_SCHEMES = ("postgresql", "postgres")
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def check_database_url(url: str) -> None:
    """Raise ValueError (one line, no password) for a URL or connection string libpq cannot
    use as given; found before connecting, so a typo is not mistaken for an outage."""
    scheme = url.split("://", 1)[0] if "://" in url else None
    if scheme is not None and scheme not in PG_SCHEMES:
        raise ValueError(f"unknown scheme {scheme + '://'!r} (expected postgresql://)")
    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
        raise ValueError(reason.replace(url, redact_url(url))) from None
    for port in str(params.get("port") or "").split(","):
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"port {port!r} is not a port number")
    for key in ("connect_timeout", "keepalives", "keepalives_idle", "keepalives_interval"):
        value = params.get(key)
        if value is not None and not str(value).lstrip("-").isdigit():
            raise ValueError(f"{key} {value!r} is not a number")
    sslmode = params.get("sslmode")
    if sslmode is not None and sslmode not in SSLMODES:
        raise ValueError(f"sslmode {sslmode!r} is not one of {', '.join(SSLMODES)}")


# -- Redis ----------------------------------------------------------------------------------

# Dramatiq's Redis consumer never blocks in Redis: it fetches with a Lua script and sleeps on
# the client side when the queue is empty (its poll wait, `CONSUMER_POLL_MS` in runner.py, is
# spent in `time.sleep`). So a reply slower than a few seconds means a hung peer; the socket
# timeout only has to exceed the slowest script (the occasional maintenance pass).
REDIS_OPTIONS: dict[str, Any] = {
    "socket_timeout": 10,
    "socket_connect_timeout": 5,
    "socket_keepalive": True,
    # A pooled connection idle this long is PINGed before it is used again.
    "health_check_interval": 30,
}


def redis_client(url: str) -> redis.Redis:
    """A Redis client with the timeouts above. (Passing them to `RedisBroker(url=...)` as
    keyword arguments would not work: with a URL, Dramatiq builds the connection pool from the
    URL alone and redis-py ignores connection options next to a pool.)"""
    return redis.Redis.from_url(url, **REDIS_OPTIONS)


def check_redis_url(url: str) -> None:
    """Raise ValueError (one line, no password) for a Redis URL redis-py cannot use."""
    try:
        redis.ConnectionPool.from_url(url)
    except ValueError as exc:
        raise ValueError(str(exc).replace(url, redact_url(url))) from None


def redact_url(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
    except ValueError:
        return "<unparseable URL>"
