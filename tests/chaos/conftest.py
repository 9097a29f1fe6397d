"""Chaos fixtures: real `outbox poll` / `outbox worker` processes against real servers, and
the invariant every chaos test ends with: nothing lost, every row final, a second copy only
after an ambiguous outcome, always with the same Message-ID."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from outbox.admin import connectors
from outbox.admin.connectors import NewConnector
from outbox.store.sql import schema_sql
from tests.chaos.services import OutboxProcess
from tests.conftest import wait_until
from tests.smtp import Server

pytestmark = pytest.mark.chaos

FINAL = ("sent", "partial", "failed", "cancelled")


class Chaos:
    """One scenario: a database, a Redis, an SMTP server and the outbox processes."""

    def __init__(
        self, database_url: str, redis_url: str, namespace: str, server: Server, log_dir: Path
    ) -> None:
        self.database_url = database_url
        self.server = server
        self.log_dir = log_dir
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
        self.env.update(
            {
                "OUTBOX_DATABASE_URL": database_url,
                "OUTBOX_REDIS_URL": redis_url,
                "OUTBOX_REDIS_NAMESPACE": namespace,
                "OUTBOX_POLL_INTERVAL_SECONDS": "0.2",
                "OUTBOX_LOCAL_HOSTNAME": "outbox.chaos",
                # one process per `outbox worker`: a signal reaches exactly the worker it names
                "OUTBOX_WORKER_PROCESSES": "1",
                "OUTBOX_LOG_LEVEL": "info",
            }
        )
        self.processes: list[OutboxProcess] = []
        with self.connect() as conn:
            connectors.add(
                conn,
                NewConnector(
                    name="gw",
                    direction="outgoing",
                    address="gw@relay.example",
                    host="localhost",
                    port=server.port,
                    default_gateway=True,
                    max_connections=8,
                ),
            )
            conn.execute(
                "UPDATE outbox.settings SET lease_seconds = 3, retry_base_seconds = 0.2, "
                "retry_max_seconds = 1"
            )

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.database_url, autocommit=True)

    def sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        with self.connect() as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def enqueue(self, n: int) -> None:
        self.sql(
            "INSERT INTO outbox.message (from_addr, to_addrs, subject, text_body) "
            "SELECT 'app@example.com', ARRAY['r' || g || '@example.org'], 'chaos ' || g, 'body' "
            "FROM generate_series(1, %s) g",
            [n],
        )

    def start(self, *args: str, **env: str) -> OutboxProcess:
        p = OutboxProcess(self.env | env, *args, log_dir=self.log_dir)
        self.processes.append(p)
        return p

    def poller(self, dispatch_batch: int | None = None) -> OutboxProcess:
        env = {"OUTBOX_DISPATCH_BATCH": str(dispatch_batch)} if dispatch_batch else {}
        return self.start("poll", **env)

    def worker(self, threads: int = 4) -> OutboxProcess:
        return self.start("worker", "--threads", str(threads))

    def count(self, *statuses: str) -> int:
        return int(
            self.sql("SELECT count(*) FROM outbox.message WHERE status = ANY(%s)", [list(statuses)])[0][0]
        )

    def wait_sent(self, at_least: int, timeout: float = 120) -> None:
        wait_until(
            lambda: self.count("sent") >= at_least,
            timeout=timeout,
            what=f"{at_least} messages sent ({self.diagnose()})",
        )

    def wait_final(self, timeout: float = 180) -> None:
        total = self.count(*FINAL, "queued", "dispatched", "sending", "retry", "held")
        wait_until(
            lambda: self.count(*FINAL) == total, timeout=timeout, what=f"every row final ({self.diagnose()})"
        )

    def diagnose(self) -> str:
        counts = dict(self.sql("SELECT status, count(*) FROM outbox.message GROUP BY status"))
        alive = [f"{' '.join(p.args)}:{'up' if p.alive() else p.proc.returncode}" for p in self.processes]
        return f"statuses {counts}; processes {alive}"

    def check_invariants(self) -> dict[str, int]:
        """Zero lost, every row final, duplicates explained. Returns the tallies."""
        rows = self.sql("SELECT id, status, message_id FROM outbox.message")
        assert all(status in FINAL for _, status, _ in rows), self.diagnose()
        copies = Counter(r.message_id for r in self.server.recorder.received)
        sent_ids = {mid for _, status, mid in rows if status == "sent"}
        lost = sent_ids - set(copies)
        assert not lost, f"{len(lost)} messages marked sent never reached the server"
        unknown = set(copies) - {mid for _, _, mid in rows}
        assert not unknown, f"the server got messages the outbox does not know: {unknown}"
        explained = dict(
            self.sql(
                "SELECT m.message_id, count(*) FROM outbox.attempt a "
                "JOIN outbox.message m ON m.id = a.message_id "
                "WHERE a.outcome IN ('ambiguous', 'lease-expired') GROUP BY m.message_id"
            )
        )
        for mid, n in copies.items():
            assert n <= 1 + explained.get(mid, 0), (
                f"{mid} arrived {n} times without an ambiguous outcome to explain it"
            )
        one_writer = self.sql(
            "SELECT message_id, count(*) FROM outbox.attempt WHERE outcome = 'sent' "
            "GROUP BY message_id HAVING count(*) > 1"
        )
        assert not one_writer, f"more than one attempt finalised these as sent: {one_writer}"
        [(attempts,)] = self.sql("SELECT coalesce(sum(attempts), 0) FROM outbox.message")
        return {
            "messages": len(rows),
            "sent": len(sent_ids),
            "lost": len(lost),
            "duplicates": sum(n - 1 for n in copies.values()),
            "attempts": int(attempts),
        }

    def close(self) -> None:
        for p in self.processes:
            p.close()


@pytest.fixture
def chaos_factory(tmp_path: Path, redis_namespace: str) -> Iterator[Callable[..., Chaos]]:
    runs: list[Chaos] = []

    def make(database_url: str, redis_url: str, server: Server) -> Chaos:
        run = Chaos(database_url, redis_url, redis_namespace, server, tmp_path / "logs")
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.close()


@pytest.fixture
def chaos(chaos_factory: Callable[..., Chaos], database_url: str, smtp: Server) -> Chaos:
    """A scenario on the shared Postgres (own database) and Redis (own namespace)."""
    from tests.conftest import REDIS_URL

    return chaos_factory(database_url, REDIS_URL, smtp)


def init_schema(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(schema_sql())  # type: ignore[arg-type]
