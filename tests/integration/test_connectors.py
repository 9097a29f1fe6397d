"""Connector resolution, TLS and AUTH against real SMTP servers (several at once, to see
which connector carried each message)."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet

import outbox
from outbox.admin import connectors
from outbox.admin.connectors import NewConnector
from outbox.core.errors import ConfigurationError, ValidationError


def add(db, server, name, address, **kw):
    kw.setdefault("direction", "outgoing")
    connectors.add(
        db,
        NewConnector(
            name=name, address=address, host="localhost", port=server.port if server else 2525, **kw
        ),
    )


def send(db, from_addr, to="rcpt@example.org", **kw):
    with db.transaction():
        return outbox.enqueue(
            db, from_addr=from_addr, to=[to], subject=f"from {from_addr}", text="hello", **kw
        )


def last_error(db, msg_id):
    return db.execute("SELECT last_error FROM outbox.message WHERE id = %s", [msg_id]).fetchone()[0]


def test_from_address_picks_connector_alias_or_gateway(db, smtp_factory, pipeline):
    sales, support, relay = (
        smtp_factory(name="sales"),
        smtp_factory(name="support"),
        smtp_factory(name="relay"),
    )
    add(db, sales, "sales", "sales@example.com")
    add(
        db,
        support,
        "support",
        "support@example.com",
        aliases=("Help@Example.com",),
        direction="both",
    )
    add(db, relay, "gateway", "gateway@example.com", default_gateway=True)
    ids = {
        "sales": send(db, "SALES@example.com"),
        "alias": send(db, "help@example.com"),
        "other": send(db, "noreply@example.com"),
    }
    for msg_id in ids.values():
        pipeline.until_status(msg_id, "sent")
    assert [r.mail_from for r in sales.recorder.received] == ["SALES@example.com"]
    assert [r.mail_from for r in support.recorder.received] == ["help@example.com"]
    assert [r.mail_from for r in relay.recorder.received] == ["noreply@example.com"]
    used = dict(
        db.execute(
            "SELECT m.id, c.name FROM outbox.message m JOIN outbox.connector c ON c.id = m.connector_id"
        ).fetchall()
    )
    assert used == {ids["sales"]: "sales", ids["alias"]: "support", ids["other"]: "gateway"}


def test_incoming_connector_never_sends(db, smtp_factory, pipeline):
    inbox, relay = smtp_factory(name="inbox"), smtp_factory(name="relay")
    add(db, inbox, "inbox", "cases@example.com", direction="incoming")
    add(db, relay, "gateway", "gateway@example.com", default_gateway=True)
    msg_id = send(db, "cases@example.com")
    pipeline.until_status(msg_id, "sent")
    assert inbox.recorder.received == []
    assert len(relay.recorder.received) == 1


def test_disabled_connector_holds_until_enabled(db, smtp_factory, pipeline):
    sales, relay = smtp_factory(name="sales"), smtp_factory(name="relay")
    add(db, sales, "sales", "sales@example.com", enabled=False)
    add(db, relay, "gateway", "gateway@example.com", default_gateway=True)
    msg_id = send(db, "sales@example.com")
    pipeline.until_status(msg_id, "held")
    row = db.execute("SELECT attempts, last_error FROM outbox.message WHERE id = %s", [msg_id]).fetchone()
    assert row[0] == 0 and "sales" in row[1] and "disabled" in row[1]
    pipeline.cycle()
    assert relay.recorder.received == []  # never silently through another connector
    assert connectors.set_enabled(db, "sales", True).released_held == 1
    pipeline.until_status(msg_id, "sent")
    assert len(sales.recorder.wait_for(1)) == 1 and relay.recorder.received == []


def sql_insert(db, from_addr):
    """A writer that bypasses Python."""
    return db.execute(
        "INSERT INTO outbox.message (from_addr, to_addrs, subject, text_body) "
        "VALUES (%s, '{rcpt@example.org}', 's', 't') RETURNING id",
        [from_addr],
    ).fetchone()[0]


@pytest.mark.parametrize("writer", [send, sql_insert])
def test_no_route_is_written_and_fails_at_send(db, smtp, pipeline, writer):
    """Routing never refuses a message at enqueue (an operator's change must not fail the
    application's transaction): it fails at send time, with the reason."""
    add(db, smtp, "sales", "sales@example.com")
    msg_id = writer(db, "someone@example.com")
    pipeline.until_status(msg_id, "failed")
    assert "no connector for someone@example.com and no System Default Gateway" in last_error(db, msg_id)
    assert smtp.recorder.received == []


def test_an_oversized_message_without_a_route_is_refused_for_its_size(db):
    db.execute("UPDATE outbox.settings SET max_message_bytes = 2048")
    with pytest.raises(ValidationError, match="over the maximum email size of 2048 bytes"):
        outbox.enqueue(db, from_addr="nobody@example.com", to=["b@example.org"], subject="s", text="x" * 5000)


def test_disabled_gateway_without_match_fails(db, smtp_factory, pipeline):
    sales, relay = smtp_factory(name="sales"), smtp_factory(name="relay")
    add(db, sales, "sales", "sales@example.com")
    add(db, relay, "gateway", "gateway@example.com", default_gateway=True)
    db.execute("UPDATE outbox.settings SET unmonitored_address = 'sales@example.com'")
    connectors.set_enabled(db, "gateway", False)
    for msg_id in (send(db, "other@example.com"), sql_insert(db, "other@example.com")):
        pipeline.until_status(msg_id, "failed")
        assert "System Default Gateway gateway is disabled" in last_error(db, msg_id)


def test_starttls_with_auth_uses_env_password(db, smtp_factory, pipeline, ca_file, monkeypatch):
    server = smtp_factory("starttls", username="relay-user", password="s3cret-pw")
    monkeypatch.setenv("RELAY_PASSWORD", "s3cret-pw")
    add(
        db,
        server,
        "gateway",
        "gateway@example.com",
        default_gateway=True,
        username="relay-user",
        password_env="RELAY_PASSWORD",
        ca_file=ca_file,
    )
    msg_id = send(db, "app@example.com")
    pipeline.until_status(msg_id, "sent")
    assert server.authenticator.logins == ["relay-user"]
    assert len(server.recorder.received) == 1


def test_implicit_tls(db, smtp_factory, pipeline, ca_file):
    server = smtp_factory("tls")
    add(
        db,
        server,
        "gateway",
        "gateway@example.com",
        default_gateway=True,
        security="tls",
        ca_file=ca_file,
    )
    msg_id = send(db, "app@example.com")
    pipeline.until_status(msg_id, "sent")
    assert len(server.recorder.received) == 1


def test_implicit_tls_with_auth_and_encrypted_password(db, smtp_factory, pipeline, ca_file, monkeypatch):
    monkeypatch.setenv("OUTBOX_SECRET_KEY", Fernet.generate_key().decode())
    server = smtp_factory("tls", username="u", password="from-stdin")
    add(
        db,
        server,
        "gateway",
        "gateway@example.com",
        default_gateway=True,
        security="tls",
        ca_file=ca_file,
        username="u",
        password="from-stdin",
    )
    stored = db.execute("SELECT password_enc FROM outbox.connector").fetchone()[0]
    assert b"from-stdin" not in bytes(stored)
    msg_id = send(db, "app@example.com")
    pipeline.until_status(msg_id, "sent")
    assert server.authenticator.logins == ["u"]


def test_both_connector_sends_with_its_incoming_credentials(db, smtp_factory, pipeline, ca_file, monkeypatch):
    server = smtp_factory("starttls", username="cases@example.com", password="imap-pw")
    monkeypatch.setenv("CASES_PW", "imap-pw")
    add(
        db,
        server,
        "cases",
        "cases@example.com",
        direction="both",
        username="cases@example.com",
        password_env="CASES_PW",
        ca_file=ca_file,
    )
    msg_id = send(db, "cases@example.com")
    pipeline.until_status(msg_id, "sent")
    assert server.authenticator.logins == ["cases@example.com"]


def test_certificate_is_verified(db, smtp_factory, pipeline):
    server = smtp_factory("tls")  # signed by the test CA, which this connector does not trust
    add(db, server, "gateway", "gateway@example.com", default_gateway=True, security="tls")
    msg_id = send(db, "app@example.com")
    pipeline.until_status(msg_id, "retry")
    assert "CERTIFICATE_VERIFY_FAILED" in last_error(db, msg_id)
    assert server.recorder.received == []


def test_auth_never_sent_without_tls(db, smtp_factory, pipeline, monkeypatch):
    # the server stops offering STARTTLS (downgrade): the send fails loudly, no plaintext login
    server = smtp_factory("plain")
    monkeypatch.setenv("PW", "secret")
    add(
        db,
        server,
        "gateway",
        "gateway@example.com",
        default_gateway=True,
        username="u",
        password_env="PW",
    )
    msg_id = send(db, "app@example.com")
    pipeline.until_status(msg_id, "retry")
    assert "does not offer STARTTLS" in last_error(db, msg_id)
    assert server.recorder.received == []


def test_wrong_password_is_retried_with_the_reply(db, smtp_factory, pipeline, ca_file, monkeypatch):
    server = smtp_factory("starttls", username="u", password="right")
    monkeypatch.setenv("PW", "wrong")
    add(
        db,
        server,
        "gateway",
        "gateway@example.com",
        default_gateway=True,
        username="u",
        password_env="PW",
        ca_file=ca_file,
    )
    msg_id = send(db, "app@example.com")
    pipeline.until_status(msg_id, "retry")
    row = db.execute("SELECT last_smtp_code, phase FROM outbox.message WHERE id = %s", [msg_id]).fetchone()
    assert row == (535, "auth")


def test_missing_password_env_is_reported(db, smtp, pipeline, monkeypatch):
    monkeypatch.delenv("NOPE", raising=False)
    add(
        db,
        smtp,
        "gateway",
        "gateway@example.com",
        default_gateway=True,
        username="u",
        password_env="NOPE",
    )
    msg_id = send(db, "app@example.com")
    pipeline.until_status(msg_id, "retry")
    assert "environment variable NOPE is not set" in last_error(db, msg_id)


# -- configuration refused at once --------------------------------------------------------------


def test_credentials_with_security_none_are_refused(db):
    with pytest.raises(ValidationError, match="AUTH is only ever sent over TLS"):
        add(db, None, "gw", "gw@example.com", security="none", username="u", password_env="PW")
    assert connectors.load_all(db) == []


def test_address_claimed_twice_is_refused(db):
    add(db, None, "a", "a@example.com", aliases=("shared@example.com",))
    with pytest.raises(ValidationError, match=r"shared@example\.com already belongs"):
        add(db, None, "b", "shared@EXAMPLE.com")


def test_only_one_default_gateway(db):
    add(db, None, "gw1", "gw1@example.com", default_gateway=True)
    with pytest.raises(ValidationError, match="gw1 is already the System Default Gateway"):
        add(db, None, "gw2", "gw2@example.com", default_gateway=True)


def test_port_465_requires_tls(db):
    with pytest.raises(ValidationError, match="465 is implicit TLS"):
        connectors.add(
            db,
            NewConnector(
                name="x",
                direction="outgoing",
                address="x@example.com",
                host="localhost",
                port=465,
                security="starttls",
            ),
        )


def test_disabling_gateway_needs_unmonitored_address_on_enabled_connector(db):
    add(db, None, "gw", "gw@example.com", default_gateway=True)
    with pytest.raises(ConfigurationError, match="set unmonitored-address"):
        connectors.set_enabled(db, "gw", False)
    db.execute("UPDATE outbox.settings SET unmonitored_address = 'noreply@example.com'")
    with pytest.raises(ConfigurationError, match="does not resolve"):
        connectors.set_enabled(db, "gw", False)
    add(db, None, "noreply", "noreply@example.com")
    connectors.set_enabled(db, "gw", False)
    actions = [r[0] for r in db.execute("SELECT action FROM outbox.connector_event ORDER BY id")]
    assert actions == ["created", "created", "disabled"]


@pytest.mark.parametrize("port", [25, 587])
def test_implicit_tls_on_a_plain_port_is_refused(db, port):
    with pytest.raises(ValidationError, match=f"port {port} speaks plain SMTP first"):
        connectors.add(
            db,
            NewConnector(
                name="x",
                direction="outgoing",
                address="x@example.com",
                host="localhost",
                port=port,
                security="tls",
            ),
        )


def test_update_moves_a_connector_to_a_new_server_and_is_recorded(db, smtp_factory, pipeline):
    old_server, new_server = smtp_factory(name="old"), smtp_factory(name="new")
    add(db, old_server, "gateway", "gateway@example.com", default_gateway=True)
    first = send(db, "app@example.com")
    pipeline.until_status(first, "sent")
    done = connectors.update(
        db, "gateway", {"port": new_server.port, "aliases": ("App@Example.com",)}, actor="ops-anna"
    )
    assert done.changed == ["aliases", "port"] and not done.backoff.reset  # it was healthy
    second = send(db, "app@example.com")
    pipeline.until_status(second, "sent")
    assert len(old_server.recorder.received) == 1 and len(new_server.recorder.received) == 1
    action, actor, detail = db.execute(
        "SELECT action, actor, detail FROM outbox.connector_event ORDER BY id DESC LIMIT 1"
    ).fetchone()
    assert (action, actor) == ("changed", "ops-anna")
    assert detail["port"] == {"from": old_server.port, "to": new_server.port}
    assert detail["aliases"] == {"from": [], "to": ["app@example.com"]}


def test_update_is_validated_like_add_and_changes_nothing_on_error(db):
    add(db, None, "a", "a@example.com", username="u", password_env="PW")
    add(db, None, "b", "b@example.com")
    with pytest.raises(ValidationError, match="AUTH is only ever sent over TLS"):
        connectors.update(db, "a", {"security": "none"})
    with pytest.raises(ValidationError, match=r"b@example\.com already belongs"):
        connectors.update(db, "a", {"aliases": ("B@example.com",)})
    a = connectors.get(db, "a")
    assert (a.security, a.aliases, a.password_env) == ("auto", (), "PW")
    assert [r[0] for r in db.execute("SELECT action FROM outbox.connector_event ORDER BY id")] == [
        "created",
        "created",
    ]


def test_disabling_takes_effect_for_the_very_next_message(db, smtp_factory, pipeline):
    sales, relay = smtp_factory(name="sales"), smtp_factory(name="relay")
    add(db, sales, "sales", "sales@example.com")
    add(db, relay, "gateway", "gateway@example.com", default_gateway=True)
    pipeline.until_status(send(db, "sales@example.com"), "sent")  # the worker has its config cached
    connectors.set_enabled(db, "sales", False)
    held = send(db, "sales@example.com")
    pipeline.until_status(held, "held")
    assert len(sales.recorder.received) == 1 and relay.recorder.received == []
