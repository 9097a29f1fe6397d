"""OAuth 2.0 connectors end to end: a real HTTPS token endpoint (client-credentials grant,
trusted through $SSL_CERT_FILE) and a real SMTP server that offers only AUTH XOAUTH2 and
checks each bearer token. What an operator would notice: mail arriving, one token fetch for
many messages, tokens renewed before they expire and once after a refusal, and a token
endpoint that fails treated as the connector's problem (backoff, no attempt spent)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import redis
from aiosmtpd.smtp import AuthResult
from cryptography.fernet import Fernet

import outbox
from outbox.admin import connectors
from outbox.admin.connectors import NewConnector
from tests.conftest import wait_until
from tests.helpers import outbox_cli
from tests.oauth import TokenEndpoint, start_xoauth2_server
from tests.smtp import start_server

MAILBOX = "sales@contoso.com"
CLIENT_ID = "11111111-aaaa-bbbb-cccc-222222222222"
CLIENT_SECRET = "cs~unique-client-secret-0815"


@pytest.fixture
def trusted_ca(ca_file, monkeypatch):
    """The worker (in this process and its children) trusts the test CA for token endpoints."""
    monkeypatch.setenv("SSL_CERT_FILE", ca_file)
    return ca_file


@pytest.fixture
def endpoint(server_tls, trusted_ca):
    e = TokenEndpoint(CLIENT_ID, CLIENT_SECRET, server_tls).start()
    yield e
    e.stop()


@pytest.fixture
def xoauth2(endpoint, server_tls):
    server = start_xoauth2_server(endpoint, MAILBOX, server_tls)
    yield server
    server.stop()


@pytest.fixture
def slow_backoff(db):
    db.execute("UPDATE outbox.settings SET retry_base_seconds = 3600, retry_max_seconds = 7200")


def add_sales(db, server, ca_file, **kw):
    """Connector `sales` (the mailbox MAILBOX) at the test SMTP `server`."""
    connectors.add(
        db,
        NewConnector(
            name="sales",
            direction="outgoing",
            address=MAILBOX,
            host="localhost",
            port=server.port,
            username=MAILBOX,
            ca_file=ca_file,
            **kw,
        ),
    )


def add_oauth_connector(db, server, endpoint, ca_file, monkeypatch, **kw):
    monkeypatch.setenv("SALES_CLIENT_SECRET", CLIENT_SECRET)
    add_sales(
        db,
        server,
        ca_file,
        auth="oauth2",
        oauth_client_id=CLIENT_ID,
        oauth_client_secret_env="SALES_CLIENT_SECRET",
        oauth_token_url=endpoint.url,
        oauth_scopes=("https://mail.google.com/",),
        **kw,
    )


def cli_add(env, server, endpoint, ca_file, *args, input=None):
    """`outbox connector add sales --auth oauth2 … ARGS` as an operator types it."""
    outbox_cli(
        env,
        *("connector", "add", "sales", "--address", MAILBOX, "--username", MAILBOX, "--auth", "oauth2"),
        *("--host", "localhost", "--port", str(server.port), "--ca-file", ca_file),
        *("--oauth-client-id", CLIENT_ID, "--oauth-token-url", endpoint.url, *args),
        input=input,
    )


def enqueue(db, n=1, to="rcpt@example.org"):
    with db.transaction():
        return [
            outbox.enqueue(db, from_addr=MAILBOX, to=[to], subject=f"oauth {i}", text="hello")
            for i in range(n)
        ]


def message(db, msg_id):
    return db.execute(
        "SELECT status, attempts, phase, last_error FROM outbox.message WHERE id = %s", [msg_id]
    ).fetchone()


def connector_state(db):
    return db.execute(
        "SELECT failures, backoff_until IS NOT NULL, last_error FROM outbox.connector WHERE name = 'sales'"
    ).fetchone()


def test_fifty_messages_one_token_fetch(db, xoauth2, endpoint, ca_file, monkeypatch, pipeline):
    add_oauth_connector(db, xoauth2, endpoint, ca_file, monkeypatch, max_connections=4)
    ids = enqueue(db, 50)
    for msg_id in ids:
        pipeline.until_status(msg_id, "sent")
    assert len(xoauth2.recorder.wait_for(50)) == 50
    assert endpoint.fetches == 1  # four sessions at once, one fetch between them
    [token] = set(xoauth2.recorder.presented)
    assert endpoint.valid(token) and xoauth2.recorder.refused == 0
    [form] = endpoint.requests
    assert form["grant_type"] == ["client_credentials"] and form["client_id"] == [CLIENT_ID]
    assert form["scope"] == ["https://mail.google.com/"]


def test_expired_token_is_renewed_before_it_is_presented(
    db, server_tls, endpoint, ca_file, monkeypatch, pipeline
):
    endpoint.expires_in = 2  # renewed after half its life; the server drops sessions past it
    server = start_xoauth2_server(endpoint, MAILBOX, server_tls)
    try:
        add_oauth_connector(db, server, endpoint, ca_file, monkeypatch)
        [first] = enqueue(db)
        pipeline.until_status(first, "sent")
        [old] = server.recorder.presented
        wait_until(lambda: endpoint.expired(old), what="the first token to expire")
        [second] = enqueue(db, to="later@example.org")
        pipeline.until_status(second, "sent")
        assert message(db, second)[:2] == ("sent", 1)
        assert endpoint.fetches == 2
        assert server.recorder.presented == [old, endpoint.issued[1].token]
        assert server.recorder.refused == 0  # renewed before use, never refused
    finally:
        server.stop()


def test_refused_token_is_replaced_once_and_the_mail_goes(
    db, xoauth2, endpoint, ca_file, monkeypatch, pipeline
):
    endpoint.revoke_first = True  # e.g. the app's permission changed after the token was issued
    add_oauth_connector(db, xoauth2, endpoint, ca_file, monkeypatch)
    [msg_id] = enqueue(db)
    pipeline.until_status(msg_id, "sent")
    assert message(db, msg_id)[:2] == ("sent", 1)
    assert endpoint.fetches == 2 and xoauth2.recorder.refused == 1
    assert connector_state(db)[0] == 0


def test_token_refused_twice_is_a_connector_problem(
    db, xoauth2, endpoint, ca_file, monkeypatch, pipeline, cli_env, slow_backoff
):
    endpoint.revoke_all = True
    add_oauth_connector(db, xoauth2, endpoint, ca_file, monkeypatch)
    [msg_id] = enqueue(db)
    pipeline.until_status(msg_id, "retry")
    status, attempts, phase, last_error = message(db, msg_id)
    assert (status, attempts, phase) == ("retry", 0, "auth")  # no attempt spent
    assert "535" in last_error
    assert endpoint.fetches == 2 and xoauth2.recorder.refused == 2  # one refresh, then it stops
    failures, backing_off, _ = connector_state(db)
    assert failures == 1 and backing_off
    endpoint.revoke_all = False  # the administrator fixed the app's permission
    outbox_cli(cli_env, "connector", "reset", "sales")
    pipeline.until_status(msg_id, "sent", timeout=15)
    assert message(db, msg_id)[:2] == ("sent", 1)


@pytest.mark.parametrize(
    "answer, reason",
    [
        ("down", "unreachable: ConnectError"),
        ("invalid_client", "refused the client: invalid_client: AADSTS7000215"),
        ("401", "answered HTTP 401 Unauthorized"),
    ],
)
def test_token_endpoint_failure_backs_off_without_spending_attempts(
    db, xoauth2, endpoint, ca_file, monkeypatch, pipeline, cli_env, slow_backoff, answer, reason
):
    add_oauth_connector(db, xoauth2, endpoint, ca_file, monkeypatch)
    if answer == "down":
        endpoint.stop()
    else:
        endpoint.answer = answer
    ids = enqueue(db, 3)
    for msg_id in ids:
        pipeline.until_status(msg_id, "retry")
    for msg_id in ids:
        status, attempts, phase, last_error = message(db, msg_id)
        assert (status, attempts, phase) == ("retry", 0, "token")
        assert reason in last_error and CLIENT_SECRET not in last_error
    failures, backing_off, connector_error = connector_state(db)
    assert failures == 1 and backing_off and reason in connector_error
    assert xoauth2.recorder.sessions == 0  # no SMTP session without a token
    listed = json.loads(outbox_cli(cli_env, "connector", "list", "--json").stdout)
    assert reason in listed[0]["error"] and listed[0]["state"].startswith("backing off until")
    shown = json.loads(outbox_cli(cli_env, "show", str(ids[0]), "--json").stdout)
    assert any(a["phase"] == "token" and reason in (a["error"] or "") for a in shown["attempts_history"])
    [(actor, detail)] = db.execute(
        "SELECT actor, detail FROM outbox.connector_event WHERE action = 'backing off'"
    ).fetchall()  # the activity history says why, once per backoff window
    assert actor == "worker" and reason in detail["error"] and CLIENT_SECRET not in detail["error"]
    env = dict(cli_env, SALES_CLIENT_SECRET=CLIENT_SECRET, SSL_CERT_FILE=ca_file)
    test = outbox_cli(env, "connector", "test", "sales", check=False)
    assert (
        test.returncode == 1
        and f"FAIL token: TokenError: token endpoint localhost:{endpoint.port}" in test.stdout
    )
    assert reason in test.stdout
    # the endpoint is back; the operator ends the backoff; the waiting mail goes out
    if answer == "down":
        endpoint.start()
    endpoint.answer = "ok"
    outbox_cli(cli_env, "connector", "reset", "sales")
    for msg_id in ids:
        pipeline.until_status(msg_id, "sent", timeout=15)
        assert message(db, msg_id)[:2] == ("sent", 1)
    assert len(xoauth2.recorder.wait_for(3)) == 3


def test_connector_test_shows_the_token_step_then_ehlo_and_xoauth2(db, xoauth2, endpoint, ca_file, cli_env):
    env = dict(cli_env, SALES_CLIENT_SECRET=CLIENT_SECRET, SSL_CERT_FILE=ca_file)
    cli_add(env, xoauth2, endpoint, ca_file, "--oauth-client-secret-env", "SALES_CLIENT_SECRET", "--test")
    out = outbox_cli(env, "connector", "test", "sales", "--json")
    steps = json.loads(out.stdout)["steps"]
    assert [s["step"] for s in steps] == ["token", "connect", "ehlo", "starttls", "ehlo", "auth", "tls"]
    assert all(s["ok"] for s in steps)
    assert steps[0]["detail"] == f"access token received from localhost:{endpoint.port} (client {CLIENT_ID})"
    assert steps[5]["detail"] == f"authenticated with AUTH XOAUTH2 as {MAILBOX}"
    assert xoauth2.recorder.received == [] and endpoint.fetches == 2  # --test, then test
    # the token endpoint's certificate is checked against SSL_CERT_FILE, not --ca-file
    untrusted = outbox_cli(dict(env, SSL_CERT_FILE="/dev/null"), "connector", "test", "sales", check=False)
    assert untrusted.returncode == 1 and "FAIL token:" in untrusted.stdout
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stdout


def refuse_basic_auth(server, session, envelope, mechanism, auth_data):
    """Exchange Online with SMTP AUTH Basic turned off for the tenant."""
    return AuthResult(
        success=False,
        handled=False,
        message="550 5.7.30 Basic authentication is not supported for Client Submission.",
    )


def test_basic_auth_refusal_says_oauth_is_required_and_how_to_switch(
    db, server_tls, ca_file, pipeline, cli_env, monkeypatch, slow_backoff
):
    server = start_server(mode="starttls", tls=server_tls, auth=refuse_basic_auth)
    try:
        monkeypatch.setenv("SALES_PW", "old-password")
        add_sales(db, server, ca_file, password_env="SALES_PW")
        [msg_id] = enqueue(db)
        pipeline.until_status(msg_id, "retry")
        status, attempts, phase, last_error = message(db, msg_id)
        assert (status, attempts, phase) == ("retry", 0, "auth")  # waits for the operator's switch
        hint = (
            "the server requires OAuth 2.0 (XOAUTH2): switch with "
            "`outbox connector update sales --auth oauth2"
        )
        assert (
            last_error.startswith("550 5.7.30 Basic authentication is not supported") and hint in last_error
        )
        listed = outbox_cli(cli_env, "connector", "list", "--wide")
        assert "5.7.30" in listed.stdout and hint in listed.stdout
        assert server.recorder.received == []
    finally:
        server.stop()


class RedisMonitor:
    """Every command the Redis server receives while it runs (MONITOR on a raw socket)."""

    def __init__(self, port: int = 6379) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(b"MONITOR\r\n")
        self.chunks: list[bytes] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while chunk := self.sock.recv(65536):
            self.chunks.append(chunk)

    def stop(self) -> str:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(timeout=10)
        self.sock.close()
        return b"".join(self.chunks).decode(errors="replace")


def test_client_secret_and_tokens_never_leak(db, xoauth2, endpoint, ca_file, cli_env, config):
    env = dict(
        cli_env,
        OUTBOX_SECRET_KEY=Fernet.generate_key().decode(),
        OUTBOX_LOG_LEVEL="debug",
        OUTBOX_LOG_FORMAT="json",
        SSL_CERT_FILE=ca_file,
    )
    cli_add(env, xoauth2, endpoint, ca_file, "--oauth-client-secret-stdin", input=CLIENT_SECRET + "\n")
    enqueue(db, 3)
    monitor = RedisMonitor()
    worker = subprocess.Popen(
        [sys.executable, "-m", "outbox.cli", "run", "--until-idle"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    cmdline = Path(f"/proc/{worker.pid}/cmdline").read_bytes().decode(errors="replace")
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    output, _ = worker.communicate(timeout=120)
    assert worker.returncode == 0, output
    assert len(xoauth2.recorder.wait_for(3)) == 3
    # the token endpoint turns the client away, echoing the secret it was sent
    endpoint.answer = "invalid_client"
    failing = enqueue(db, to="second@example.org")[0]
    db.execute("UPDATE outbox.connector SET updated_at = now()")  # a new pool: no cached token
    second = subprocess.run(
        [sys.executable, "-m", "outbox.cli", "run", "--until-idle"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    broker = monitor.stop()
    tested = outbox_cli(env, "connector", "test", "sales", check=False)
    assert tested.returncode == 1 and "invalid_client" in tested.stdout
    assert message(db, failing)[:3] == ("retry", 0, "token")
    redis_keys = json.dumps(
        [
            [str(k), str(redis_client.dump(k))]
            for redis_client in [redis.Redis.from_url(config.redis_url)]
            for k in redis_client.scan_iter(match=f"{config.redis_namespace}*")
        ]
    )
    texts = {
        "first run": output,
        "second run": second.stdout + second.stderr,
        "cmdline": cmdline,
        "ps": ps,
        "broker": broker,
        "redis keys": redis_keys,
        "connector test": tested.stdout + tested.stderr,
        "list": outbox_cli(env, "connector", "list", "--json").stdout
        + outbox_cli(env, "connector", "list").stdout,
        "show": outbox_cli(env, "show", str(failing), "--json").stdout,
        "rows": json.dumps(
            [r[0] for r in db.execute("SELECT row_to_json(m)::text FROM outbox.message m")]
            + [r[0] for r in db.execute("SELECT row_to_json(a)::text FROM outbox.attempt a")]
            + [r[0] for r in db.execute("SELECT row_to_json(c)::text FROM outbox.connector c")]
            + [r[0] for r in db.execute("SELECT row_to_json(e)::text FROM outbox.connector_event e")]
        ),
    }
    assert "HSET" in broker or "hset" in broker.lower()  # the monitor saw the dispatches
    secrets_ = [
        CLIENT_SECRET,
        *(i.token for i in endpoint.issued),
        *(b.decode() for b in xoauth2.recorder.blobs),
    ]
    assert len(secrets_) >= 3
    for where, text in texts.items():
        for secret in secrets_:
            assert secret not in text, f"a secret leaked into {where}"
    assert "invalid_client" in texts["second run"]  # the reason is logged, without the secret
