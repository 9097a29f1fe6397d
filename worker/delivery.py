"""The body of the Dramatiq actor: claim the rows of one broker message, then, for each
message on its own, resolve its connector, send it and hand its outcome to the completer,
which writes it under the lease within milliseconds of the SMTP reply. Whatever one
message raises becomes that message's outcome, never its siblings'.

`Delivery` orchestrates one message; the steps around it have their own modules: the claim
(worker/claim.py), the configuration it reads (worker/config_cache.py), the row made into an
email (worker/prepare.py), the connector's health (worker/connector_health.py) and the
outcome as `finish_attempts` takes it (worker/outcomes.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import psycopg_pool

from outbox import logs
from outbox.config import Config
from outbox.connections import pg_kwargs
from outbox.core.policy import Verdict, decide, is_connector_problem, waiting
from outbox.core.resolve import Connector, Route, resolve
from outbox.core.settings import Settings
from outbox.store.sql import queries
from worker import metrics
from worker.claim import Batch, claim
from worker.completer import Completer
from worker.config_cache import ConfigCache
from worker.connector_health import ConnectorHealth, throttled
from worker.db import db_retry
from worker.leases import Flight, Leases
from worker.limiter import Limiter, Seats, Slot
from worker.outcomes import (
    Result,
    after_send,
    crashed,
    decided,
    finish_params,
    not_built,
    refusal,
    unrouted,
)
from worker.prepare import Unbuildable, checked, content, envelope
from worker.transport import ConnectorPool, Outcome, Transport

Q = queries("worker")
log = logs.get("outbox.worker")

# A message whose connector's rate limit has a slot this close waits for it in its own
# coroutine (holding its row); a later slot sends it back to the queue until then.
LIMIT_WAIT_SECONDS = 2.0
# A message that found every session of its connector's `--max-connections` taken (by other
# workers) for that long is due again this soon.
SEAT_RETRY_SECONDS = 1.0
# A wait for a rate-limit slot longer than this is the limit binding (counted and shown).
PACED_SECONDS = 0.001
# From addresses whose route a worker process remembers between configuration reads.
ROUTES_KEPT = 10_000


def limit_wait_seconds(settings: Settings) -> float:
    """How long a message may wait in the worker for its rate limit: short against its lease."""
    return min(LIMIT_WAIT_SECONDS, settings.lease_seconds / 4)


class Delivery:
    """One per worker process, living on Dramatiq's asyncio event loop."""

    def __init__(self, config: Config, pool: psycopg_pool.AsyncConnectionPool) -> None:
        self.config = config
        self.pool = pool
        self.completer = Completer(self._write)
        self.leases = Leases(self._renew)
        self.limiter = Limiter(config.redis_url, config.redis_namespace)
        self.transport = Transport(local_hostname=config.local_hostname, seats=Seats(self.limiter))
        self.configs = ConfigCache(on_reload=self.limiter.reloaded)
        self.health = ConnectorHealth(pool, self.configs, self.limiter)
        self._writer_conn: psycopg.AsyncConnection[Any] | None = None
        # Routes by From address, for one list of connectors (a re-read makes a new list).
        self._routes: dict[str, Route] = {}
        self._routes_of: list[Connector] | None = None

    @classmethod
    async def open(cls, config: Config) -> Delivery:
        pool = psycopg_pool.AsyncConnectionPool(
            config.database_url,
            min_size=1,
            max_size=max(4, config.worker_threads + 2),
            kwargs={"autocommit": True, **pg_kwargs(config.database_url)},
            open=False,
            name="outbox-worker",
        )
        await pool.open(wait=False)
        delivery = cls(config, pool)
        with contextlib.suppress(psycopg.OperationalError):  # else opened at the first outcome
            await delivery._writer()
        return delivery

    async def aclose(self) -> None:
        await self.completer.aclose()
        if self._writer_conn is not None:
            await self._writer_conn.close()
        await self.leases.aclose()
        await self.transport.aclose()
        await self.limiter.aclose()
        await self.pool.close()

    async def run(self, handed: Sequence[Sequence[Any]]) -> None:
        """Deliver the rows of one broker message: [[id, dispatch_token], ...]. Each outcome
        is written as its message finishes; this returns (and the broker message is acked)
        once all are written."""
        batch = await claim(self.pool, self.leases, self.configs, handed)
        if batch is None:
            return
        await asyncio.gather(*(self._one(row, batch) for row in batch.rows))

    async def _one(self, row: dict[str, Any], batch: Batch) -> None:
        """One message, isolated: whatever it raises becomes its own outcome."""
        flight = batch.flights[row["id"]]
        started = datetime.now(UTC)
        try:
            try:
                result = await self._deliver(row, batch, flight, started)
            except Unbuildable as exc:
                result = not_built(row, batch.settings, str(exc), started)
            except Exception as exc:
                log.exception("delivery failed unexpectedly; the message will be retried", message=row["id"])
                result = crashed(row, batch, exc, started)
            written = await self.completer.submit(result.params)
        finally:
            self.leases.release(flight)
        self._report(result, written)

    async def _deliver(self, row: dict[str, Any], batch: Batch, flight: Flight, started: datetime) -> Result:
        settings = batch.settings
        attachments = batch.attachments.get(row["id"], ())
        row = checked(row, attachments)
        route = self._route(row["from_addr"], batch.connectors)
        if route.action != "send":
            return unrouted(row, route, started)
        connector = route.connector
        assert connector is not None
        settled = batch.settled.get(row["id"], {})
        recipients = [a for a in envelope(row, settings) if a.lower() not in settled]
        pool: ConnectorPool | None = None
        held: list[Slot] = []  # the limiter's answer when it refused the message
        if connector.backoff_until is not None and connector.backoff_until > started:
            # The connector is resting after failures to reach or log in to it.
            outcome = Outcome(
                phase="connect",
                error=f"connector {connector.name} is backing off after: {connector.last_error}",
            )
            outcome.verdicts = dict.fromkeys(recipients, Verdict.TRANSIENT)
        elif recipients:
            data = content(row, attachments, settings)
            pool = self.transport.pool(
                connector,
                timeout=settings.smtp_timeout_seconds,
                dot_timeout=settings.smtp_dot_timeout_seconds,
            )
            if pool.rest_until is not None and self.configs.loaded_at > pool.rested_at:
                pool.wake()  # configuration read after the rest began shows no backoff any more
            outcome = await pool.send(
                row["from_addr"],
                recipients,
                data,
                before_data=lambda: self._before_data(row, flight, settings),
                on_phase=flight.set_phase,
                admit=lambda: self._admit(connector, flight, settings, held),
                seat_wait=limit_wait_seconds(settings),
            )
            if outcome.not_admitted:
                return self._waiting(row, connector, held[0] if held else None, settings, started, outcome)
        else:  # every recipient was settled by earlier attempts
            outcome = Outcome(phase="rcpt")
        connector_problem = is_connector_problem(outcome.phase, outcome.verdicts)
        retry_at = connector.backoff_until if connector_problem else None
        if connector_problem and not (connector.backoff_until and connector.backoff_until > started):
            if outcome.rested_after is not None and pool is not None and pool.rest_until is not None:
                retry_at = pool.rest_until
            else:
                cause = outcome.rested_after or outcome.summary
                retry_at = await self.health.failed(connector, cause, settings, pool)
        elif not connector_problem and (connector.failures or connector.backoff_until):
            await self.health.recovered(connector)
        slow_down = throttled(outcome)
        if slow_down:
            metrics.THROTTLED.labels(connector.name).inc()
            await self.health.throttled(connector, outcome)
        decision = decide(
            verdicts=outcome.verdicts,
            settled=settled,
            attempts=row["attempts"],
            created_at=row["round_started_at"],  # a replay starts a fresh round
            now=datetime.now(UTC),
            settings=settings,
            summary=outcome.summary,
            refused={a: refusal(outcome, a) for a, v in outcome.verdicts.items() if v is Verdict.PERMANENT},
            connector_problem=connector_problem,
            connector_retry_at=retry_at,
            throttled=slow_down,
        )
        return after_send(row, connector, outcome, decision, started)

    def _route(self, from_addr: str, connectors: list[Connector]) -> Route:
        """`resolve`, remembered until the connectors are read again (or many senders later)."""
        if connectors is not self._routes_of or len(self._routes) >= ROUTES_KEPT:
            self._routes, self._routes_of = {}, connectors
        route = self._routes.get(from_addr)
        if route is None:
            route = self._routes[from_addr] = resolve(from_addr, connectors)
        return route

    async def _before_data(self, row: dict[str, Any], flight: Flight, settings: Settings) -> bool:
        """Still ours, with lease enough for the content and the final dot? Checked before any
        content goes out. With ambiguous-policy `hold` the phase is recorded first, so a worker
        lost after this point is known to be ambiguous."""
        if not flight.may_send_data():
            return False
        if settings.ambiguous_policy != "hold":
            return True
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                Q["set_phase"], {"id": row["id"], "lease_token": row["lease_token"], "phase": "data"}
            )
            return cur.rowcount == 1

    async def _admit(
        self, connector: Connector, flight: Flight, settings: Settings, held: list[Slot]
    ) -> bool:
        """The connector's rate limits, asked just before MAIL: a slot moments away is waited
        for here (this message's coroutine only); a later one refuses (kept in `held`). The
        connector as last read (a slow-down recorded since its batch was claimed applies)."""
        connector = self.configs.by_id.get(connector.id, connector)
        slot = await self.limiter.reserve(connector, max_wait_seconds=limit_wait_seconds(settings))
        if not slot.taken:
            held.append(slot)
            return False
        if slot.wait_seconds > PACED_SECONDS:
            flight.set_phase("waiting")
            metrics.RATE_LIMITED.labels(connector.name, "paced").inc()
            waiting = metrics.RATE_LIMIT_WAITING.labels(connector.name)
            waiting.inc()
            try:
                await asyncio.sleep(slot.wait_seconds)
            finally:
                waiting.dec()
        elif slot.wait_seconds > 0:  # a slot moments away: no limit binds
            await asyncio.sleep(slot.wait_seconds)
        return True

    @staticmethod
    def _waiting(
        row: dict[str, Any],
        connector: Connector,
        slot: Slot | None,
        settings: Settings,
        started: datetime,
        outcome: Outcome,
    ) -> Result:
        """Back to the queue until the connector's rate limit has room (`slot`: due a little
        before the window opens, so the next ones are waiting in the worker when it does), or
        until a session is likely to be free (`--max-connections` across workers: due in
        SEAT_RETRY_SECONDS): no attempt spent, what it waits for and until when on the row."""
        now = datetime.now(UTC)
        if slot is not None:
            until = now + timedelta(seconds=slot.wait_seconds)
            due = until - timedelta(seconds=limit_wait_seconds(settings) / 2)
            what, kind = slot.waits_for, "deferred"
        else:
            until = due = now + timedelta(seconds=SEAT_RETRY_SECONDS)
            what, kind = outcome.waiting_for or "a connection", "no-connection"
        decision = waiting(
            attempts=row["attempts"],
            created_at=row["round_started_at"],
            now=now,
            settings=settings,
            until=max(now, due),
            reason=f"waiting for {what} until {until.isoformat(timespec='seconds')}",
        )
        metrics.RATE_LIMITED.labels(connector.name, kind).inc()
        return decided(row, connector, "waiting", decision, started, {})

    async def _write(self, outcomes: Sequence[Mapping[str, Any]]) -> set[int]:
        """The completer's writer: outcomes in one round trip, each only while this worker
        still holds that row's lease. Retried for as long as a lease lasts; past it the row is
        re-dispatched by the poller anyway."""
        params = finish_params(outcomes)
        async for attempt in db_retry(self.configs.settings.lease_seconds):
            with attempt:
                conn = await self._writer()
                try:
                    cur = await conn.execute(Q["finish_attempts"], params)
                    return {row[0] for row in await cur.fetchall()}
                except psycopg.OperationalError:
                    await conn.close()
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _writer(self) -> psycopg.AsyncConnection[Any]:
        """The completer's own connection, opened with the process: outcomes never wait for a
        pooled connection behind claims, nor for a connection to be made."""
        if self._writer_conn is None or self._writer_conn.closed:
            self._writer_conn = await psycopg.AsyncConnection.connect(
                self.config.database_url, autocommit=True, **pg_kwargs(self.config.database_url)
            )
        return self._writer_conn

    async def _renew(self, flights: list[Flight], lease_seconds: float) -> set[int]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                Q["renew_leases"],
                {
                    "ids": [f.id for f in flights],
                    "tokens": [f.token for f in flights],
                    "phases": [f.phase for f in flights],
                    "lease_seconds": lease_seconds,
                },
            )
            return {row[0] for row in await cur.fetchall()}

    @staticmethod
    def _report(result: Result, written: bool) -> None:
        p = result.params
        if p["connector_name"] is not None and p["outcome"] not in ("held", "waiting"):
            metrics.observe_send(p["connector_name"], p["status"], result.smtp_code, result.seconds)
        if not written:
            metrics.STALE_DELIVERIES.inc()
            log.warning(
                "lease lost before the outcome was written; row left to its new owner",
                message=p["id"],
                status=p["status"],
            )
            return
        # successes are the hot path: debug; anything else is worth a line at info
        (log.debug if p["status"] == "sent" or p["outcome"] == "waiting" else log.info)(
            "attempt finished",
            message=p["id"],
            attempt=result.row["attempts"],
            connector=p["connector_name"],
            status=p["status"],
            phase=p["phase"],
            smtp_code=p["smtp_code"],
            error=p["last_error"],
        )
