"""How the worker rides out a database that restarts or drops connections: short in-process
retries of the statements that must get through (claims, outcomes, connector backoff)."""

from __future__ import annotations

import re
from collections.abc import Iterable

import psycopg
import psycopg_pool
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

DB_ERRORS = (psycopg.OperationalError, psycopg_pool.PoolTimeout)


def db_retry(seconds: float) -> AsyncRetrying:
    """Retries for up to `seconds` of a connection-level error, with jittered backoff."""
    return AsyncRetrying(
        stop=stop_after_delay(seconds),
        wait=wait_exponential(multiplier=0.1, max=5) + wait_random(0, 0.2),
        retry=retry_if_exception_type(DB_ERRORS),
        reraise=True,
    )


_ID_OR_UUID = r"(?:\d+|[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12})"
_IDS_OR_UUIDS = re.compile(rf"\{{(?:{_ID_OR_UUID}(?:,{_ID_OR_UUID})*)?\}}")


def array_literal(values: Iterable[int | str]) -> str:
    """Ids or UUIDs as one Postgres array literal, for `%(x)s::bigint[]` or `::uuid[]`: a claim
    sends two arrays of up to 100, and psycopg's list dumper costs about a microsecond per
    element; this is one join. Anything but one id or UUID per value (a token that came from
    the broker) raises ValueError: nothing else can change how the literal is read."""
    items = [str(v) for v in values]
    literal = "{" + ",".join(items) + "}"
    elements = literal.count(",") + 1 if len(literal) > 2 else 0
    if elements != len(items) or not _IDS_OR_UUIDS.fullmatch(literal):
        raise ValueError(f"not ids or UUIDs: {literal[:200]!r}")
    return literal
