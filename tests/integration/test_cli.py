"""The `outbox` command as an operator runs it: exit codes, one-line errors, effects on rows
and on what the SMTP server receives."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from cryptography.fernet import Fernet

from outbox.store.migrate import latest
from tests.helpers import add_gateway, one_line_error
from tests.helpers import outbox_cli as outbox


def count(db):
    return db.execute("SELECT count(*) FROM outbox.message").fetchone()[0]


def test_db_init_is_idempotent(cli_env):
    assert outbox(cli_env, "db", "init").stdout.strip() == f"already at version {latest()}"
    assert outbox(cli_env, "db", "init").returncode == 0


def test_send_prints_only_the_id(cli_env, db, parked_gateway):
    out = outbox(
        cli_env,
        "send",
        "--from",
        "a@example.com",
        "--to",
        "b@example.org",
        "--to",
        "c@example.org",
        "--cc",
        "d@example.org",
        "--subject",
        "Hi",
        "--text",
        "body",
    ).stdout
    msg_id = int(out.strip())
    assert out == f"{msg_id}\n"
    row = db.execute(
        "SELECT to_addrs, cc_addrs, status FROM outbox.message WHERE id = %s", [msg_id]
    ).fetchone()
    assert row == (["b@example.org", "c@example.org"], ["d@example.org"], "queued")


def send_one(env):
    return outbox(
        env, "send", "--from", "app@example.com", "--to", "b@example.org", "--subject", "Hi", "--text", "t"
    )


def test_send_without_a_route_warns_writes_it_and_a_replay_delivers_it(cli_env, db, smtp, pipeline):
    """No connector and no gateway: the message is written all the same (exit 0, its id on
    stdout, a warning on stderr), fails at send time with the reason, and goes out once an
    operator adds a gateway and replays it."""
    sent = send_one(cli_env)
    msg_id = int(sent.stdout)
    assert sent.stdout == f"{msg_id}\n"
    assert sent.stderr.startswith(
        "warning: no connector or enabled gateway routes app@example.com right now; "
        "the message will fail unless one is added: "
    ), sent.stderr
    assert f"outbox replay {msg_id}" in sent.stderr
    pipeline.until_status(msg_id, "failed")
    error = db.execute("SELECT last_error FROM outbox.message WHERE id = %s", [msg_id]).fetchone()[0]
    assert error == "no connector for app@example.com and no System Default Gateway"
    assert smtp.recorder.received == []
    add_gateway(db, smtp)
    outbox(cli_env, "replay", str(msg_id))
    pipeline.until_status(msg_id, "sent")
    [got] = smtp.recorder.wait_for(1)
    assert got.rcpt_tos == ["b@example.org"]


def test_send_with_a_route_says_nothing_on_stderr(cli_env, parked_gateway):
    sent = send_one(cli_env)
    assert sent.stderr == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (["--from", "not-an-address", "--to", "b@example.org"], "from: invalid address"),
        (
            ["--from", "a@example.com", "--to", "b@example.org", "--header", "Bcc: x@evil.example"],
            "header 'Bcc' is not allowed",
        ),
        (
            [
                "--from",
                "a@example.com",
                "--to",
                "b@example.org",
                "--send-at",
                "2030-01-01T10:00:00",
            ],
            "needs a time zone",
        ),
        (["--from", "a@example.com"], "at least one recipient"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(cli_env, db, args, message):
    proc = outbox(cli_env, "send", *args, "--subject", "s", "--text", "t", check=False)
    assert message in one_line_error(proc, code=2)
    assert count(db) == 0


def test_subject_with_line_break_is_refused(cli_env, db):
    proc = outbox(
        cli_env,
        "send",
        "--from",
        "a@example.com",
        "--to",
        "b@example.org",
        "--subject",
        "hi\r\nBcc: victim@example.org",
        "--text",
        "t",
        check=False,
    )
    assert "subject must be a single line" in one_line_error(proc, code=2)
    assert count(db) == 0


def test_size_limit_is_checked_at_enqueue(cli_env, db, parked_gateway):
    outbox(cli_env, "settings", "set", "max-message-bytes", "2048")
    proc = outbox(
        cli_env,
        "send",
        "--from",
        "a@example.com",
        "--to",
        "b@example.org",
        "--subject",
        "big",
        "--text",
        "x" * 5000,
        check=False,
    )
    assert "over the maximum email size of 2048 bytes" in one_line_error(proc, code=2)
    assert count(db) == 0


def test_idempotency_key_inserts_once(cli_env, db, parked_gateway):
    args = [
        "send",
        "--from",
        "a@example.com",
        "--to",
        "b@example.org",
        "--subject",
        "s",
        "--text",
        "t",
        "--idempotency-key",
        "order-1001-confirmation",
    ]
    first, second = outbox(cli_env, *args).stdout, outbox(cli_env, *args).stdout
    assert first == second and count(db) == 1


def test_settings_set_and_show(cli_env):
    outbox(cli_env, "settings", "set", "retry-base-seconds", "1")
    outbox(cli_env, "settings", "set", "additional-bcc", "archive@example.com, audit@example.com")
    shown = json.loads(outbox(cli_env, "settings", "show", "--json").stdout)
    assert shown["retry-base-seconds"] == 1
    assert shown["additional-bcc"] == ["archive@example.com", "audit@example.com"]
    assert {
        "unmonitored-address",
        "retry-max-seconds",
        "max-attempts",
        "lease-seconds",
        "max-message-bytes",
        "override-to",
        "override-cc",
        "override-bcc",
    } <= set(shown)
    assert "max-attempts: Input should be less than or equal to 10" in one_line_error(
        outbox(cli_env, "settings", "set", "max-attempts", "11", check=False), code=2
    )
    assert "retry-max-seconds must not be below" in one_line_error(
        outbox(cli_env, "settings", "set", "retry-max-seconds", "0.5", check=False), code=2
    )
    unknown = outbox(cli_env, "settings", "set", "colour", "blue", check=False)
    assert "Invalid value for 'KEY'" in one_line_error(unknown, code=2)


def test_connector_list_never_shows_a_password(cli_env, monkeypatch):
    outbox(
        cli_env,
        "connector",
        "add",
        "relay",
        "--address",
        "relay@example.com",
        "--host",
        "localhost",
        "--port",
        "587",
        "--username",
        "u",
        "--password-env",
        "RELAY_PW",
        "--default-gateway",
    )
    env = dict(cli_env, OUTBOX_SECRET_KEY=Fernet.generate_key().decode())
    outbox(
        env,
        "connector",
        "add",
        "sales",
        "--address",
        "sales@example.com",
        "--host",
        "localhost",
        "--port",
        "465",
        "--username",
        "s",
        "--password-stdin",
        input="hunter2-secret\n",
    )
    listed = outbox(cli_env, "connector", "list", "--json").stdout
    assert "hunter2-secret" not in listed
    rows = {c["name"]: c for c in json.loads(listed)}
    assert rows["relay"]["password"] == "env:RELAY_PW" and rows["relay"]["effective_security"] == "starttls"
    assert rows["sales"]["password"] == "encrypted" and rows["sales"]["effective_security"] == "tls"
    assert rows["relay"]["default_gateway"] is True
    table = outbox(cli_env, "connector", "list").stdout
    assert "relay" in table and "hunter2" not in table


def test_password_stdin_needs_a_secret_key(cli_env, db):
    proc = outbox(
        cli_env,
        "connector",
        "add",
        "x",
        "--address",
        "x@example.com",
        "--host",
        "h",
        "--port",
        "587",
        "--username",
        "u",
        "--password-stdin",
        input="pw\n",
        check=False,
    )
    assert "OUTBOX_SECRET_KEY is not set" in one_line_error(proc)
    assert db.execute("SELECT count(*) FROM outbox.connector").fetchone()[0] == 0


def test_connector_test_reports_each_step(cli_env, smtp_factory, ca_file):
    server = smtp_factory("starttls", username="u", password="right")
    outbox(
        cli_env,
        "connector",
        "add",
        "good",
        "--address",
        "good@example.com",
        "--host",
        "localhost",
        "--port",
        str(server.port),
        "--username",
        "u",
        "--password-env",
        "PW",
        "--ca-file",
        ca_file,
    )
    ok = outbox(dict(cli_env, PW="right"), "connector", "test", "good", "--json")
    steps = json.loads(ok.stdout)["steps"]
    assert [s["step"] for s in steps] == ["connect", "ehlo", "starttls", "ehlo", "auth", "tls"]
    assert all(s["ok"] for s in steps)
    assert server.recorder.received == []
    bad = outbox(dict(cli_env, PW="wrong"), "connector", "test", "good", check=False)
    assert bad.returncode == 1
    assert "FAIL auth: SMTPAuthenticationError" in bad.stdout and "535" in bad.stdout


def test_run_until_idle_delivers_and_status_shows_it(cli_env, smtp, db):
    outbox(
        cli_env,
        "connector",
        "add",
        "gw",
        "--address",
        "gw@example.com",
        "--host",
        "localhost",
        "--port",
        str(smtp.port),
        "--default-gateway",
    )
    ids = [
        outbox(
            cli_env,
            "send",
            "--from",
            "a@example.com",
            "--to",
            f"r{i}@example.org",
            "--subject",
            f"n{i}",
            "--text",
            "t",
        ).stdout.strip()
        for i in range(3)
    ]
    ran = outbox(cli_env, "run", "--until-idle", "--threads", "2")
    assert "done: 3 message(s) finished (sent 3); 0 wait for a later retry or schedule" in ran.stderr
    assert sorted(r.message["Subject"] for r in smtp.recorder.wait_for(3)) == ["n0", "n1", "n2"]
    status = json.loads(outbox(cli_env, "status", "--json").stdout)
    assert status["counts"]["sent"] == 3 and status["counts"]["queued"] == 0
    assert status["by_connector"] == {"gw": {"sent": 3}}
    shown = json.loads(outbox(cli_env, "show", ids[0], "--json").stdout)
    assert shown["status"] == "sent" and shown["recipients"][0]["status"] == "sent"
    assert shown["attempts_history"][0]["smtp_code"] == 250
    # for scripts: ISO 8601 timestamps that round-trip, the stored MIME message as text
    for stamp in (shown["created_at"], shown["sent_at"], shown["attempts_history"][0]["started_at"]):
        assert "T" in stamp and datetime.fromisoformat(stamp).tzinfo is not None, stamp
    assert shown["content"].startswith(("From:", "Subject:", "To:", "Message-ID:", "Date:"))
    assert shown["content_base64"] is None and "Subject: n0" in shown["content"]
    text = outbox(cli_env, "show", ids[0]).stdout
    assert "sent" in text and "Message-ID" in text


def test_status_warns_when_recipients_are_overridden(cli_env):
    outbox(cli_env, "settings", "set", "override-to", "qa@example.com")
    assert "WARNING: test-environment override" in outbox(cli_env, "status").stdout


def test_show_unknown_id(cli_env):
    assert "no message with id 999" in one_line_error(outbox(cli_env, "show", "999", check=False))


def test_unreachable_database_is_one_line(cli_env):
    env = dict(cli_env, OUTBOX_DATABASE_URL="postgresql://postgres@127.0.0.1:1/nowhere?connect_timeout=2")
    assert "cannot reach the database" in one_line_error(outbox(env, "status", check=False), code=3)


def test_missing_schema_says_run_db_migrate(cli_env, database_url, db):
    db.execute("DROP SCHEMA outbox CASCADE")
    line = one_line_error(outbox(cli_env, "status", check=False))
    assert "schema is missing or older than this code: run `outbox db migrate`" in line


def test_help_shows_env_vars(cli_env):
    text = outbox(cli_env, "run", "--help").stdout
    for var in (
        "OUTBOX_DATABASE_URL",
        "OUTBOX_REDIS_URL",
        "OUTBOX_METRICS_PORT",
        "OUTBOX_METRICS_HOST",
        "OUTBOX_WORKER_THREADS",
    ):
        assert var in text


def test_connector_add_with_test_saves_only_after_a_good_test_connection(cli_env, smtp_factory, ca_file, db):
    server = smtp_factory("starttls", username="u", password="right")
    common = [
        "--address",
        "gw@example.com",
        "--host",
        "localhost",
        "--port",
        str(server.port),
        "--username",
        "u",
        "--password-env",
        "PW",
        "--ca-file",
        ca_file,
        "--test",
    ]
    bad = outbox(dict(cli_env, PW="wrong"), "connector", "add", "gw", *common, check=False)
    assert "Test Connection failed at auth" in one_line_error(bad) and "not saved" in bad.stderr
    assert db.execute("SELECT count(*) FROM outbox.connector").fetchone()[0] == 0
    good = outbox(dict(cli_env, PW="right"), "connector", "add", "gw", *common)
    assert "Test Connection passed" in good.stdout
    assert server.recorder.received == []


def test_database_url_before_the_command_and_missing_database_hint(cli_env, database_url):
    env = {k: v for k, v in cli_env.items() if k != "OUTBOX_DATABASE_URL"}
    ok = outbox(env, "--database-url", database_url, "status", "--json")
    assert json.loads(ok.stdout)["counts"]["queued"] == 0
    missing = database_url.replace("dbname=", "dbname=missing_")
    line = one_line_error(outbox(env, "status", "--database-url", missing, check=False), code=3)
    assert "does not exist" in line and "createdb" in line


def test_settings_set_help_lists_every_key_with_its_default(cli_env):
    from outbox.core.settings import KEYS

    text = outbox(cli_env, "settings", "set", "--help").stdout
    for key in KEYS:
        assert f"\n    {key} " in text, key
    assert "smtp-dot-timeout-seconds" in text and "(default 600" in text
