"""The worker's copy of settings and connectors. Re-read as soon as an operator changes them
(their version is read with every claimed row, in the same statement) and at least every
TTL_SECONDS (the health columns other worker processes write: backoff, slow-down)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg

from outbox.core.resolve import Connector
from outbox.core.settings import Settings
from outbox.store.sql import queries
from worker import metrics

Q = queries("worker")

TTL_SECONDS = 1.0


class ConfigCache:
    def __init__(self, on_reload: Callable[[float], None] | None = None) -> None:
        # Told the monotonic time each re-read began (the limiter forgets the slow-downs
        # recorded before it: what was read holds them, or an operator ended them).
        self.on_reload = on_reload
        self.loaded_at = -TTL_SECONDS  # monotonic time of the last read
        self.version: tuple[Any, ...] | None = None
        self.settings = Settings()
        self.connectors: list[Connector] = []
        # Connectors by id, updated in place: holders of this dict see every re-read.
        self.by_id: dict[int, Connector] = {}

    async def get(
        self, cur: psycopg.AsyncCursor[Any], version: tuple[Any, ...] | None = None
    ) -> tuple[Settings, list[Connector]]:
        """Settings and connectors, re-read when an operator changed them (`version`, read
        with the claimed rows, moved) or, for the workers' own health columns, at most
        TTL_SECONDS late. `cur` must return dict rows."""
        started = time.monotonic()
        stale = started - self.loaded_at >= TTL_SECONDS
        if stale or version != self.version:
            settings = await (await cur.execute(Q["settings"])).fetchone() or {}
            rows = await (await cur.execute(Q["connectors"])).fetchall()
            # the version of what was read, as the `claimed` statement computes it
            version = (
                max((r["updated_at"] for r in rows), default=None),
                len(rows),
                settings.get("updated_at"),
            )
            self.settings = Settings.model_validate(settings)
            self.connectors = [Connector.from_row(r) for r in rows]
            self.by_id.clear()
            self.by_id.update((c.id, c) for c in self.connectors)
            if self.on_reload is not None:
                self.on_reload(started)
            metrics.show_limits(self.connectors)
            self.loaded_at, self.version = started, version
        return self.settings, self.connectors

    def expire(self) -> None:
        """Re-read with the next claim: this process just changed a connector's health."""
        self.loaded_at = -TTL_SECONDS
