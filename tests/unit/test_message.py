"""outbox.message: what `prepare` accepts or refuses, and what `build`/`render` put on the wire.

Pure: no database, no network. Messages are parsed back the way a recipient's software would
(`email.message_from_bytes` with `email.policy.default`).
"""

from __future__ import annotations

import base64
import contextlib
import email
import email.policy
import re
import unicodedata
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outbox.core import message
from outbox.core.errors import ValidationError
from outbox.core.message import Attachment, build, draft_fields, prepare, render

SENDER = "news@shop.example"
RECIPIENT = "ann@example.org"
BASE = {"from_addr": SENDER, "to": [RECIPIENT], "subject": "Your order", "text": "Thanks!"}


def make(**overrides):
    return prepare(**(BASE | overrides))


# The stock policy our POLICY short-cuts (outbox.message._Policy): every message a test renders
# is also rendered with it, and the bytes must be the same.
STOCK = email.policy.SMTP.clone(cte_type="7bit", max_line_length=998)


def wire(draft, date: datetime | None = None) -> bytes:
    """The bytes the worker would send for this draft (checked against the stock folder)."""
    msg = build(draft_fields(draft), draft.attachments, date=date)
    raw = render(msg)
    stock = STOCK.clone(utf8=msg.policy.utf8, header_factory=msg.policy.header_factory)
    assert raw == msg.as_bytes(policy=stock), "the one-line short cut wrote other bytes than the stock folder"
    return raw


def parse(raw: bytes) -> EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)  # type: ignore[return-value]


def header_block(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[0]


def addr_specs(header) -> list[str]:
    return [a.addr_spec for a in header.addresses]


def q_word(text: str) -> str:
    """`text` as one RFC 2047 Q encoded word."""
    return "=?utf-8?q?" + "".join(f"={b:02X}" for b in text.encode()) + "?="


def b_word(text: str) -> str:
    """`text` as one RFC 2047 B encoded word."""
    return "=?utf-8?b?" + base64.b64encode(text.encode()).decode() + "?="


# -- prepare: valid input ------------------------------------------------------------------


def test_prepare_normalises_addresses_and_keeps_the_rest():
    d = prepare(
        from_addr="Ann.Lee@Shop.EXAMPLE",
        to=["Bob@Example.ORG", "carol@example.org"],
        cc="Dave@Example.NET",
        bcc=["Eve@Example.COM"],
        reply_to="Help@Shop.Example",
        subject="Your order",
        text="Thanks!",
    )
    # Domains are case-insensitive and normalised; local parts are kept as given.
    assert d.from_addr == "Ann.Lee@shop.example"
    assert d.to == ["Bob@example.org", "carol@example.org"]
    assert d.cc == ["Dave@example.net"]
    assert d.bcc == ["Eve@example.com"]
    assert d.reply_to == "Help@shop.example"
    assert (d.subject, d.text, d.html, d.importance) == ("Your order", "Thanks!", None, "normal")


def test_size_bytes_is_the_rendered_size():
    d = make(
        subject="Grüße aus Köln",
        text="Hallo Anna,\nIhre Rechnung liegt bei.\n" * 20,
        html="<p>Hallo Anna</p>" * 20,
        cc=["c@example.org"],
        bcc=["hidden@example.org"],
        importance="high",
        headers={"X-Campaign": "spring", "List-Unsubscribe": "<mailto:u@shop.example>"},
        attachments=[Attachment("Rechnung März.pdf", bytes(range(256)) * 40, "application/pdf")],
    )
    sent_at = datetime(2025, 3, 17, 9, 30, tzinfo=timezone(timedelta(hours=2)))
    # Only the Date header differs between enqueue time and send time.
    assert abs(len(wire(d, date=sent_at)) - d.size_bytes) <= 10


def test_message_id_is_unique_hex_at_the_from_domain():
    first, second = make(), make()
    assert re.fullmatch(r"<[0-9a-f]{32}@shop\.example>", first.message_id)
    assert first.message_id != second.message_id


def test_message_id_of_an_idn_domain_is_punycode():
    d = make(from_addr="news@Bücher.example")
    assert d.from_addr == "news@bücher.example"
    assert re.fullmatch(r"<[0-9a-f]{32}@xn--bcher-kva\.example>", d.message_id)


# -- prepare: refusals ---------------------------------------------------------------------


@pytest.mark.parametrize("char", ["\r", "\n", "\r\n", "\x00"], ids=["CR", "LF", "CRLF", "NUL"])
@pytest.mark.parametrize(
    ("field", "what"),
    [("subject", "subject"), ("from_name", "from name"), ("header", "header X-Campaign")],
)
def test_line_breaks_and_nul_in_header_values_are_refused(field, what, char):
    value = f"hi{char}Bcc: x@evil.example"
    kwargs = {"headers": {"X-Campaign": value}} if field == "header" else {field: value}
    with pytest.raises(ValidationError, match=f"{what} must be a single line"):
        make(**kwargs)


@pytest.mark.parametrize(
    "value",
    [
        "=?UTF-8?Q?hi=0ABcc:_x@evil.example?=",
        "=?utf-8?q?hi=0D=0ABcc:_x@evil.example?=",
        "Re: =?UTF-8?B?" + base64.b64encode(b"hi\r\nBcc: x@evil.example").decode() + "?=",
        "=?utf-8?q?nul=00byte?=",
    ],
)
@pytest.mark.parametrize("field", ["subject", "from_name", "header"])
def test_line_breaks_hidden_in_encoded_words_are_refused(field, value):
    kwargs = {"headers": {"X-Campaign": value}} if field == "header" else {field: value}
    with pytest.raises(ValidationError, match="looks RFC 2047-encoded"):
        make(**kwargs)


def test_malformed_encoded_word_is_refused():
    with pytest.raises(ValidationError, match="subject looks RFC 2047-encoded"):
        make(subject="=?no-such-charset?q?hi?=")


@pytest.mark.parametrize(
    "name", ["Bcc", "bcc", "From", "To", "Cc", "Subject", "Message-ID", "Content-Type", "Return-Path"]
)
def test_structural_headers_cannot_be_set(name):
    with pytest.raises(ValidationError, match=f"header '{name}' is not allowed"):
        make(headers={name: "x@evil.example"})


@pytest.mark.parametrize("name", ["X Campaign", "X-Campaign:", "Bcc:x", "", "-X", "X-Ä", 42])
def test_invalid_header_names_are_refused(name):
    with pytest.raises(ValidationError, match="invalid header name"):
        make(headers={name: "v"})


@pytest.mark.parametrize(
    ("addr", "reason"),
    [
        ("ann.example.org", "must have an @-sign"),
        ("Ann <ann@example.org>", "display name"),
        ('"ann lee"@example.org', "Quoting"),
        ("ann@[192.0.2.1]", "bracketed IP address"),
        ("ann@", "There must be something after the @-sign"),
    ],
)
@pytest.mark.parametrize("field", ["from_addr", "to", "cc", "bcc", "reply_to"])
def test_bad_addresses_are_refused(field, addr, reason):
    what = {"from_addr": "from", "reply_to": "reply-to"}.get(field, field)
    with pytest.raises(ValidationError, match=rf"^{what}: invalid address .*{reason}"):
        make(**{field: [addr] if field in ("to", "cc", "bcc") else addr})


def test_a_recipient_is_required():
    with pytest.raises(ValidationError, match="at least one recipient"):
        make(to=[], cc=[], bcc=[])


def test_bcc_alone_is_enough():
    assert make(to=[], bcc=[RECIPIENT]).bcc == [RECIPIENT]


def test_a_body_is_required():
    with pytest.raises(ValidationError, match="a text or an HTML body is required"):
        make(text=None, html=None)


def test_importance_must_be_known():
    with pytest.raises(ValidationError, match="importance must be one of high, normal, low"):
        make(importance="urgent")


def test_send_after_must_be_timezone_aware():
    with pytest.raises(ValidationError, match="send_after must be timezone-aware"):
        make(send_after=datetime(2030, 1, 1, 9, 0))
    aware = datetime(2030, 1, 1, 9, 0, tzinfo=UTC)
    assert make(send_after=aware).send_after == aware


# -- build / render ------------------------------------------------------------------------


def test_bcc_never_appears_in_the_message():
    d = make(cc=["cc@example.org"], bcc=["hidden@secret.example", "Other@Secret.example"])
    raw = wire(d)
    assert b"secret.example" not in raw.lower()
    assert b"hidden" not in raw
    assert not any(name.lower() == "bcc" for name in parse(raw))


def test_headers_are_as_given():
    d = make(
        from_name="Zoë Müller, Shop",
        to=["ann@example.org", "bob@example.org"],
        cc=["carol@example.net"],
        reply_to="help@shop.example",
        subject="Grüße – Ihre Bestellung",  # noqa: RUF001 (an en dash, on purpose)
        headers={"X-Campaign": "spring", "In-Reply-To": "<abc@shop.example>"},
    )
    msg = parse(wire(d))
    (sender,) = msg["From"].addresses
    assert (sender.display_name, sender.addr_spec) == ("Zoë Müller, Shop", SENDER)
    assert addr_specs(msg["To"]) == ["ann@example.org", "bob@example.org"]
    assert addr_specs(msg["Cc"]) == ["carol@example.net"]
    assert addr_specs(msg["Reply-To"]) == ["help@shop.example"]
    assert str(msg["Subject"]) == "Grüße – Ihre Bestellung"  # noqa: RUF001
    assert str(msg["Message-ID"]) == d.message_id
    assert str(msg["X-Campaign"]) == "spring"
    assert str(msg["In-Reply-To"]) == "<abc@shop.example>"


def test_date_header_is_the_send_time():
    sent_at = datetime(2025, 3, 17, 9, 30, 5, tzinfo=UTC)
    assert parse(wire(make(), date=sent_at))["Date"].datetime == sent_at


@pytest.mark.parametrize(
    ("importance", "expected"),
    [("high", ("High", "1 (Highest)")), ("low", ("Low", "5 (Lowest)")), ("normal", (None, None))],
)
def test_importance_headers(importance, expected):
    msg = parse(wire(make(importance=importance)))
    assert (msg["Importance"], msg["X-Priority"]) == expected


def test_text_and_html_make_multipart_alternative():
    msg = parse(wire(make(text="Hällo", html="<p>Hällo</p>")))
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert [p.get_content().strip() for p in parts] == ["Hällo", "<p>Hällo</p>"]


def test_html_only_is_a_single_html_part():
    msg = parse(wire(make(text=None, html="<p>Hi</p>")))
    assert msg.get_content_type() == "text/html"
    assert msg.get_content().strip() == "<p>Hi</p>"


def test_attachments_keep_filename_type_and_content():
    pdf = bytes(range(256)) * 8
    files = [
        Attachment("Rechnung März.pdf", pdf, "application/pdf"),
        Attachment("notes.txt", "ünïcode\n".encode(), "text/plain"),
    ]
    msg = parse(wire(make(text="See attached", attachments=files)))
    assert msg.get_content_type() == "multipart/mixed"
    found = [
        (a.get_filename(), a.get_content_type(), a.get_payload(decode=True)) for a in msg.iter_attachments()
    ]
    assert found == [
        ("Rechnung März.pdf", "application/pdf", pdf),
        ("notes.txt", "text/plain", "ünïcode\n".encode()),
    ]
    assert msg.get_body(("plain",)).get_content().strip() == "See attached"


def test_wire_form_is_crlf_and_7bit_clean():
    d = make(
        from_name="Zoë Müller",
        subject="Grüße aus Köln, 東京 und Zürich " * 3,
        text="Grüße\n" + "é" * 2000 + "\n" + "a" * 2000 + "\n",
        html="<p>東京</p>",
        headers={"X-Note": "naïve café"},
        attachments=[Attachment("Übersicht.bin", bytes(range(256)), "application/octet-stream")],
    )
    raw = wire(d)
    assert all(b < 128 for b in raw), "not 7-bit clean"
    assert re.search(rb"(?<!\r)\n", raw) is None, "bare LF"
    assert re.search(rb"\r(?!\n)", raw) is None, "bare CR"
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998, "line longer than SMTP allows"


# -- property: arbitrary subject and sender name ---------------------------------------------

EXPECTED_HEADERS = [
    "From",
    "To",
    "Subject",
    "Message-ID",
    "Date",
    "Content-Type",
    "Content-Transfer-Encoding",
    "MIME-Version",
]
# Characters str.splitlines() treats as line ends besides CR and LF: they currently crash
# prepare() with a bare ValueError (see test_unicode_line_separators_are_refused_cleanly).
# Excluded here so the property keeps checking everything else.
LINE_SEPARATORS = "\v\f\x1c\x1d\x1e\x85\u2028\u2029"


def squash(s: str) -> str:
    return "".join(s.split())


def has_control(s: str) -> bool:
    return any(unicodedata.category(c) == "Cc" for c in s)


@settings(max_examples=300, deadline=None)
@given(
    subject=st.text(st.characters(codec="utf-8", exclude_characters=LINE_SEPARATORS)),
    from_name=st.text(),
)
def test_arbitrary_subject_and_from_name_never_add_headers_or_recipients(subject, from_name):
    try:
        d = make(subject=subject, from_name=from_name)
    except ValidationError:
        return
    raw = wire(d)
    msg = parse(raw)

    assert list(msg.keys()) == EXPECTED_HEADERS
    assert addr_specs(msg["To"]) == [RECIPIENT]
    (sender,) = msg["From"].addresses
    assert sender.addr_spec == SENDER

    decoded = str(msg["Subject"])
    assert "\r" not in decoded and "\n" not in decoded
    # Folding may lose or double whitespace (see test_long_non_ascii_subject_keeps_its_spaces),
    # never anything else. When the header is not folded, only leading blanks go (RFC 5322
    # does not keep them).
    assert squash(decoded) == squash(subject)
    if re.search(rb"\r\nSubject: [^\r]*\r\nMessage-ID:", raw):
        assert decoded == subject.lstrip(" \t")
    if not has_control(from_name):
        assert squash(sender.display_name) == squash(from_name)


@settings(max_examples=300, deadline=None)
@given(
    subject=st.text(max_size=120) | st.text(st.characters(max_codepoint=127), min_size=900, max_size=1100),
    from_name=st.text(max_size=60),
    tag=st.text(st.characters(max_codepoint=127), max_size=80),
    local=st.from_regex(r"[a-z0-9][a-z0-9.+_-]{0,30}", fullmatch=True),
)
def test_rendering_writes_what_the_stock_folder_writes(subject, from_name, tag, local):
    """Long, empty, non-ASCII and quoted values: whatever the short cut takes is byte for byte
    what email.policy would write (wire() compares them)."""
    try:
        d = make(subject=subject, from_name=from_name, to=[f"{local}@example.org"], headers={"X-Tag": tag})
    except ValidationError:
        return
    wire(d)


# -- bugs found and fixed (kept as regression tests) -------------------------------------------


@pytest.mark.parametrize("char", [*LINE_SEPARATORS, "\udcff"], ids=lambda c: f"U+{ord(c):04X}")
@pytest.mark.parametrize("field", ["subject", "header"])
def test_unicode_line_separators_are_refused_cleanly(field, char):
    value = f"Your{char}order"
    kwargs = {"headers": {"X-Campaign": value}} if field == "header" else {field: value}
    with contextlib.suppress(ValidationError):
        make(**kwargs)


@pytest.mark.parametrize("field", ["subject", "from_name"])
def test_doubly_encoded_line_break_is_refused(field):
    value = q_word("=?UTF-8?Q?hi=0ABcc:_x@evil.example?=")
    try:
        raw = wire(make(**{field: value}))
    except ValidationError:
        return
    msg = parse(raw)
    seen = str(msg["Subject"]) if field == "subject" else msg["From"].addresses[0].display_name
    assert "\n" not in seen


@pytest.mark.parametrize(
    "from_name",
    [
        b_word("<ceo@bank.example>"),
        q_word("CEO <ceo@bank.example>"),
        b_word("x@evil.example, y@evil.example"),
    ],
)
def test_encoded_word_in_from_name_cannot_change_the_from_address(from_name):
    try:
        raw = wire(make(from_name=from_name))
    except ValidationError:
        return
    assert addr_specs(parse(raw)["From"]) == [SENDER]


def test_idn_domain_is_punycode_in_address_headers():
    raw = wire(make(from_addr="news@bücher.example", to=["ann@bücher.example"]))
    headers = header_block(raw)
    assert b"From: news@xn--bcher-kva.example\r\n" in headers
    assert b"To: ann@xn--bcher-kva.example\r\n" in headers


@pytest.mark.parametrize("field", ["from_addr", "to"])
def test_non_ascii_local_part_is_refused_or_kept_intact(field):
    addr = "zoë@example.org"
    try:
        raw = wire(make(**{field: [addr] if field == "to" else addr}))
    except ValidationError:
        return
    assert b"=?" not in header_block(raw)


def test_long_non_ascii_subject_keeps_its_spaces():
    subject = "Ihre Bestellung wird morgen geliefert und die schöne Grüße"
    assert str(parse(wire(make(subject=subject)))["Subject"]) == subject


@pytest.mark.parametrize("field", ["subject", "from_name", "header"])
def test_control_characters_never_reach_the_wire_raw(field):
    value = "Ann\x01 \x1fMüller"
    kwargs = {"headers": {"X-Campaign": value}} if field == "header" else {field: value}
    try:
        raw = wire(make(**kwargs))
    except ValidationError:
        return
    assert re.search(rb"[\x00-\x08\x0b-\x0c\x0e-\x1f\x7f]", header_block(raw)) is None


# -- the plain-address short cut -------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    addr=st.from_regex(message._PLAIN_ADDRESS, fullmatch=True)
    | st.emails()
    | st.builds(lambda a, b: f"{a}@{b}", st.text(max_size=20), st.text(max_size=30))
)
def test_the_plain_address_short_cut_agrees_with_email_validator(addr):
    """Whatever `_plain_address` takes without email-validator, email-validator takes too and
    returns unchanged (check_address would give the same answer either way)."""
    if message._plain_address(addr):
        assert message._normalised_address(addr) == addr
