"""Timeouts wherever a peer can hang: Postgres connect timeout and keepalives on the poller's
and the workers' connections, the poller's idle-in-transaction timeout, and a Redis socket
timeout that ends a broker round trip made inside the poller's open transaction."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator

import psycopg
import pytest

from outbox import connections
from outbox.core.settings import Settings
from worker.broker import make_broker
from worker.delivery import Delivery
from worker.poller import INFRA_ERRORS, Poller


def _options(conn: psycopg.Connection) -> dict[str, str]:
    return psycopg.conninfo.conninfo_to_dict(conn.info.dsn)


def test_poller_connections_have_timeouts_and_keepalives(config):
    poller = Poller(config, make_broker(config)[1])
    try:
        for conn in (poller._connection(), poller._listening()):
            opts = _options(conn)
            assert opts["connect_timeout"] == "10"
            assert (opts["keepalives"], opts["keepalives_idle"]) == ("1", "30")
            assert (opts["keepalives_interval"], opts["keepalives_count"]) == ("10", "3")
        shown = poller._connection().execute("SHOW idle_in_transaction_session_timeout").fetchone()
        assert shown == ("30s",)
    finally:
        poller.close()


def test_a_timeout_given_in_the_url_wins(database_url):
    url = psycopg.conninfo.make_conninfo(database_url, connect_timeout=3)
    assert "connect_timeout" not in connections.pg_kwargs(url)
    assert connections.pg_kwargs(url)["keepalives"] == 1
    assert connections.pg_kwargs("postgresql://h/db?keepalives_idle=5")["connect_timeout"] == 10
    assert "keepalives_idle" not in connections.pg_kwargs("postgresql://h/db?keepalives_idle=5")


def test_worker_pool_connections_have_timeouts_and_keepalives(config):
    async def check() -> dict[str, str]:
        delivery = await Delivery.open(config)
        try:
            async with delivery.pool.connection() as conn:
                return psycopg.conninfo.conninfo_to_dict(conn.info.dsn)
        finally:
            await delivery.aclose()

    opts = asyncio.run(check())
    assert opts["connect_timeout"] == "10" and opts["keepalives"] == "1"


def test_broker_client_has_socket_timeouts(config):
    broker, _, _ = make_broker(config)
    kwargs = broker.client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == 10 and kwargs["socket_connect_timeout"] == 5
    assert kwargs["socket_keepalive"] is True and kwargs["health_check_interval"] == 30
    assert broker.client.ping()
    broker.close()


@pytest.fixture
def silent_redis() -> Iterator[str]:
    """A TCP server that accepts connections and reads, but never answers (a hung peer)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted: list[socket.socket] = []
    done = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not done.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    done.set()
    thread.join(timeout=5)
    for s in accepted:
        s.close()
    listener.close()


def test_hung_redis_ends_the_dispatch_and_releases_the_rows(
    config, db, parked_gateway, silent_redis, monkeypatch
):
    monkeypatch.setitem(connections.REDIS_OPTIONS, "socket_timeout", 0.5)
    db.execute(
        "INSERT INTO outbox.message (from_addr, to_addrs, subject, text_body) "
        "SELECT 'a@example.com', ARRAY['b@example.org'], 's', 't' FROM generate_series(1, 3)"
    )
    hung = config.model_copy(update={"redis_url": silent_redis})
    poller = Poller(hung, make_broker(hung)[1])
    try:
        with pytest.raises(INFRA_ERRORS):
            poller._dispatch(poller._connection(), Settings())
    finally:
        poller.close()
    # rolled back: still queued, and nobody holds their locks
    assert db.execute("SELECT count(*) FROM outbox.message WHERE status = 'queued'").fetchone() == (3,)
    with db.transaction():
        locked = db.execute("SELECT id FROM outbox.message FOR UPDATE NOWAIT").fetchall()
    assert len(locked) == 3
