"""How the worker rides out a database that restarts or drops connections: short in-process
retries of the statements that must get through (claims, outcomes, connector backoff)."""

from __future__ import annotations

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
