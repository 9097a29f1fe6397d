"""What messages tell the worker about their connector, written where every worker reads it:
a connector that cannot be reached or logged in to backs off (and rests its pool in this
process), one that works again recovers, and a throttling reply slows it down for all."""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg
import psycopg_pool

from outbox import logs
from outbox.core import limits
from outbox.core.policy import Verdict, is_throttling
from outbox.core.resolve import Connector
from outbox.core.settings import Settings
from outbox.store.sql import queries
from worker.config_cache import ConfigCache
from worker.db import db_retry
from worker.limiter import Limiter
from worker.transport import ConnectorPool, Outcome

Q = queries("worker")
log = logs.get("outbox.worker")


def throttled(outcome: Outcome) -> bool:
    """Did the server refuse (some of) this message to slow us down? Its final reply, or the
    reply to a recipient left pending."""
    if is_throttling(outcome.code, outcome.reply):
        return True
    return any(
        is_throttling(*outcome.replies.get(a, (None, None)))
        for a, v in outcome.verdicts.items()
        if v is Verdict.TRANSIENT
    )


class ConnectorHealth:
    """Each change is written once per window (backoff) or reaction time (slow-down), however
    many messages report it; the configuration cache is expired so this process's next batch
    sees it at once."""

    def __init__(
        self, pool: psycopg_pool.AsyncConnectionPool, configs: ConfigCache, limiter: Limiter
    ) -> None:
        self.pool = pool
        self.configs = configs
        self.limiter = limiter

    async def failed(
        self, connector: Connector, error: str, settings: Settings, pool: ConnectorPool | None
    ) -> datetime:
        """Back the connector off in Postgres and rest its pool in this process until then;
        returns when it is due again."""
        async for attempt in db_retry(30):
            with attempt:
                async with self.pool.connection() as conn:
                    cur = await conn.execute(
                        Q["connector_failed"],
                        {
                            "id": connector.id,
                            "error": error[:1000],
                            "base_seconds": settings.retry_base_seconds,
                            "max_seconds": settings.retry_max_seconds,
                        },
                    )
                    row = await cur.fetchone()
        until = row[0] if row and row[0] else datetime.now(UTC)
        if pool is not None:
            pool.rest(until, error)
        self.configs.expire()
        if row and row[1]:
            log.warning("connector failing; backing off", connector=connector.name, error=error, until=until)
        return until

    async def recovered(self, connector: Connector) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(Q["connector_recovered"], {"id": connector.id})
        self.configs.expire()
        log.info("connector recovered", connector=connector.name)

    async def throttled(self, connector: Connector, outcome: Outcome) -> None:
        """A throttling reply: slow the connector down for every worker (its spacing between
        sends doubles, then recovers by half every 30 s: outbox/core/limits.py)."""
        rates = limits.parse_rates(connector.rate_limits)
        try:
            async with self.pool.connection() as conn:
                cur = await conn.execute(
                    Q["connector_throttled"],
                    {
                        "id": connector.id,
                        "first": limits.first_slowdown(rates),
                        "max": limits.THROTTLE_MAX_INTERVAL,
                        "half_life": limits.THROTTLE_HALF_LIFE_SECONDS,
                        "reply": outcome.summary[:500],
                    },
                )
                row = await cur.fetchone()
        except psycopg.Error as exc:  # the message's own outcome matters more: carry on
            log.warning("could not record a throttling slow-down", connector=connector.name, error=str(exc))
            return
        if row is not None:
            self.limiter.slowed_here(connector, row[0])  # this process slows down at once
            self.configs.expire()
            log.warning(
                "connector throttling; slowing down",
                connector=connector.name,
                rate=limits.per_second(row[0]),
                reply=outcome.summary,
            )
