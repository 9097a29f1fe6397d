"""Least privilege: an application login with `outbox_app` enqueues and reads status and
nothing more; pollers and workers run end to end as a login with `outbox_worker`."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

import outbox
from outbox.admin import connectors
from outbox.admin.connectors import NewConnector
from outbox.config import Config
from tests.conftest import PG_ADMIN, Pipeline


@pytest.fixture
def login(database_url: str) -> Iterator:
    """Make login roles that are members of a NOLOGIN outbox role; drop them afterwards."""
    made: list[str] = []

    def make(member_of: str) -> str:
        name = f"outbox_test_{member_of.removeprefix('outbox_')}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'CREATE ROLE "{name}" LOGIN')
            admin.execute(f'GRANT {member_of} TO "{name}"')
        made.append(name)
        return psycopg.conninfo.make_conninfo(database_url, user=name)

    yield make
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        for name in made:
            admin.execute(f'DROP ROLE IF EXISTS "{name}"')


def test_app_role_enqueues_and_reads_status_only(db, login, parked_gateway):
    url = login("outbox_app")
    with psycopg.connect(url) as conn:
        with conn.transaction():
            msg_id = outbox.enqueue(
                conn,
                from_addr="shop@example.com",
                to=["ann@example.org"],
                subject="Your order",
                text="secret body",
                attachments=[outbox.Attachment("a.txt", b"x", "text/plain")],
                idempotency_key="order-1",
            )
            again = outbox.enqueue(
                conn,
                from_addr="shop@example.com",
                to=["ann@example.org"],
                subject="Your order",
                text="secret body",
                idempotency_key="order-1",
            )
        assert again == msg_id
        status = conn.execute(
            "SELECT status, attempts FROM outbox.message WHERE id = %s", [msg_id]
        ).fetchone()
        assert status == ("queued", 0)
        for forbidden in (
            "SELECT text_body FROM outbox.message",
            "SELECT password_enc FROM outbox.connector",
            "SELECT oauth_client_secret_enc FROM outbox.connector",
            "SELECT oauth_client_secret_env FROM outbox.connector",
            "UPDATE outbox.message SET status = 'sent'",
            "DELETE FROM outbox.message",
            "SELECT * FROM outbox.attempt",
            "UPDATE outbox.settings SET max_attempts = 1",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(forbidden)
            conn.rollback()


def test_worker_role_delivers_end_to_end(db, login, smtp, config: Config):
    connectors.add(
        db,
        NewConnector(
            name="gw",
            direction="outgoing",
            address="gw@example.com",
            host="localhost",
            port=smtp.port,
            default_gateway=True,
        ),
    )
    app_url, worker_url = login("outbox_app"), login("outbox_worker")
    with psycopg.connect(app_url) as conn, conn.transaction():
        msg_id = outbox.enqueue(
            conn, from_addr="shop@example.com", to=["ann@example.org"], subject="Least privilege", text="t"
        )
    pipeline = Pipeline(config.model_copy(update={"database_url": worker_url})).start()
    try:
        pipeline.until_status(msg_id, "sent")
    finally:
        pipeline.stop()
    [got] = smtp.recorder.wait_for(1)
    assert got.message["Subject"] == "Least privilege"
    with psycopg.connect(worker_url) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(
            "INSERT INTO outbox.connector (name, direction, address) VALUES ('x', 'incoming', 'x@y.z')"
        )
