"""A worker's claim of the rows it was handed: it waits for the poller's transaction, and it
commits on its own, so a worker that stalls right after sending it blocks nobody."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import outbox
from outbox.config import Config
from outbox.store.sql import queries
from tests.conftest import wait_until
from worker.delivery import Delivery

Q = queries("worker")


def enqueue(db: psycopg.Connection[Any], n: int) -> list[int]:
    with db.transaction():
        return [
            outbox.enqueue(db, from_addr="app@example.com", to=[f"r{i}@example.org"], subject="s", text="t")
            for i in range(n)
        ]


def test_claim_waits_for_the_dispatching_transaction_then_claims(db, database_url, parked_gateway):
    [msg_id] = enqueue(db, 1)
    with psycopg.connect(database_url) as poller:  # the poller's transaction, still open
        [(_, token)] = poller.execute(
            Q["claim_due"], {"limit": 10, "max_in_flight": 5000, "lease_seconds": 300}
        ).fetchall()
        claimed: list[Any] = []

        def worker() -> None:
            with psycopg.connect(database_url, autocommit=True) as conn:
                claimed.extend(
                    conn.execute(Q["claim"], {"ids": [msg_id], "tokens": [token], "lease_seconds": 300})
                )

        thread = threading.Thread(target=worker)
        thread.start()
        wait_until(
            lambda: db.execute(
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%%locked%%'"
            ).fetchone(),
            what="the claim to wait for the poller's lock",
        )
        poller.commit()
        thread.join(timeout=30)
    assert [c[0] for c in claimed] == [msg_id]
    status, attempts, lease = db.execute(
        "SELECT status, attempts, lease_token::text FROM outbox.message WHERE id = %s", [msg_id]
    ).fetchone()
    assert (status, attempts, lease) == ("sending", 1, claimed[0][1])


def test_claim_with_a_stale_token_claims_nothing(db, parked_gateway):
    [msg_id] = enqueue(db, 1)
    [(_, token)] = db.execute(
        Q["claim_due"], {"limit": 10, "max_in_flight": 5000, "lease_seconds": 300}
    ).fetchall()
    other = "00000000-0000-0000-0000-000000000000"
    assert db.execute(Q["claim"], {"ids": [msg_id], "tokens": [other], "lease_seconds": 300}).fetchall() == []
    assert db.execute(Q["claim"], {"ids": [msg_id], "tokens": [token], "lease_seconds": 300}).fetchall()
    # the same broker message delivered twice: the second claims nothing
    assert db.execute(Q["claim"], {"ids": [msg_id], "tokens": [token], "lease_seconds": 300}).fetchall() == []
    assert db.execute("SELECT attempts FROM outbox.message WHERE id = %s", [msg_id]).fetchone()[0] == 1


SYNC = b"S\x00\x00\x00\x04"  # a Sync message of the Postgres protocol


class FreezingProxy:
    """A TCP proxy to Postgres that stops forwarding, both ways, on a connection as soon as
    the client sent the statement holding `marker`: the process behind it stalled right there."""

    def __init__(self, target: tuple[str, int], marker: bytes) -> None:
        self.target, self.marker = target, marker
        self.loop = asyncio.new_event_loop()
        self.frozen = threading.Event()
        self._writers: list[asyncio.StreamWriter] = []
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        sreader, swriter = await asyncio.open_connection(*self.target)
        self._writers += [cwriter, swriter]
        stall = asyncio.Event()

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool) -> None:
            # The statement holding the marker goes through up to its Sync (the extended
            # protocol's end of statement, which the client may send in a later chunk), so
            # the server runs and commits it; then nothing more, either way.
            tail = b""  # the marker may be cut across two chunks (a busy machine reads less)
            after = None  # what the client sent from the marker on, once it was seen
            while not stall.is_set() and (chunk := await reader.read(65536)):
                if stall.is_set():  # the server's reply to the marked statement stays here
                    break
                if upstream:
                    if after is None:
                        joined = tail + chunk
                        if self.marker in joined:
                            after = joined[joined.index(self.marker) :]
                        tail = joined[-len(self.marker) :]
                    else:
                        after += chunk
                    if after is not None and SYNC in after:
                        # Frozen before the chunk goes out: the reply may come back at once.
                        stall.set()
                        self.frozen.set()
                writer.write(chunk)
                await writer.drain()
            if not stall.is_set():
                writer.close()

        await asyncio.gather(
            pump(creader, swriter, True), pump(sreader, cwriter, False), return_exceptions=True
        )
        await stall.wait()  # a stalled process keeps its sockets open

    def close(self) -> None:
        async def shut() -> None:
            self.server.close()
            for w in self._writers:
                w.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(shut(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


@pytest.fixture
def freezing_proxy(database_url: str) -> Iterator[FreezingProxy]:
    proxy = FreezingProxy(("127.0.0.1", 5432), b"status = 'sending'")
    yield proxy
    proxy.close()


def test_worker_stalled_right_after_its_claim_holds_no_row_locks(
    db, config: Config, parked_gateway, freezing_proxy: FreezingProxy
):
    ids = enqueue(db, 3)
    handed = [
        list(r)
        for r in db.execute(Q["claim_due"], {"limit": 10, "max_in_flight": 5000, "lease_seconds": 300})
    ]
    via_proxy = psycopg.conninfo.make_conninfo(
        config.database_url, host="127.0.0.1", port=str(freezing_proxy.port)
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    delivery = asyncio.run_coroutine_threadsafe(
        Delivery.open(config.model_copy(update={"database_url": via_proxy})), loop
    ).result(30)
    stalled = asyncio.run_coroutine_threadsafe(delivery.run(handed), loop)
    try:
        wait_until(freezing_proxy.frozen.is_set, what="the worker to send its claim")
        # The claim committed although the worker never sent another byte ...
        wait_until(
            lambda: db.execute(
                "SELECT count(*) = 3 FROM outbox.message WHERE id = ANY(%s) AND status = 'sending'", [ids]
            ).fetchone()[0],
            timeout=10,
            what="the stalled worker's claim to be committed",
        )

        # ... and holds no lock on the rows: expiry and operators can take them. (Another of the
        # worker's statements may hold one for the moment it runs; a stalled transaction would
        # hold it for good.)
        def lockable() -> list[int]:
            try:
                with db.transaction():
                    rows = db.execute(
                        "SELECT id FROM outbox.message WHERE id = ANY(%s) FOR UPDATE NOWAIT", [ids]
                    ).fetchall()
            except psycopg.errors.LockNotAvailable:
                return []
            return sorted(r[0] for r in rows)

        assert wait_until(lockable, timeout=10, what="the rows to be lockable") == ids
    finally:
        stalled.cancel()
        freezing_proxy.close()  # the stalled connections break; the cancelled run ends
        wait_until(stalled.done, what="the stalled run to end")
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(delivery.aclose(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
