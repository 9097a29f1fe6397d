"""Issue 13's property: whatever a SQL writer inserts (arbitrary text in every header field,
custom headers, encoded words, Unicode separators, addresses), for every row the database
accepts, the worker either delivers a message whose parsed headers are exactly the row's
fields -- one From, no header the row did not ask for, no CR/LF in any value, no envelope
recipient the row did not name -- or fails it with a reason before contacting any server.

Hypothesis drives the database and the worker's own validation and building (what
`Delivery._deliver` does before it opens a connection); a few rows also go through the whole
pipeline to a real SMTP server, checked by the same function."""

from __future__ import annotations

import email
import email.policy
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from outbox.core.message import header_address, render_row
from outbox.core.settings import Settings
from tests.helpers import add_gateway
from worker.prepare import Unbuildable, checked, envelope

# Text that tries to break out of a header: line breaks of every kind, encoded words that
# decode to them or to addresses, angle brackets, quotes, commas.
NASTY = [
    "\r\n",
    "\n",
    "\r",
    "\x85",
    "\u2028",
    "\u2029",
    "\x0b",
    "\x00",
    "\x01",
    "\t",
    "=?UTF-8?Q?hello=0D=0ABcc:_victim@evil.example?=",
    "=?utf-8?b?Y2VvQGJhbmsuZXhhbXBsZQ==?=",
    "=?us-ascii?q?x?=",
    "=?",
    "?=",
    "<ceo@bank.example>",
    '"',
    ",",
    ";",
    "Bcc: victim@evil.example",
    "schöne Grüße",
    "東京",
]
TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00\r\n"), max_size=40)
NASTY_TEXT = st.lists(TEXT | st.sampled_from(NASTY), max_size=4).map("".join)
# Each field is plain text (or a valid address) at least as often as it is hostile, so that
# enough rows pass validation for the "sent as asked" half of the property to be exercised.
FIELD_TEXT = TEXT | st.text(st.characters(codec="ascii", min_codepoint=32), max_size=60) | NASTY_TEXT
GOOD_ADDRESS = st.emails() | st.sampled_from(
    [
        "ann@example.org",
        "Ann@Example.ORG",
        "leser@bücher.example",
        "zoë@example.org",
        "o'hara+tag@ex-ample.co.uk",
    ]
)
BAD_ADDRESS = st.sampled_from(
    [
        "not-an-email",
        "a..b@example.org",
        "Ann <ann@example.org>",
        '"a b"@example.org',
        "a@[127.0.0.1]",
        "=?utf-8?q?x?=@example.org",
        "a@localhost",
        "x" * 65 + "@example.org",
    ]
) | st.builds(
    lambda local, domain: f"{local}@{domain}", NASTY_TEXT, st.sampled_from(["example.org", "ex ample.org"])
)
ADDRESS = GOOD_ADDRESS | GOOD_ADDRESS | GOOD_ADDRESS | BAD_ADDRESS
ALLOWED_NAMES = ["X-Tag", "x-campaign", "References", "Comments", "Keywords", "List-Id"]
REFUSED_NAMES = ["Bcc", "From", "To", "Content-Type", "X-Priority", "Importance", "Subject", "X Bad", "X-é"]
HEADER_NAME = st.sampled_from(ALLOWED_NAMES) | st.sampled_from(ALLOWED_NAMES) | st.sampled_from(REFUSED_NAMES)
HEADER_VALUE = FIELD_TEXT | st.integers() | st.none()
ROW = st.fixed_dictionaries(
    {
        "from_addr": ADDRESS,
        "from_name": st.none() | FIELD_TEXT,
        "to_addrs": st.lists(ADDRESS, min_size=1, max_size=3),
        "cc_addrs": st.lists(ADDRESS, max_size=2),
        "bcc_addrs": st.lists(ADDRESS, max_size=2),
        "reply_to": st.none() | ADDRESS,
        "subject": FIELD_TEXT,
        "text_body": st.just("body"),
        "headers": st.dictionaries(HEADER_NAME, HEADER_VALUE, max_size=3),
        "importance": st.sampled_from(["normal", "high", "low"]),
    }
)

MIME = {"content-type", "content-transfer-encoding", "mime-version"}


def insert(db: psycopg.Connection[Any], row: dict[str, Any]) -> dict[str, Any] | None:
    """The row as the database stored it (what the worker reads), or None if refused."""
    params = dict(row, headers=Jsonb(row["headers"]))
    try:
        with db.transaction():
            placeholders = ", ".join(f"%({k})s" for k in row)
            msg_id = db.execute(
                f"INSERT INTO outbox.message ({', '.join(row)}) VALUES ({placeholders}) RETURNING id", params
            ).fetchone()[0]
    except (psycopg.IntegrityError, psycopg.DataError):
        return None
    with db.cursor(row_factory=dict_row) as cur:
        return cur.execute("SELECT * FROM outbox.message WHERE id = %s", [msg_id]).fetchone()


def squash(s: str) -> str:
    return "".join(s.split())


def assert_delivered_as_asked(row: dict[str, Any], raw: bytes, rcpt_tos: list[str]) -> None:
    """`raw` (and the envelope `rcpt_tos`) is exactly what the validated `row` asked for."""
    # as an SMTPUTF8 receiver reads it: UTF-8 headers (only with a non-ASCII local part)
    msg = email.message_from_string(raw.decode("utf-8"), policy=email.policy.default)
    for name, value in msg.items():
        assert "\r" not in str(value) and "\n" not in str(value), (name, value)
    wanted = ["from", "subject", "message-id", "date", *MIME, *(n.lower() for n in row["headers"])]
    wanted += [h for h, col in (("to", "to_addrs"), ("cc", "cc_addrs"), ("reply-to", "reply_to")) if row[col]]
    if row["importance"] != "normal":
        wanted += ["importance", "x-priority"]
    assert sorted(n.lower() for n in msg) == sorted(wanted)  # one From, nothing else
    [sender] = msg["From"].addresses
    assert sender.addr_spec == header_address(row["from_addr"]).addr_spec
    assert squash(sender.display_name) == squash(row["from_name"] or "")
    for name, column in (("To", "to_addrs"), ("Cc", "cc_addrs")):
        if row[column]:
            assert [a.addr_spec for a in msg[name].addresses] == [
                header_address(a).addr_spec for a in row[column]
            ]
    if row["reply_to"]:
        assert [a.addr_spec for a in msg["Reply-To"].addresses] == [header_address(row["reply_to"]).addr_spec]
    assert squash(str(msg["Subject"])) == squash(row["subject"])
    assert msg["Message-ID"] == row["message_id"]
    for name, value in row["headers"].items():
        assert squash(str(msg[name])) == squash(value)

    def wire_form(addr: str) -> str:
        return header_address(addr).addr_spec.lower()  # IDN domains as punycode

    named = {wire_form(a) for col in ("to_addrs", "cc_addrs", "bcc_addrs") for a in row[col]}
    assert {wire_form(a) for a in rcpt_tos} == named


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(row=ROW)
@pytest.mark.parametrize("schema_checks", [True, False], ids=["schema-checks", "no-schema-checks"])
def test_every_row_the_database_accepts_is_sent_as_asked_or_failed_with_a_reason(db, schema_checks, row):
    """Also without the schema's header checks (a database whose schema predates them): the
    worker's validation alone then stands between any text and the wire."""
    if not schema_checks:
        db.execute("ALTER TABLE outbox.message DISABLE TRIGGER message_validate")
    stored = insert(db, row)
    if stored is None:
        event("refused by the database")
        return
    stored["has_attachments"] = False
    try:
        valid = checked(stored, ())  # the worker's first step, before any connection
    except Unbuildable as exc:
        assert str(exc).strip()
        event("failed by the worker")
        return
    event("sent")
    raw = render_row(valid, (), date=valid["created_at"])
    assert_delivered_as_asked(valid, raw, envelope(valid, Settings()))


PIPELINE_ROWS = [
    {"subject": "Grüße =? ?= a?b", "from_name": 'Ann, "the" <boss>', "headers": {"X-Tag": "naïve; café"}},
    {
        "to_addrs": ["Leser@Bücher.example", "ann@example.org"],
        "cc_addrs": ["c@example.org"],
        "importance": "high",
    },
    {"subject": "one\u2028two"},
    {"to_addrs": ["not-an-email"]},
    {"headers": {"X-Tag": 7}},
]


@pytest.mark.parametrize("columns", PIPELINE_ROWS)
def test_rows_through_the_pipeline(db, smtp, pipeline, columns):
    add_gateway(db, smtp)
    row = {
        "from_addr": "App@Example.com",
        "from_name": None,
        "to_addrs": ["ann@example.org"],
        "cc_addrs": [],
        "bcc_addrs": ["audit@example.net"],
        "reply_to": None,
        "subject": "s",
        "text_body": "t",
        "headers": {},
        "importance": "normal",
    } | columns
    stored = insert(db, row)
    assert stored is not None
    status = pipeline.until_status(stored["id"], "sent", "failed")
    if status == "failed":
        error = db.execute("SELECT last_error FROM outbox.message WHERE id = %s", [stored["id"]]).fetchone()[
            0
        ]
        assert error.startswith("cannot build the message: ")
        assert smtp.recorder.sessions == 0
        return
    [got] = smtp.recorder.wait_for(1)
    stored["has_attachments"] = False
    assert_delivered_as_asked(checked(stored, ()), got.content, got.rcpt_tos)
