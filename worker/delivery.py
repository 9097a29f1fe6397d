"""The body of the Dramatiq actor: claim the rows of one broker message, then, for each
message on its own, resolve its connector, send it and hand its outcome to the completer,
which writes it under the lease within milliseconds of the SMTP reply. Whatever one
message raises becomes that message's outcome, never its siblings'."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import psycopg_pool
from psycopg.rows import dict_row
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from outbox import logs
from outbox.config import Config
from outbox.connections import pg_kwargs
from outbox.core import limits
from outbox.core.errors import ValidationError
from outbox.core.message import Attachment, build, check_envelope, check_row, render
from outbox.core.policy import (
    Decision,
    Verdict,
    decide,
    is_connector_problem,
    is_throttling,
    unbuildable,
    waiting,
)
from outbox.core.resolve import Connector, Route, resolve
from outbox.core.settings import Settings
from outbox.store.sql import queries
from worker import metrics
from worker.completer import Completer, finish_params
from worker.leases import Flight, Leases
from worker.limiter import Limiter, Seats, Slot
from worker.transport import ConnectorPool, Outcome, Transport

Q = queries("worker")
log = logs.get("outbox.worker")

DB_ERRORS = (psycopg.OperationalError, psycopg_pool.PoolTimeout)
# Settings and connectors are re-read as soon as an operator changes them (their version is
# checked with every claim, in the same round trip), and at least this often (backoff state
# written by other worker processes).
CONFIG_TTL_SECONDS = 1.0
# A message whose connector's rate limit has a slot this close waits for it in its own
# coroutine (holding its row); a later slot sends it back to the queue until then.
LIMIT_WAIT_SECONDS = 2.0
# A message that found every session of its connector's `--max-connections` taken (by other
# workers) for that long is due again this soon.
SEAT_RETRY_SECONDS = 1.0
# A wait for a rate-limit slot longer than this is the limit binding (counted and shown).
PACED_SECONDS = 0.001


def limit_wait_seconds(settings: Settings) -> float:
    """How long a message may wait in the worker for its rate limit: short against its lease."""
    return min(LIMIT_WAIT_SECONDS, settings.lease_seconds / 4)


def db_retry(seconds: float) -> AsyncRetrying:
    """Short in-process retries for a database that restarts or drops connections."""
    return AsyncRetrying(
        stop=stop_after_delay(seconds),
        wait=wait_exponential(multiplier=0.1, max=5) + wait_random(0, 0.2),
        retry=retry_if_exception_type(DB_ERRORS),
        reraise=True,
    )


def envelope(row: Mapping[str, Any], settings: Settings) -> list[str]:
    """Envelope recipients: the message's own, or the test-environment overrides, plus the
    additional BCC. Case-insensitively unique, in order."""
    if settings.overrides_active:
        addrs = [*settings.override_to, *settings.override_cc, *settings.override_bcc]
    else:
        addrs = [*row["to_addrs"], *row["cc_addrs"], *row["bcc_addrs"]]
    addrs += settings.additional_bcc
    seen: dict[str, str] = {}
    for a in addrs:
        if isinstance(a, str):  # a SQL writer's NULL in an array is nobody (the row fails)
            seen.setdefault(a.lower(), a)
    return list(seen.values())


class Unbuildable(Exception):
    """A message whose row cannot be made into MIME (bad data written by SQL: anything
    `enqueue` would have refused, or what the MIME builder refuses): building it again gives
    the same error, so it fails at once with the reason, and no server hears of it."""


def checked(row: dict[str, Any], attachments: Sequence[Attachment]) -> dict[str, Any]:
    """The row as enqueue would have written it, or Unbuildable. A row the worker builds
    (inserted by SQL, or too large to keep its content) goes through enqueue's whole
    validator; one with content rendered at enqueue has its envelope checked again."""
    try:
        return check_envelope(row) if row["content"] is not None else check_row(row, attachments)
    except ValidationError as exc:
        raise Unbuildable(str(exc)) from exc


@dataclass
class Batch:
    rows: list[dict[str, Any]]
    connectors: list[Connector]
    settings: Settings
    attachments: dict[int, list[Attachment]]
    settled: dict[int, dict[str, str]]
    flights: dict[int, Flight]


@dataclass
class Result:
    """One attempt's outcome, ready for `finish_attempts` (see finish_params)."""

    row: dict[str, Any]
    params: dict[str, Any]
    seconds: float = 0.0
    smtp_code: int | None = None


class Delivery:
    """One per worker process, living on Dramatiq's asyncio event loop."""

    def __init__(self, config: Config, pool: psycopg_pool.AsyncConnectionPool) -> None:
        self.config = config
        self.pool = pool
        self.completer = Completer(self._write)
        self.leases = Leases(self._renew)
        self.limiter = Limiter(config.redis_url, config.redis_namespace)
        self.transport = Transport(local_hostname=config.local_hostname, seats=Seats(self.limiter))
        self._loaded_at = -CONFIG_TTL_SECONDS
        self._version: tuple[Any, ...] | None = None
        self._settings = Settings()
        self._connectors: list[Connector] = []
        self._by_id: dict[int, Connector] = {}
        self._writer_conn: psycopg.AsyncConnection[Any] | None = None

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
        batch = await self._claim(handed)
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
                result = self._unbuildable(row, batch.settings, str(exc), started)
            except Exception as exc:
                log.exception("delivery failed unexpectedly; the message will be retried", message=row["id"])
                result = self._crashed(row, batch, exc, started)
            written = await self.completer.submit(result.params)
        finally:
            self.leases.release(flight)
        self._report(result, written)

    async def _config(
        self, cur: psycopg.AsyncCursor[Any], version: tuple[Any, ...] | None = None
    ) -> tuple[Settings, list[Connector]]:
        """Settings and connectors, re-read when an operator changed them (their version moved)
        or, for the workers' own health columns, at most CONFIG_TTL_SECONDS late."""
        started = time.monotonic()
        stale = started - self._loaded_at >= CONFIG_TTL_SECONDS
        if stale or version != self._version:
            if version is None or stale:
                version = tuple((await (await cur.execute(Q["config_version"])).fetchone() or {}).values())
            self._settings = Settings.model_validate(
                await (await cur.execute(Q["settings"])).fetchone() or {}
            )
            self._connectors = [
                Connector.from_row(r) for r in await (await cur.execute(Q["connectors"])).fetchall()
            ]
            self._by_id = {c.id: c for c in self._connectors}
            self.limiter.reloaded(started)
            metrics.show_limits(self._connectors)
            self._loaded_at, self._version = started, version
        return self._settings, self._connectors

    async def _claim(self, handed: Sequence[Sequence[Any]]) -> Batch | None:
        ids = [int(i) for i, _ in handed]
        tokens = [str(t) for _, t in handed]
        # The claim is one statement that commits on its own (see `claim`); the rows are read
        # after it, with the config version, in one round trip that holds no locks.
        async for attempt in db_retry(60):
            with attempt:
                async with self.pool.connection() as conn:
                    if self._version is None:  # first batch of this process: its lease setting
                        async with conn.cursor(row_factory=dict_row) as dcur:
                            await self._config(dcur)
                    lease_seconds = self._settings.lease_seconds
                    sent_at = time.monotonic()  # the leases start after this, not before
                    cur = await conn.execute(
                        Q["claim"], {"ids": ids, "tokens": tokens, "lease_seconds": lease_seconds}
                    )
                    claimed = await cur.fetchall()
        metrics.STALE_DELIVERIES.inc(len(ids) - len(claimed))
        if not claimed:
            return None
        flights = self.leases.track([(i, t) for i, t in claimed], sent_at, lease_seconds)
        mine = {"ids": [i for i, _ in claimed], "tokens": [t for _, t in claimed]}
        try:
            async for attempt in db_retry(60):
                with attempt:
                    async with (
                        self.pool.connection() as conn,
                        conn.cursor(row_factory=dict_row) as cur,
                        conn.cursor(row_factory=dict_row) as vcur,
                    ):
                        async with conn.pipeline():
                            await vcur.execute(Q["config_version"])
                            await cur.execute(Q["claimed"], mine)
                        version = tuple((await vcur.fetchone() or {}).values())
                        rows = await cur.fetchall()
                        settings, connectors = await self._config(cur, version)
                        attachments, settled = await self._extras(cur, rows)
        except BaseException:
            for f in flights.values():
                self.leases.release(f)
            raise
        for i in set(flights) - {r["id"] for r in rows}:
            self.leases.release(flights[i])
        if not rows:
            return None
        return Batch(rows, connectors, settings, attachments, settled, flights)

    @staticmethod
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

    async def _deliver(self, row: dict[str, Any], batch: Batch, flight: Flight, started: datetime) -> Result:
        settings = batch.settings
        row = checked(row, batch.attachments.get(row["id"], ()))
        route = resolve(row["from_addr"], batch.connectors)
        if route.action != "send":
            return self._unrouted(row, route, started)
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
            content = row["content"]
            if content is None:  # inserted by SQL, or too large to keep: build it now
                try:
                    content = render(build(row, batch.attachments.get(row["id"], ()), date=row["created_at"]))
                except Exception as exc:
                    raise Unbuildable(f"{type(exc).__name__}: {exc}") from exc
            if len(content) > settings.max_message_bytes and not row["system_generated"]:
                raise Unbuildable(  # as enqueue refuses it
                    f"message is {len(content)} bytes, over the maximum email size of "
                    f"{settings.max_message_bytes} bytes"
                )
            pool = self.transport.pool(
                connector,
                timeout=settings.smtp_timeout_seconds,
                dot_timeout=settings.smtp_dot_timeout_seconds,
            )
            if pool.rest_until is not None and self._loaded_at > pool.rested_at:
                pool.wake()  # configuration read after the rest began shows no backoff any more
            outcome = await pool.send(
                row["from_addr"],
                recipients,
                bytes(content),
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
                retry_at = await self._connector_failed(connector, cause, settings, pool)
        elif not connector_problem and (connector.failures or connector.backoff_until):
            await self._connector_recovered(connector)
        slow_down = throttled(outcome)
        if slow_down:
            metrics.THROTTLED.labels(connector.name).inc()
            await self._throttled(connector, outcome)
        decision = decide(
            verdicts=outcome.verdicts,
            settled=settled,
            attempts=row["attempts"],
            created_at=row["round_started_at"],  # a replay starts a fresh round
            now=datetime.now(UTC),
            settings=settings,
            summary=outcome.summary,
            refused={a: _reply(outcome, a) for a, v in outcome.verdicts.items() if v is Verdict.PERMANENT},
            connector_problem=connector_problem,
            connector_retry_at=retry_at,
            throttled=slow_down,
        )
        return self._sent(row, connector, outcome, decision, started)

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

    async def _connector_failed(
        self, connector: Connector, error: str, settings: Settings, pool: ConnectorPool | None
    ) -> datetime:
        """Back the connector off in Postgres (once per window, however many messages report
        it) and rest its pool in this process until then."""
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
        self._loaded_at = -CONFIG_TTL_SECONDS  # other batches see the backoff at once
        if row and row[1]:
            log.warning("connector failing; backing off", connector=connector.name, error=error, until=until)
        return until

    async def _connector_recovered(self, connector: Connector) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(Q["connector_recovered"], {"id": connector.id})
        self._loaded_at = -CONFIG_TTL_SECONDS
        log.info("connector recovered", connector=connector.name)

    async def _throttled(self, connector: Connector, outcome: Outcome) -> None:
        """A throttling reply: slow the connector down for every worker (its spacing between
        sends doubles, then recovers by half every 30 s: outbox/limits.py), once per reaction
        time however many messages report it."""
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
            self._loaded_at = -CONFIG_TTL_SECONDS
            log.warning(
                "connector throttling; slowing down",
                connector=connector.name,
                rate=limits.per_second(row[0]),
                reply=outcome.summary,
            )

    async def _admit(
        self, connector: Connector, flight: Flight, settings: Settings, held: list[Slot]
    ) -> bool:
        """The connector's rate limits, asked just before MAIL: a slot moments away is waited
        for here (this message's coroutine only); a later one refuses (kept in `held`). The
        connector as last read (a slow-down recorded since its batch was claimed applies)."""
        connector = self._by_id.get(connector.id, connector)
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
        elif slot.wait_seconds > 0:  # a slot of a batch, moments away: no limit binds
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
        return _decided(row, connector, "waiting", decision, started, {})

    @staticmethod
    def _unrouted(row: dict[str, Any], route: Route, started: datetime) -> Result:
        held = route.action == "hold"
        return _result(
            row,
            {
                "status": "held" if held else "failed",
                "refund": 1 if held else 0,  # a disabled connector spends no attempt
                "next_attempt_at": None,
                "connector_id": route.connector.id if route.connector else None,
                "connector_name": route.connector.name if route.connector else None,
                "phase": None,
                "outcome": "held" if held else "failed",
                "last_error": route.reason,
                "smtp_code": None,
                "smtp_reply": None,
                "failure": not held,
                "started_at": started,
            },
            {},
        )

    @staticmethod
    def _unbuildable(row: dict[str, Any], settings: Settings, error: str, started: datetime) -> Result:
        decision = unbuildable(envelope(row, settings), f"cannot build the message: {error}")
        return _decided(row, None, "build", decision, started, {})

    def _crashed(self, row: dict[str, Any], batch: Batch, exc: Exception, started: datetime) -> Result:
        """A bug or a library error while handling this message: retried like a transient
        failure (so it runs out after max-attempts), with the error on the row."""
        settled = batch.settled.get(row["id"], {})
        recipients = [a for a in envelope(row, batch.settings) if a.lower() not in settled]
        decision = decide(
            verdicts=dict.fromkeys(recipients, Verdict.TRANSIENT),
            settled=settled,
            attempts=row["attempts"],
            created_at=row["round_started_at"],
            now=datetime.now(UTC),
            settings=batch.settings,
            summary=f"internal error: {type(exc).__name__}: {exc}"[:1000],
        )
        route = resolve(row["from_addr"], batch.connectors)
        return _decided(row, route.connector, None, decision, started, {})

    @staticmethod
    def _sent(
        row: dict[str, Any], connector: Connector, outcome: Outcome, decision: Decision, started: datetime
    ) -> Result:
        result = _decided(row, connector, outcome.phase, decision, started, outcome.replies, outcome)
        result.seconds, result.smtp_code = outcome.seconds, outcome.code
        return result

    async def _write(self, outcomes: Sequence[Mapping[str, Any]]) -> set[int]:
        """The completer's writer: outcomes in one round trip, each only while this worker
        still holds that row's lease. Retried for as long as a lease lasts; past it the row is
        re-dispatched by the poller anyway."""
        params = finish_params(outcomes)
        async for attempt in db_retry(self._settings.lease_seconds):
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


def _decided(
    row: dict[str, Any],
    connector: Connector | None,
    phase: str | None,
    decision: Decision,
    started: datetime,
    replies: Mapping[str, tuple[int | None, str | None]],
    outcome: Outcome | None = None,
) -> Result:
    return _result(
        row,
        {
            "status": decision.status,
            "refund": 1 if decision.refund else 0,
            "next_attempt_at": decision.next_attempt_at,
            "connector_id": connector.id if connector else None,
            "connector_name": connector.name if connector else None,
            "phase": phase,
            "outcome": decision.outcome,
            "last_error": decision.last_error,
            "smtp_code": outcome.code if outcome else None,
            "smtp_reply": outcome.reply if outcome else None,
            "failure": decision.failure,
            "started_at": started,
        },
        {
            a: (s, *replies.get(a, (None, None if outcome else decision.last_error)))
            for a, s in decision.recipients.items()
        },
    )


def _result(
    row: dict[str, Any], params: dict[str, Any], recipients: Mapping[str, tuple[str, int | None, str | None]]
) -> Result:
    listed = [*row.get("to_addrs", ()), *row.get("cc_addrs", ()), *row.get("bcc_addrs", ())]
    params |= {
        "id": row["id"],
        "lease_token": row["lease_token"],
        # A success whose one envelope recipient is the message's one address: the row tells
        # that recipient's result (finish_attempts writes no recipient row for it).
        "implied_recipient": params["status"] == "sent" and list(recipients) == listed and len(listed) == 1,
        "r_addrs": list(recipients),
        "r_status": [r[0] for r in recipients.values()],
        "r_codes": [r[1] for r in recipients.values()],
        "r_replies": [r[2] for r in recipients.values()],
    }
    return Result(row, params)


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


def _reply(outcome: Outcome, addr: str) -> str:
    code, reply = outcome.replies.get(addr, (None, None))
    return f"{code} {reply}" if code is not None else (reply or outcome.summary)
