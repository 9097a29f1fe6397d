"""Fixtures against the real services: a fresh Postgres database per test (cloned from a
template built once by the migrations, as `outbox db migrate` does), a Redis key namespace per
test, SMTP servers in the test process, and the pipeline (poller + Dramatiq worker) driven to a
condition."""

from __future__ import annotations

import os
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import hypothesis  # noqa: F401  (imported up front: a late import under pytest's assertion

#   rewriter trips a CPython 3.11.7 bug, "AST constructor recursion depth mismatch")
import psycopg
import pytest
import redis
import trustme

from outbox.config import Config
from outbox.store.migrate import migrate
from tests.smtp import Authenticator, Server, start_server

PG_ADMIN = os.environ.get("OUTBOX_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("OUTBOX_TEST_REDIS", "redis://127.0.0.1:6379/14")


def _url(dbname: str) -> str:
    return psycopg.conninfo.make_conninfo(PG_ADMIN, dbname=dbname)


@pytest.fixture(scope="session")
def template_db() -> Iterator[str]:
    name = f"outbox_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    with psycopg.connect(_url(name), autocommit=True) as conn:
        migrate(conn)
    yield name
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(template_db: str) -> Iterator[str]:
    name = f"outbox_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield _url(name)
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection for arranging and asserting."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def parked_gateway(db: psycopg.Connection[Any]) -> None:
    """A System Default Gateway with nothing listening behind it: every From has a route
    (`outbox send` does not warn), and nothing is ever delivered."""
    from outbox.admin import connectors
    from outbox.admin.connectors import NewConnector

    connectors.add(
        db,
        NewConnector(
            name="parked",
            direction="outgoing",
            address="parked@relay.example",
            host="127.0.0.1",
            port=9,
            default_gateway=True,
        ),
    )


@pytest.fixture
def redis_namespace() -> Iterator[str]:
    ns = f"outbox-test-{uuid.uuid4().hex[:10]}"
    yield ns
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{ns}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def config(database_url: str, redis_namespace: str) -> Config:
    return Config(
        database_url=database_url,
        redis_url=REDIS_URL,
        redis_namespace=redis_namespace,
        poll_interval_seconds=0.2,
        worker_threads=4,
        local_hostname="outbox.test",
    )


@pytest.fixture
def cli_env(config: Config) -> dict[str, str]:
    """Environment for running the `outbox` command against this test's services."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update(
        {
            "OUTBOX_DATABASE_URL": config.database_url,
            "OUTBOX_REDIS_URL": config.redis_url,
            "OUTBOX_REDIS_NAMESPACE": config.redis_namespace,
            "OUTBOX_POLL_INTERVAL_SECONDS": "0.2",
            "OUTBOX_LOCAL_HOSTNAME": "outbox.test",
        }
    )
    return env


# -- TLS and SMTP ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture(scope="session")
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
    return ctx


@pytest.fixture
def smtp_factory(server_tls: ssl.SSLContext) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def make(
        mode: str = "plain",
        *,
        name: str = "smtp",
        username: str | None = None,
        password: str | None = None,
        **extra: Any,
    ) -> Server:
        auth = Authenticator(username, password) if username and password else None
        server = start_server(mode=mode, tls=server_tls, auth=auth, name=name, **extra)
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def smtp(smtp_factory: Callable[..., Server]) -> Server:
    """A plain SMTP server (no TLS offered, no AUTH)."""
    return smtp_factory("plain")


# -- the pipeline ---------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 30,
    step: Callable[[], None] | None = None,
    what: str | Callable[[], str] = "condition",
) -> Any:
    """Poll a condition (running `step` between looks) until true; fail after `timeout`
    (`what` names it in the failure; a callable is asked then, to show the latest state)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        if step is not None:
            step()
        time.sleep(0.02)


class Pipeline:
    """Poller driven by the test (`cycle`) and a real Dramatiq worker on Redis."""

    def __init__(self, config: Config) -> None:
        from worker.poller import Poller
        from worker.runner import WorkerProcess

        self.config = config
        self.worker = WorkerProcess(config)
        self.poller = Poller(config, self.worker.actor)
        self.started = False

    def start(self) -> Pipeline:
        self.worker.start()
        self.started = True
        return self

    def cycle(self) -> None:
        self.poller.run_once()

    def status(self, message_id: int) -> str:
        with psycopg.connect(self.config.database_url) as conn:
            row = conn.execute("SELECT status FROM outbox.message WHERE id = %s", [message_id]).fetchone()
        assert row is not None, f"no message {message_id}"
        return str(row[0])

    def until_status(self, message_id: int, *statuses: str, timeout: float = 30) -> str:
        """Run poller cycles until the message reaches one of `statuses`."""
        return wait_until(
            lambda: (s := self.status(message_id)) in statuses and s,
            timeout=timeout,
            step=self.cycle,
            what=f"message {message_id} to reach {statuses}",
        )

    def stop(self) -> None:
        self.poller.close()
        if self.started:
            self.worker.stop(timeout_seconds=30)
            self.started = False


@pytest.fixture
def pipeline(config: Config) -> Iterator[Pipeline]:
    p = Pipeline(config)
    yield p.start()
    p.stop()


@pytest.fixture
def stopped_pipeline(config: Config) -> Iterator[Pipeline]:
    """A pipeline whose worker the test starts itself (to arrange the broker first)."""
    p = Pipeline(config)
    yield p
    p.stop()


@pytest.fixture
def stop_event() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture
def console(database_url: str) -> Iterator[Any]:
    """The web console served from this process against this test's database."""
    from tests.webconsole import serve

    with serve(database_url) as c:
        yield c
