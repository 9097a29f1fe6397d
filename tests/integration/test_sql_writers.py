"""Rows written by plain SQL get enqueue's validation in the worker: a row enqueue would have
refused ends `failed` with the reason, and no server hears of it."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.helpers import add_gateway


def insert(db, past_the_database=False, **columns):
    """A plain SQL INSERT of these columns (and a minimal message around them). With
    `past_the_database`, the schema's header checks are off for it, as for a row written
    before they existed: the worker's validation is then all that stands in the way."""
    if past_the_database:
        with db.transaction():
            db.execute("ALTER TABLE outbox.message DISABLE TRIGGER message_validate")
            msg_id = insert(db, **columns)
            db.execute("ALTER TABLE outbox.message ENABLE TRIGGER message_validate")
        return msg_id
    values = {"from_addr": "app@example.com", "to_addrs": ["rcpt@example.org"], "subject": "s"}
    values |= {"text_body": "t"} | columns
    if "headers" in values:
        values["headers"] = Jsonb(values["headers"])
    names = ", ".join(values)
    placeholders = ", ".join(f"%({k})s" for k in values)
    return db.execute(
        f"INSERT INTO outbox.message ({names}) VALUES ({placeholders}) RETURNING id", values
    ).fetchone()[0]


def outcome(db, msg_id):
    return db.execute("SELECT status, last_error FROM outbox.message WHERE id = %s", [msg_id]).fetchone()


def test_encoded_line_break_in_the_subject_fails_without_contacting_the_server(db, smtp, pipeline):
    """The row of issue 13: built as is, it would become `Subject: hello` plus a `Bcc:` line."""
    add_gateway(db, smtp)
    subject = "=?UTF-8?Q?hello=0D=0ABcc:_victim@evil.example?="
    with pytest.raises(psycopg.errors.CheckViolation, match="message_headers_plain_text"):
        insert(db, subject=subject)  # the schema refuses it now
    msg_id = insert(db, past_the_database=True, subject=subject)
    pipeline.until_status(msg_id, "failed")
    _, error = outcome(db, msg_id)
    assert error == "cannot build the message: subject looks RFC 2047-encoded (=?...?=): give plain text"
    assert smtp.recorder.sessions == 0 and smtp.recorder.received == []


def test_an_address_enqueue_refuses_never_reaches_the_server(db, smtp, pipeline):
    add_gateway(db, smtp)
    msg_id = db.execute(
        "INSERT INTO outbox.message (from_addr, to_addrs, subject, text_body) VALUES "
        "('app@example.com', '{not-an-email}', 's', 't') RETURNING id"
    ).fetchone()[0]  # as the issue wrote it
    pipeline.until_status(msg_id, "failed")
    _, error = outcome(db, msg_id)
    assert error.startswith("cannot build the message: to: invalid address 'not-an-email': "), error
    assert smtp.recorder.sessions == 0 and smtp.recorder.received == []


@pytest.mark.parametrize(
    "columns, reason",
    [
        ({"headers": {"X-Tag": "=?utf-8?q?a=0D=0AFrom:_boss@example.com?="}}, "header X-Tag looks RFC 2047"),
        ({"from_name": "=?utf-8?q?ceo@example.com?="}, "from name looks RFC 2047"),
        ({"subject": "one\u2028two"}, "subject must be a single line"),
        ({"subject": "tab\x0bvertical"}, "subject must be a single line"),
        ({"headers": {"Bcc": "victim@evil.example"}}, "header 'Bcc' is not allowed"),
        ({"headers": {"X-Count": 3}}, "header X-Count must be text"),
        ({"to_addrs": ["Ann <ann@example.org>"]}, "to: invalid address"),
        ({"to_addrs": [None]}, "to: an address is required"),
        ({"from_addr": "a..b@example.com"}, "from: invalid address"),
        ({"subject": "x" * 700}, "subject is too long"),
    ],
)
def test_rows_enqueue_would_refuse_fail_with_its_reason(db, smtp, pipeline, columns, reason):
    add_gateway(db, smtp)
    msg_id = insert(db, past_the_database=True, **columns)
    pipeline.until_status(msg_id, "failed")
    _, error = outcome(db, msg_id)
    assert error.startswith("cannot build the message: " + reason), error
    assert smtp.recorder.sessions == 0


def test_a_forged_message_id_is_refused(db, smtp, pipeline):
    add_gateway(db, smtp)
    msg_id = insert(db, message_id="<x@example.com> =?UTF-8?Q?x=0D=0ABcc:_v@evil.example?=")
    pipeline.until_status(msg_id, "failed")
    assert "is not of the form <unique@domain>" in outcome(db, msg_id)[1]
    assert smtp.recorder.sessions == 0


def test_a_valid_sql_row_is_sent_with_its_addresses_normalised(db, smtp, pipeline):
    add_gateway(db, smtp)
    msg_id = insert(db, from_addr="App@Example.COM", to_addrs=["Rcpt@Example.ORG"], subject="plain")
    pipeline.until_status(msg_id, "sent")
    [got] = smtp.recorder.wait_for(1)
    assert got.mail_from == "App@example.com" and got.rcpt_tos == ["Rcpt@example.org"]
    assert got.message["Subject"] == "plain"


def test_an_oversized_sql_row_fails_for_its_size(db, smtp, pipeline):
    add_gateway(db, smtp)
    db.execute("UPDATE outbox.settings SET max_message_bytes = 2048")
    msg_id = insert(db, text_body="x" * 5000)
    pipeline.until_status(msg_id, "failed")
    assert "over the maximum email size of 2048 bytes" in outcome(db, msg_id)[1]
    assert smtp.recorder.sessions == 0


def test_a_sql_row_from_an_idn_sender_is_sent(db, smtp, pipeline):
    add_gateway(db, smtp)
    msg_id = insert(db, from_addr="news@bücher.example")
    pipeline.until_status(msg_id, "sent")
    [got] = smtp.recorder.wait_for(1)
    assert got.mail_from == "news@xn--bcher-kva.example"


@pytest.mark.parametrize("body", [".starts with a dot\n.\nend", "a\n.\n..two\n. spaced", "no dot-led line"])
def test_lines_that_begin_with_a_dot_arrive_as_written(db, smtp, pipeline, body):
    """RFC 5321 4.5.2: a content line beginning with "." goes out with one more in front, which
    the server takes off; a lone "." line must not end the message early."""
    add_gateway(db, smtp)
    msg_id = insert(db, text_body=body)
    pipeline.until_status(msg_id, "sent")
    [got] = smtp.recorder.wait_for(1)
    assert got.message.get_payload(decode=True).decode().replace("\r\n", "\n").rstrip("\n") == body
