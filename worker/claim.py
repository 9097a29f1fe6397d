"""Claiming the rows of one broker message: the `claim` statement takes the rows this worker
may send (fencing out stale or duplicate broker deliveries) and starts their leases; then
the rows are read, with the configuration's version, in one round trip that holds no locks,
along with what building and resuming them needs (attachments, recipients settled before)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg_pool
from psycopg.rows import dict_row

from outbox.core.message import Attachment
from outbox.core.resolve import Connector
from outbox.core.settings import Settings
from outbox.store.sql import queries
from worker import metrics
from worker.config_cache import ConfigCache
from worker.db import array_literal, db_retry
from worker.leases import Flight, Leases

Q = queries("worker")
# The configuration's version, on each row `claimed` returns (see ConfigCache.get).
CONFIG_VERSION = ("connectors_changed_at", "connectors", "settings_changed_at")


@dataclass
class Batch:
    rows: list[dict[str, Any]]
    connectors: list[Connector]
    settings: Settings
    attachments: dict[int, list[Attachment]]
    settled: dict[int, dict[str, str]]
    flights: dict[int, Flight]


async def claim(
    pool: psycopg_pool.AsyncConnectionPool,
    leases: Leases,
    configs: ConfigCache,
    handed: Sequence[Sequence[Any]],
) -> Batch | None:
    """The rows of `handed` ([[id, dispatch_token], ...]) that are this worker's now, leased;
    None when none is (all stale or already taken)."""
    ids = [int(i) for i, _ in handed]
    tokens = [str(t) for _, t in handed]
    # The claim is one statement that commits on its own (see `claim`); the rows are read
    # after it, with the config version, in one round trip that holds no locks.
    async for attempt in db_retry(60):
        with attempt:
            async with pool.connection() as conn:
                if configs.version is None:  # first batch of this process: its lease setting
                    async with conn.cursor(row_factory=dict_row) as dcur:
                        await configs.get(dcur)
                lease_seconds = configs.settings.lease_seconds
                sent_at = time.monotonic()  # the leases start after this, not before
                cur = await conn.execute(
                    Q["claim"],
                    {
                        "ids": array_literal(ids),
                        "tokens": array_literal(tokens),
                        "lease_seconds": lease_seconds,
                    },
                )
                claimed = await cur.fetchall()
    metrics.STALE_DELIVERIES.inc(len(ids) - len(claimed))
    if not claimed:
        return None
    flights = leases.track([(i, t) for i, t in claimed], sent_at, lease_seconds)
    mine = {"ids": array_literal(i for i, _ in claimed), "tokens": array_literal(t for _, t in claimed)}
    try:
        async for attempt in db_retry(60):
            with attempt:
                async with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
                    rows = await (await cur.execute(Q["claimed"], mine)).fetchall()
                    if not rows:
                        break
                    version = tuple(rows[0][k] for k in CONFIG_VERSION)
                    settings, connectors = await configs.get(cur, version)
                    attachments, settled = await _extras(cur, rows)
    except BaseException:
        for f in flights.values():
            leases.release(f)
        raise
    for i in set(flights) - {r["id"] for r in rows}:
        leases.release(flights[i])
    if not rows:
        return None
    return Batch(rows, connectors, settings, attachments, settled, flights)


async def _extras(
    cur: psycopg.AsyncCursor[Any], rows: list[dict[str, Any]]
) -> tuple[dict[int, list[Attachment]], dict[int, dict[str, str]]]:
    """Attachments of messages that must be built here, and recipients settled before."""
    attachments: dict[int, list[Attachment]] = {}
    build_here = [r["id"] for r in rows if r["content"] is None and r["has_attachments"]]
    if build_here:
        await cur.execute(Q["attachments_of"], {"ids": build_here})
        for a in await cur.fetchall():
            attachments.setdefault(a["message_id"], []).append(
                Attachment(
                    filename=a["filename"], content=bytes(a["content"]), content_type=a["content_type"]
                )
            )
    settled: dict[int, dict[str, str]] = {}
    retried = [r["id"] for r in rows if r["attempts"] > 1 or r["replays"]]
    if retried:
        await cur.execute(Q["finished_recipients_of"], {"ids": retried})
        for s in await cur.fetchall():
            settled.setdefault(s["message_id"], {})[s["addr"].lower()] = s["status"]
    return attachments, settled
