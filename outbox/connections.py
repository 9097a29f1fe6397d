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
