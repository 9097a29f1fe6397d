"""Hardening as an attacker or an auditor would check it: secrets never leak, the envelope
is explicit, addresses are encoded safely, keys rotate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from cryptography.fernet import Fernet

import outbox
from outbox.admin import connectors
from outbox.admin.connectors import NewConnector
from tests.helpers import outbox_cli

SECRET = "Pw-9f8e7d6c5b4a-unique-secret"


def add_gateway_with_stored_password(env, server, ca_file):
    """The TLS test server as System Default Gateway, its password given on stdin (stored
    encrypted under $OUTBOX_SECRET_KEY)."""
    outbox_cli(
        env,
        "connector",
        "add",
        "gw",
        "--address",
        "gw@example.com",
        "--host",
        "localhost",
        "--port",
        str(server.port),
        "--username",
        "u",
        "--password-stdin",
        "--ca-file",
        ca_file,
        "--default-gateway",
        input=SECRET + "\n",
    )


def enqueue(db, to="x@example.org", **kw):
    with db.transaction():
        return outbox.enqueue(db, from_addr="app@example.com", to=[to], subject="s", text="t", **kw)


def test_password_never_in_logs_arguments_or_errors(cli_env, db, smtp_factory, ca_file, tmp_path):
    server = smtp_factory("starttls", username="u", password=SECRET)
    key = Fernet.generate_key().decode()
    env = dict(cli_env, OUTBOX_SECRET_KEY=key, OUTBOX_LOG_LEVEL="debug", OUTBOX_LOG_FORMAT="json")
    add_gateway_with_stored_password(env, server, ca_file)
    enqueue(db)
    # the worker's own command line, while it runs, carries no password either
    worker = subprocess.Popen(
        [sys.executable, "-m", "outbox.cli", "run", "--until-idle"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    cmdline = Path(f"/proc/{worker.pid}/cmdline").read_bytes().decode(errors="replace")
    output, _ = worker.communicate(timeout=120)
    assert worker.returncode == 0, output
    assert len(server.recorder.received) == 1
    assert server.authenticator.logins == ["u"]
    # a failing login puts the reply, not the password, into the row and the logs
    db.execute(
        "UPDATE outbox.connector SET password_enc = %s", [Fernet(key).encrypt(b"wrong-" + SECRET.encode())]
    )
    failing = enqueue(db, to="y@example.org")
    run = subprocess.run(
        [sys.executable, "-m", "outbox.cli", "run", "--until-idle"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    stored = json.dumps(
        db.execute("SELECT row_to_json(m) FROM outbox.message m WHERE id = %s", [failing]).fetchone()[0]
    )
    history = json.dumps([list(r) for r in db.execute("SELECT error, smtp_reply FROM outbox.attempt")])
    listed = outbox_cli(env, "connector", "list", "--json").stdout
    shown = outbox_cli(env, "show", str(failing), "--json").stdout
    for where, text in [
        ("first run", output),
        ("second run", run.stdout + run.stderr),
        ("cmdline", cmdline),
        ("row", stored),
        ("attempts", history),
        ("list", listed),
        ("show", shown),
    ]:
        assert SECRET not in text, f"password leaked into {where}"
    assert "535" in stored


def test_broker_messages_carry_only_ids_and_tokens(db, stopped_pipeline, config, smtp):
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
    enqueue(db, to="secret-recipient@example.org")
    stopped_pipeline.cycle()
    client = redis.Redis.from_url(config.redis_url)
    blobs = [
        v
        for key in client.scan_iter(match=f"{config.redis_namespace}*")
        if client.type(key) == b"hash"
        for v in client.hvals(key)
    ]
    assert blobs, "the dispatched batch should be in Redis"
    body = json.loads(blobs[0])
    assert body["actor_name"] == "deliver"
    [[msg_id, token]] = body["args"][0]
    assert isinstance(msg_id, int) and len(token) == 36
    assert all(b"secret-recipient" not in b for b in blobs)


def test_rotate_key_reencrypts_and_old_key_can_go(cli_env, db, smtp_factory, ca_file, pipeline, monkeypatch):
    server = smtp_factory("starttls", username="u", password=SECRET)
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    add_gateway_with_stored_password(dict(cli_env, OUTBOX_SECRET_KEY=old), server, ca_file)
    wrong = outbox_cli(dict(cli_env, OUTBOX_SECRET_KEY=new), "connector", "rotate-key", check=False)
    assert wrong.returncode == 1 and "cannot be decrypted with any key" in wrong.stderr
    done = outbox_cli(dict(cli_env, OUTBOX_SECRET_KEY=f"{new},{old}"), "connector", "rotate-key")
    assert "1 password(s) re-encrypted" in done.stdout
    monkeypatch.setenv("OUTBOX_SECRET_KEY", new)  # the old key is gone now
    msg_id = enqueue(db)
    pipeline.until_status(msg_id, "sent")
    assert server.authenticator.logins == ["u"]
    actions = [r[0] for r in db.execute("SELECT action FROM outbox.connector_event ORDER BY id")]
    assert actions == ["created", "password re-encrypted"]


def test_idn_domain_goes_as_punycode_in_the_envelope(db, smtp, pipeline):
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
    msg_id = enqueue(db, to="leser@bücher.example")
    pipeline.until_status(msg_id, "sent")
    [got] = smtp.recorder.wait_for(1)
    assert got.rcpt_tos == ["leser@xn--bcher-kva.example"]


@pytest.mark.parametrize("utf8_server, status", [(False, "failed"), (True, "sent")])
def test_non_ascii_local_part_needs_smtputf8(db, smtp_factory, pipeline, utf8_server, status):
    server = smtp_factory("plain", enable_SMTPUTF8=utf8_server)
    connectors.add(
        db,
        NewConnector(
            name="gw",
            direction="outgoing",
            address="gw@example.com",
            host="localhost",
            port=server.port,
            default_gateway=True,
        ),
    )
    msg_id = enqueue(db, to="jörg@example.org")
    pipeline.until_status(msg_id, status)
    if status == "failed":
        assert (
            "SMTPUTF8"
            in db.execute("SELECT last_error FROM outbox.message WHERE id = %s", [msg_id]).fetchone()[0]
        )
        assert server.recorder.received == []
    else:
        assert server.recorder.wait_for(1)[0].rcpt_tos == ["jörg@example.org"]


def test_no_environment_switch_disables_certificate_checks(db, smtp_factory, pipeline, monkeypatch):
    # the usual escape hatches of Python's ssl do not turn verification off
    monkeypatch.setenv("PYTHONHTTPSVERIFY", "0")
    monkeypatch.setenv("SSL_CERT_FILE", os.devnull)
    server = smtp_factory("tls")
    connectors.add(
        db,
        NewConnector(
            name="gw",
            direction="outgoing",
            address="gw@example.com",
            host="localhost",
            port=server.port,
            security="tls",
            default_gateway=True,
        ),
    )
    msg_id = enqueue(db)
    pipeline.until_status(msg_id, "retry")
    assert server.recorder.received == []
