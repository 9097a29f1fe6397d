"""The common message written directly (`outbox.core.message.render_row`): the same bytes the
MIME builder writes, for every row it takes, and the builder's bytes for every row it does not.

Pure: no database, no network.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from outbox.core import message
from outbox.core.message import build, render, render_row

DATE = datetime(2026, 12, 5, 19, 54, 35, tzinfo=UTC)
ROW = {
    "from_addr": "noreply@shop.example",
    "from_name": None,
    "to_addrs": ["ann@example.org"],
    "cc_addrs": [],
    "bcc_addrs": ["audit@shop.example"],
    "reply_to": None,
    "subject": "Your order 12345 has shipped",
    "text_body": "Hello Ann,\n\nyour order has shipped.\n",
    "html_body": None,
    "headers": {},
    "importance": "normal",
    "message_id": "<0f3c9a@shop.example>",
}


def builder_bytes(row, written: bytes | None = None) -> bytes:
    """What `build` + `render` write for the row; a multipart message gets the boundary of
    `written` (the only part of the output chosen at random)."""
    msg = build(row, (), date=DATE)
    boundary = re.search(rb'boundary="([^"]+)"', written or b"")
    if boundary and msg.is_multipart():
        msg.set_boundary(boundary[1].decode())
    return render(msg)


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"text_body": None, "html_body": "<p>Hello</p>"},
        {"html_body": "<p>Hello</p>"},
        {
            "from_name": "Acme Shop",
            "cc_addrs": ["bob@example.org", "eve@example.org"],
            "reply_to": "help@shop.example",
        },
        {"importance": "high", "headers": {"X-Campaign": "winter sale", "In-Reply-To": "<a@b.example>"}},
        {"subject": "", "text_body": ""},
        {"text_body": "CRLF\r\nCR\rLF\n\n.\nFrom here\n"},
    ],
    ids=["text", "html", "alternative", "addresses", "headers", "empty", "line-ends"],
)
def test_common_messages_are_written_directly_as_the_builder_writes_them(change):
    row = ROW | change
    written = message._plain_wire(row, DATE)
    assert written is not None, "the common message went through the builder"
    assert written == builder_bytes(row, written)
    assert b"audit@shop.example" not in written  # Bcc stays in the envelope


@pytest.mark.parametrize(
    "change",
    [
        {"subject": "Grüße aus Köln"},
        {"subject": "two  spaces"},
        {"subject": "x" * 1000},
        {"text_body": "naïve"},
        {"text_body": "a" * 999},
        {"to_addrs": ["Leser@Bücher.example"]},
        {"to_addrs": ["jörg@example.org"]},
        {"from_name": 'Ann "the boss", Inc.'},
        {"headers": {"X-Tag": "café"}},
        {"to_addrs": [f"reader{i}@example.org" for i in range(60)]},
    ],
    ids=[
        "utf8-subject",
        "spaces",
        "long-subject",
        "utf8-body",
        "long-line",
        "idn",
        "smtputf8",
        "quoted-name",
        "utf8-header",
        "long-to",
    ],
)
def test_other_messages_come_out_as_the_builder_writes_them(change):
    row = ROW | change
    assert render_row(row, date=DATE) == builder_bytes(row, render_row(row, date=DATE))


def test_a_line_break_in_a_value_is_refused_as_the_builder_refuses_it():
    for change in ({"subject": "a\r\nBcc: x@evil.example"}, {"headers": {"X-Tag": "a\nb"}}):
        with pytest.raises(ValueError, match="linefeed or carriage return"):
            render_row(ROW | change, date=DATE)
        with pytest.raises(ValueError, match="linefeed or carriage return"):
            build(ROW | change, (), date=DATE)


# Each strategy mixes what the direct writer takes with what it leaves to the builder.
WORDS = st.from_regex(message._SIMPLE_VALUE, fullmatch=True).filter(lambda s: len(s) < 120)
HEADER_TEXT = (
    WORDS
    | st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)
    | st.text(max_size=40).filter(lambda s: "\r" not in s and "\n" not in s)
)
PLAIN_PIECES = [*"ab <>=-.\t", "\n", "\r\n", "\r", "From ", "--"]
BODY = (
    st.none()
    | st.lists(st.sampled_from(PLAIN_PIECES), max_size=30).map("".join)
    | st.lists(st.sampled_from([*PLAIN_PIECES, "é", "x" * 999]), max_size=30).map("".join)
)
PLAIN_ADDRESS = st.builds(
    "{}@{}".format,
    st.from_regex(
        r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]{1,20}(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]{1,10})?", fullmatch=True
    ),
    st.sampled_from(["example.org", "shop.example", "x-y.example.com"]),
)
ADDRESS = (
    PLAIN_ADDRESS
    | st.from_regex(message._PLAIN_ADDRESS, fullmatch=True)
    | st.sampled_from(["Leser@Bücher.example", "ann@example.org", "a.b+c@x-y.example"])
)


def rows(address, header_text, body):
    return st.fixed_dictionaries(
        {
            "from_addr": address,
            "from_name": st.none() | header_text,
            "to_addrs": st.lists(address, max_size=3),
            "cc_addrs": st.lists(address, max_size=2),
            "bcc_addrs": st.just([]),
            "reply_to": st.none() | address,
            "subject": header_text,
            "text_body": body,
            "html_body": body,
            "headers": st.dictionaries(
                st.sampled_from(["X-Tag", "x-campaign", "References"]), header_text, max_size=2
            ),
            "importance": st.sampled_from(["high", "normal", "low"]),
            "message_id": st.from_regex(message._MESSAGE_ID, fullmatch=True),
        }
    )


# Rows of printable ASCII (most of them written directly, with the edge cases of spacing, tabs
# and line ends), and rows of anything (most of them built).
ASCII_ROWS = rows(
    PLAIN_ADDRESS,
    WORDS | st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80),
    st.none() | st.lists(st.sampled_from(PLAIN_PIECES), max_size=30).map("".join),
)
ROWS = ASCII_ROWS | rows(ADDRESS, HEADER_TEXT, BODY)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(row=ROWS)
def test_every_row_comes_out_as_the_builder_writes_it(row):
    """The direct writer's bytes equal the builder's, byte for byte, on any row it takes."""
    if row["text_body"] is None and row["html_body"] is None:
        row["text_body"] = ""
    try:
        builder_bytes(row)
    except Exception as exc:  # the builder refuses it: so must the writer
        with pytest.raises(type(exc)):
            render_row(row, date=DATE)
        event("refused")
        return
    written = render_row(row, date=DATE)
    event("written directly" if message._plain_wire(row, DATE) is not None else "built")
    assert written == builder_bytes(row, written)
