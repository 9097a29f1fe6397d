"""The body of the Dramatiq actor: claim the rows of one broker message, resolve each
message's connector, send it, and write the outcome back under the lease."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
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
from outbox.message import Attachment, build, render
from outbox.resolve import Connector, Route, resolve
from outbox.settings import Settings
from outbox.sql import queries
from worker import metrics
from worker.policy import Decision, Verdict, decide
from worker.transport import Outcome, Transport

Q = queries("worker")
log = logs.get("outbox.worker")

DB_ERRORS = (psycopg.OperationalError, psycopg_pool.PoolTimeout)


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
        seen.setdefault(a.lower(), a)
    return list(seen.values())


@dataclass
class Batch:
    rows: list[dict[str, Any]]
    connectors: list[Connector]
    settings: Settings
    attachments: dict[int, list[Attachment]]
    settled: dict[int, dict[str, str]]


class Delivery:
    """One per worker process, living on Dramatiq's asyncio event loop."""

    def __init__(self, config: Config, pool: psycopg_pool.AsyncConnectionPool) -> None:
        self.config = config
        self.pool = pool
        self.transport = Transport(local_hostname=config.local_hostname)

    @classmethod
    async def open(cls, config: Config) -> Delivery:
        pool = psycopg_pool.AsyncConnectionPool(
            config.database_url,
            min_size=1,
            max_size=max(4, config.worker_threads + 2),
            kwargs={"autocommit": True},
            open=False,
            name="outbox-worker",
        )
        await pool.open(wait=False)
        return cls(config, pool)

    async def aclose(self) -> None:
        await self.transport.aclose()
        await self.pool.close()

    async def run(self, handed: Sequence[Sequence[Any]]) -> None:
        """Deliver the rows of one broker message: [[id, dispatch_token], ...]."""
        batch = await self._claim(handed)
        if batch is None:
            return
        await asyncio.gather(*(self._deliver(row, batch) for row in batch.rows))

    async def _claim(self, handed: Sequence[Sequence[Any]]) -> Batch | None:
        ids = [int(i) for i, _ in handed]
        tokens = [str(t) for _, t in handed]
        async for attempt in db_retry(60):
            with attempt:
                async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
                    settings = Settings.model_validate(
                        await (await cur.execute(Q["settings"])).fetchone() or {}
                    )
                    async with conn.transaction():
                        await cur.execute(Q["lock_batch"], {"ids": ids})
                        await cur.execute(
                            Q["start_sending"],
                            {
                                "ids": ids,
                                "tokens": tokens,
                                "lease_seconds": settings.lease_seconds,
                            },
                        )
                        rows = await cur.fetchall()
                    if not rows:
                        metrics.STALE_DELIVERIES.inc(len(ids))
                        return None
                    metrics.STALE_DELIVERIES.inc(len(ids) - len(rows))
                    connectors = [
                        Connector.from_row(r) for r in await (await cur.execute(Q["connectors"])).fetchall()
                    ]
                    claimed = [r["id"] for r in rows]
                    attachments: dict[int, list[Attachment]] = {}
                    if any(r["has_attachments"] for r in rows):
                        await cur.execute(Q["attachments_of"], {"ids": claimed})
                        for a in await cur.fetchall():
                            attachments.setdefault(a["message_id"], []).append(
                                Attachment(
                                    filename=a["filename"],
                                    content=bytes(a["content"]),
                                    content_type=a["content_type"],
                                )
                            )
                    settled: dict[int, dict[str, str]] = {}
                    if any(r["attempts"] > 1 for r in rows):
                        await cur.execute(Q["finished_recipients_of"], {"ids": claimed})
                        for s in await cur.fetchall():
                            settled.setdefault(s["message_id"], {})[s["addr"].lower()] = s["status"]
        return Batch(rows, connectors, settings, attachments, settled)

    async def _deliver(self, row: dict[str, Any], batch: Batch) -> None:
        started = datetime.now(UTC)
        settings = batch.settings
        bound = log.bind(message=row["id"], attempt=row["attempts"])
        route = resolve(row["from_addr"], batch.connectors)
        if route.action != "send":
            await self._finish_unrouted(row, route, started, settings)
            bound.info("not routed", action=route.action, reason=route.reason)
            return
        connector = route.connector
        assert connector is not None
        settled = batch.settled.get(row["id"], {})
        recipients = [a for a in envelope(row, settings) if a.lower() not in settled]
        content = render(build(row, batch.attachments.get(row["id"], ()), date=row["created_at"]))
        if recipients:
            pool = self.transport.pool(connector, timeout=settings.smtp_timeout_seconds)
            outcome = await pool.send(row["from_addr"], recipients, content)
        else:  # every recipient was settled by earlier attempts
            outcome = Outcome(phase="rcpt")
        decision = decide(
            verdicts=outcome.verdicts,
            settled=settled,
            attempts=row["attempts"],
            created_at=row["created_at"],
            now=datetime.now(UTC),
            settings=settings,
        )
        await self._finish_sent(row, connector, outcome, decision, started, settings)
        metrics.observe_send(connector.name, decision.status, outcome.code, outcome.seconds)
        bound.info(
            "attempt finished",
            connector=connector.name,
            status=decision.status,
            phase=outcome.phase,
            smtp_code=outcome.code,
            error=outcome.error if decision.failure else None,
        )

    async def _finish_unrouted(
        self, row: dict[str, Any], route: Route, started: datetime, settings: Settings
    ) -> None:
        held = route.action == "hold"
        await self._write(
            row,
            settings,
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

    async def _finish_sent(
        self,
        row: dict[str, Any],
        connector: Connector,
        outcome: Outcome,
        decision: Decision,
        started: datetime,
        settings: Settings,
    ) -> None:
        last_error = outcome.summary if decision.failure else None
        if decision.failure and decision.status in ("failed", "partial"):
            refused = [f"{a}: {_reply(outcome, a)}" for a, s in decision.recipients.items() if s == "failed"]
            if any(v in (Verdict.TRANSIENT, Verdict.AMBIGUOUS) for v in outcome.verdicts.values()):
                last_error = f"gave up after {row['attempts']} attempts: {outcome.summary}"
            elif refused:
                last_error = "; ".join(refused)[:2000]
        any_ambiguous = any(v is Verdict.AMBIGUOUS for v in outcome.verdicts.values())
        await self._write(
            row,
            settings,
            {
                "status": decision.status,
                "refund": 0,
                "next_attempt_at": decision.next_attempt_at,
                "connector_id": connector.id,
                "connector_name": connector.name,
                "phase": outcome.phase,
                "outcome": "ambiguous" if any_ambiguous else decision.status,
                "last_error": last_error,
                "smtp_code": outcome.code,
                "smtp_reply": outcome.reply,
                "failure": decision.failure,
                "started_at": started,
            },
            {a: (s, *outcome.replies.get(a, (None, None))) for a, s in decision.recipients.items()},
        )

    async def _write(
        self,
        row: dict[str, Any],
        settings: Settings,
        params: dict[str, Any],
        recipients: Mapping[str, tuple[str, int | None, str | None]],
    ) -> None:
        params |= {
            "id": row["id"],
            "lease_token": row["lease_token"],
            "r_addrs": list(recipients),
            "r_status": [r[0] for r in recipients.values()],
            "r_codes": [r[1] for r in recipients.values()],
            "r_replies": [r[2] for r in recipients.values()],
        }
        # A result that cannot be written is retried, never forgotten; past the lease the
        # row is re-dispatched by the poller anyway.
        async for attempt in db_retry(settings.lease_seconds):
            with attempt:
                async with self.pool.connection() as conn:
                    cur = await conn.execute(Q["finish_attempt"], params)
                    written = (await cur.fetchone() or (0,))[0]
        if not written:
            metrics.STALE_DELIVERIES.inc()
            log.warning(
                "lease lost before the outcome was written; row left to its new owner",
                message=row["id"],
                status=params["status"],
            )


def _reply(outcome: Outcome, addr: str) -> str:
    code, reply = outcome.replies.get(addr, (None, None))
    return f"{code} {reply}" if code is not None else (reply or outcome.summary)
