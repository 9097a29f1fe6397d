"""SMTP fault semantics, decided from phase + reply, seen from the server's side: which
copies arrived, their Message-IDs, and the row's final status."""

from __future__ import annotations

import pytest

import outbox
from tests.helpers import add_gateway


@pytest.fixture
def fast_retries(db):
    db.execute("UPDATE outbox.settings SET retry_base_seconds = 0.1, retry_max_seconds = 0.3")


def gateway(db, server, **kw):
    add_gateway(db, server, **kw)


def enqueue(db, to=("x@example.org",)):
    with db.transaction():
        return outbox.enqueue(db, from_addr="a@example.com", to=list(to), subject="s", text="t")


def row(db, msg_id, *cols):
    return db.execute(f"SELECT {', '.join(cols)} FROM outbox.message WHERE id = %s", [msg_id]).fetchone()


def outcomes(db, msg_id):
    return [
        r[0]
        for r in db.execute(
            "SELECT outcome FROM outbox.attempt_history WHERE message_id = %s ORDER BY id NULLS LAST",
            [msg_id],
        )
    ]


@pytest.mark.parametrize(
    "reply", ["421 4.3.2 shutting down", "450 4.2.1 busy", "451 4.3.0 local error", "452 4.3.1 no space"]
)
def test_transient_data_reply_retries_then_one_copy(db, smtp, pipeline, fast_retries, reply):
    gateway(db, smtp)
    smtp.recorder.data_replies.append(reply)
    msg_id = enqueue(db)
    pipeline.until_status(msg_id, "sent")
    assert len(smtp.recorder.wait_for(1)) == 1
    assert outcomes(db, msg_id) == ["retry", "sent"]


@pytest.mark.parametrize("reply", ["550 5.1.1 no such user", "552 5.3.4 too big", "554 5.7.1 rejected"])
def test_permanent_data_reply_fails_without_a_copy(db, smtp, pipeline, reply):
    gateway(db, smtp)
    smtp.recorder.data_replies.append(reply)
    msg_id = enqueue(db)
    pipeline.until_status(msg_id, "failed")
    assert row(db, msg_id, "last_smtp_code", "phase") == (int(reply[:3]), "dot")
    assert smtp.recorder.received == []


@pytest.mark.parametrize(
    "reply, status",
    [
        ("450 4.2.1 busy", "sent"),
        ("451 4.3.0 try later", "sent"),
        ("452 4.2.2 full", "sent"),
        ("552 5.2.2 mailbox full", "sent"),  # RFC 5321: 552 to RCPT counts as 452
        ("550 5.1.1 unknown", "failed"),
        ("554 5.7.1 denied", "failed"),
    ],
)
def test_rcpt_replies(db, smtp, pipeline, fast_retries, reply, status):
    gateway(db, smtp)
    smtp.recorder.script_rcpt("x@example.org", reply, "250 OK")
    msg_id = enqueue(db)
    pipeline.until_status(msg_id, status)
    assert len(smtp.recorder.received) == (1 if status == "sent" else 0)


@pytest.mark.parametrize(
    "reply, status", [("451 4.3.0 later", "sent"), ("550 5.7.1 sender denied", "failed")]
)
def test_mail_from_replies(db, smtp, pipeline, fast_retries, reply, status):
    gateway(db, smtp)
    smtp.recorder.mail_replies.append(reply)
    msg_id = enqueue(db)
    pipeline.until_status(msg_id, status)
    assert row(db, msg_id, "attempts")[0] == (2 if status == "sent" else 1)


def test_disconnect_before_the_final_dot_retries_without_a_duplicate(db, smtp, pipeline, fast_retries):
    gateway(db, smtp)
    smtp.recorder.script_rcpt("x@example.org", "drop", "250 OK")
    msg_id = enqueue(db)
    pipeline.until_status(msg_id, "sent")
    assert len(smtp.recorder.wait_for(1)) == 1
    assert outcomes(db, msg_id) == ["retry", "sent"]


def test_disconnect_after_the_final_dot_is_ambiguous_and_resent_with_same_message_id(
    db, smtp, pipeline, fast_retries
):
    gateway(db, smtp)
    smtp.recorder.data_replies.append("drop")
    msg_id = enqueue(db)
    pipeline.until_status(msg_id, "sent")
    first, second = smtp.recorder.wait_for(2)
    assert first.message_id == second.message_id == row(db, msg_id, "message_id")[0]
    assert outcomes(db, msg_id) == ["ambiguous", "sent"]


def test_ambiguous_outcome_can_be_held_for_an_operator(db, smtp, pipeline):
    gateway(db, smtp)
    db.execute("UPDATE outbox.settings SET ambiguous_policy = 'hold'")
    smtp.recorder.data_replies.append("drop")
    msg_id = enqueue(db)
    pipeline.until_status(msg_id, "failed")
    assert "ambiguous" in row(db, msg_id, "last_error")[0]
    pipeline.cycle()
    assert len(smtp.recorder.received) == 1
    assert outcomes(db, msg_id) == ["ambiguous"]


def test_reply_slower_than_the_command_timeout_after_the_dot_is_waited_for(db, smtp, pipeline):
    """The final dot has its own timeout (servers scan large messages before they answer):
    a reply later than the per-command timeout is still a delivery, sent once."""
    gateway(db, smtp)
    db.execute("UPDATE outbox.settings SET smtp_timeout_seconds = 0.3, smtp_dot_timeout_seconds = 30")
    smtp.recorder.data_replies.append("slow:1.5")
    msg_id = enqueue(db)
    pipeline.until_status(msg_id, "sent")
    assert len(smtp.recorder.received) == 1
    assert outcomes(db, msg_id) == ["sent"]


def test_reply_slower_than_the_final_dot_timeout_is_ambiguous(db, smtp, pipeline, fast_retries):
    gateway(db, smtp)
    db.execute("UPDATE outbox.settings SET smtp_timeout_seconds = 5, smtp_dot_timeout_seconds = 0.3")
    smtp.recorder.data_replies.append("slow:1.5")
    msg_id = enqueue(db)
    pipeline.until_status(msg_id, "sent")
    copies = smtp.recorder.wait_for(2)
    assert len({c.message_id for c in copies}) == 1
    assert outcomes(db, msg_id)[0] == "ambiguous"


def test_reply_slower_than_the_timeout_in_the_envelope_is_retried(db, smtp, pipeline, fast_retries):
    """Every reply gets smtp_timeout_seconds, not just the first of a transaction."""
    gateway(db, smtp)
    db.execute("UPDATE outbox.settings SET smtp_timeout_seconds = 0.3")
    smtp.recorder.script_rcpt("late@example.org", "slow:1.5", "250 OK")
    msg_id = enqueue(db, to=["late@example.org"])
    pipeline.until_status(msg_id, "sent")
    first = db.execute(
        "SELECT outcome, phase, error FROM outbox.attempt_history WHERE message_id = %s"
        " ORDER BY id NULLS LAST LIMIT 1",
        [msg_id],
    ).fetchone()
    assert first[:2] == ("retry", "rcpt")
    assert "Timed out waiting for server response" in first[2]
    assert len(smtp.recorder.wait_for(1)) == 1


def test_a_transaction_longer_than_the_timeout_is_fine_when_each_reply_is_in_time(db, smtp, pipeline):
    gateway(db, smtp)
    db.execute("UPDATE outbox.settings SET smtp_timeout_seconds = 1.0")
    smtp.recorder.script_rcpt("late@example.org", "slow:0.6")
    smtp.recorder.data_replies.append("slow:0.6")
    msg_id = enqueue(db, to=["late@example.org"])
    pipeline.until_status(msg_id, "sent")
    assert outcomes(db, msg_id) == ["sent"]


def test_bad_credentials_back_off_the_connector_not_the_messages(
    db, smtp_factory, pipeline, ca_file, monkeypatch, fast_retries
):
    server = smtp_factory("starttls", username="u", password="right")
    monkeypatch.setenv("PW", "wrong")
    gateway(db, server, username="u", password_env="PW", ca_file=ca_file)
    ids = [enqueue(db, to=[f"r{i}@example.org"]) for i in range(3)]
    for msg_id in ids:
        pipeline.until_status(msg_id, "retry")
    c = db.execute("SELECT failures, backoff_until > now(), last_error FROM outbox.connector").fetchone()
    assert c[0] >= 1 and c[1] and "535" in c[2]
    assert [row(db, i, "attempts")[0] for i in ids] == [0, 0, 0]  # no message spent an attempt
    monkeypatch.setenv("PW", "right")
    db.execute("UPDATE outbox.connector SET backoff_until = now()")
    db.execute("UPDATE outbox.message SET next_attempt_at = now()")
    for msg_id in ids:
        pipeline.until_status(msg_id, "sent")
    assert len(server.recorder.wait_for(3)) == 3
    assert db.execute("SELECT failures, backoff_until FROM outbox.connector").fetchone() == (0, None)


def test_unreachable_server_ends_failed_only_at_max_age(db, smtp, pipeline, fast_retries):
    smtp.stop()  # nothing listens there any more
    gateway(db, smtp)
    msg_id = enqueue(db)
    pipeline.until_status(msg_id, "retry")
    assert row(db, msg_id, "attempts", "phase") == (0, "connect")
    db.execute("UPDATE outbox.message SET created_at = now() - interval '6 days', next_attempt_at = now()")
    db.execute("UPDATE outbox.connector SET backoff_until = now()")
    pipeline.until_status(msg_id, "failed")
    assert "maximum age reached" in row(db, msg_id, "last_error")[0]


def expected(phase: str, code: int) -> str:
    """The semantics: refusals before MAIL are the connector's (retry, no attempt spent);
    4xx (incl. 421) retry; 552 to RCPT counts as 452; other 5xx fail the message."""
    if phase in ("greeting", "ehlo") or code < 500 or (phase == "rcpt" and code == 552):
        return "retry"
    return "failed"


# Before EHLO's reply nothing can be pipelined: those phases only need the lock-step server.
PHASE_CASES = [
    *((phase, False) for phase in ("greeting", "ehlo", "mail", "rcpt", "data", "dot")),
    *((phase, True) for phase in ("mail", "rcpt", "data", "dot")),
]


@pytest.mark.parametrize(
    "phase, pipelining", PHASE_CASES, ids=[f"{p}-{'pipelined' if x else 'lockstep'}" for p, x in PHASE_CASES]
)
@pytest.mark.parametrize("code", [421, 450, 451, 452, 550, 552, 554])
def test_every_reply_at_every_phase(db, pipeline, phase, pipelining, code):
    from tests.faultsmtp import ScriptedServer

    server = ScriptedServer(pipelining=pipelining, **{phase: f"{code} refused at {phase}"})
    try:
        gateway(db, server)
        msg_id = enqueue(db)
        want = expected(phase, code)
        pipeline.until_status(msg_id, want)
        attempts, smtp_code, last_error = row(db, msg_id, "attempts", "last_smtp_code", "last_error")
        assert smtp_code == code and f"refused at {phase}" in last_error
        assert server.accepted == 0
        assert server.improper == 0  # never pipelined to a server that did not offer it
        failures = db.execute("SELECT failures FROM outbox.connector").fetchone()[0]
        if phase in ("greeting", "ehlo"):
            assert (attempts, failures) == (0, 1)  # the connector backs off; the message waits
        else:
            assert (attempts, failures) == (1, 0)
    finally:
        server.stop()


@pytest.mark.parametrize("offered", [True, False], ids=["offered", "not-offered"])
def test_pipelining_only_where_the_server_offers_it(db, pipeline, offered):
    """Offered: MAIL, RCPT and DATA arrive in one go (the server finds RCPT and DATA already
    waiting when it reads MAIL). Not offered: one command per reply, which a strict server
    (Postfix's reject_unauth_pipelining) insists on; either way the mail arrives once."""
    from tests.faultsmtp import ScriptedServer

    server = ScriptedServer(pipelining=offered)
    try:
        gateway(db, server)
        msg_id = enqueue(db, to=("x@example.org", "y@example.org"))
        pipeline.until_status(msg_id, "sent")
        assert server.accepted == 1
        assert server.improper == 0
        assert server.pipelined == (3 if offered else 0)  # MAIL, RCPT, RCPT: the next was waiting
    finally:
        server.stop()


@pytest.mark.parametrize("phase", ["rcpt", "dot"])
def test_a_reply_that_is_not_utf8_is_recorded_readably(db, pipeline, phase):
    """Old servers answer in Latin-1, some with NUL bytes: the outcome is still written (with
    U+FFFD for what does not decode), never left to a lease expiry and a resend."""
    from tests.faultsmtp import ScriptedServer

    server = ScriptedServer(**{phase: "550 5.1.1 Empf\udce4nger unbekannt\x00 (Latin-1)"})
    try:
        gateway(db, server)
        msg_id = enqueue(db)
        pipeline.until_status(msg_id, "failed")
        reply, last_error, attempts = row(db, msg_id, "last_smtp_reply", "last_error", "attempts")
        assert "Empf\ufffdnger unbekannt" in reply and "\x00" not in reply
        assert "Empf\ufffdnger" in last_error
        assert attempts == 1
    finally:
        server.stop()


def test_connector_list_says_the_connector_is_backing_off(
    db, cli_env, smtp_factory, pipeline, ca_file, monkeypatch
):
    import json
    import subprocess
    import sys

    server = smtp_factory("starttls", username="u", password="right")
    monkeypatch.setenv("PW", "wrong")
    gateway(db, server, username="u", password_env="PW", ca_file=ca_file)
    msg_id = enqueue(db)
    pipeline.until_status(msg_id, "retry")
    out = subprocess.run(
        [sys.executable, "-m", "outbox.cli", "connector", "list", "--json"],
        env=cli_env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    [gw] = json.loads(out)
    assert gw["health"] == "backing off" and "535" in gw["last_error"] and gw["failures"] == 1
