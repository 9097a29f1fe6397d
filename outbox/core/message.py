"""The message model: validation at enqueue, and the one place MIME messages are built.

Messages are built with `email.message.EmailMessage` and the header registry, so a value can
never add a header of its own; the common message is written directly (`render_row`) with the
same bytes, from values that cannot hold a line break. The envelope is always kept apart from
headers.
"""

from __future__ import annotations

import email.policy
import functools
import mimetypes
import random
import re
import sys
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.headerregistry import Address, HeaderRegistry
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Any

from outbox.core.errors import ValidationError


class _HeaderRegistry(HeaderRegistry):
    """The standard header registry, with caches. It builds each header class once (the stock
    one creates a new class with type() for every header of every message, a large share of
    building one), and it parses a given header value -- text, or a single Address such as the
    sender -- once: header objects are immutable, so the From, Content-Type, MIME-Version,
    Date... that repeat across messages are shared. 256 entries: the values that repeat are
    few; a bigger cache would only hold unique ones."""

    @functools.lru_cache(maxsize=256)  # noqa: B019  (one registry per process, never freed)
    def __getitem__(self, name: str) -> type:
        return super().__getitem__(name)  # type: ignore[no-any-return]

    def __call__(self, name: str, value: Any) -> Any:
        if isinstance(value, str):
            return self._parsed(name, value)
        if isinstance(value, Address):
            return self._addressed(name, ((value.display_name, value.username, value.domain),))
        return super().__call__(name, value)

    @functools.lru_cache(maxsize=256)  # noqa: B019  (the sender repeats across messages)
    def _addressed(self, name: str, parts: tuple[tuple[str, str, str], ...]) -> Any:
        """An address header from Address objects (built from them, not from their text, so
        its parse tree is exactly the text it writes), once per address."""
        addresses = [Address(display_name=d, username=u, domain=dom) for d, u, dom in parts]
        return super().__call__(name, addresses)

    @functools.lru_cache(maxsize=256)  # noqa: B019  (values that repeat stay; unique ones age out)
    def _parsed(self, name: str, value: str) -> Any:
        return super().__call__(name, value)


_REGISTRY = _HeaderRegistry()


class _Policy(email.policy.EmailPolicy):
    """The stock policy with a short cut for the common header: a header object from the
    registry whose value is ASCII and fits on one line is written as "Name: value" -- exactly
    what the stock folder returns for it (its parse tree fits whole on the first line, so
    the folder appends it unchanged; tests compare both on every message they build). Everything
    else (non-ASCII, long, or not a header object) goes through the stock folder. Folding was
    the largest part of rendering (30%)."""

    def _fold(self, name: str, value: Any, refold_binary: bool = False) -> str:
        if hasattr(value, "name") and value.isascii():
            if not value._parse_tree:
                return f"{name}:{self.linesep}"
            if len(name) + 2 + len(value) <= (self.max_line_length or sys.maxsize):
                return f"{name}: {value}{self.linesep}"
        return super()._fold(name, value, refold_binary)  # type: ignore[no-any-return]


# Bodies are transfer-encoded to 7 bit so any server takes them (no 8BITMIME needed).
# Header lines are not folded below RFC 5322's 998 octets: Python 3.11 drops the space between
# two encoded words at a fold ("schöne Grüße" arrives as "schöneGrüße"); values are capped so
# an encoded header still fits on one line.
POLICY = _Policy(linesep="\r\n", cte_type="7bit", max_line_length=998, header_factory=_REGISTRY)
# Addresses with a non-ASCII local part need an SMTPUTF8 message: UTF-8 headers, sent only
# through a server that offers SMTPUTF8 (the transport checks, and fails it for good otherwise).
POLICY_UTF8 = POLICY.clone(utf8=True)

IMPORTANCE = ("high", "normal", "low")
_IMPORTANCE_PRIORITY = {"high": 10, "normal": 0, "low": -10}
_IMPORTANCE_HEADERS = {"high": ("High", "1 (Highest)"), "low": ("Low", "5 (Lowest)")}

# Custom headers: X-* plus these. Structural headers (From, To, Bcc, Content-*, ...) are
# set by the builder only.
ALLOWED_HEADERS = frozenset(
    name.lower()
    for name in (
        "In-Reply-To",
        "References",
        "List-Id",
        "List-Unsubscribe",
        "List-Unsubscribe-Post",
        "Auto-Submitted",
        "Precedence",
        "Sensitivity",
        "Keywords",
        "Comments",
        "Organization",
        "Thread-Topic",
        "Thread-Index",
    )
)
_HEADER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
# Line breaks of every kind, other control characters (TAB is fine), lone surrogates.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029\ud800-\udfff]")
# RFC 2047 encoded words: the header registry would decode them (again), so text that
# already looks encoded could smuggle line breaks or addresses into a header. Give plain text.
_ENCODED_WORD = re.compile(r"=\?[^?\s]*\?[bBqQ]\?[^?]*\?=")
# Reserved even under X-*: set from `importance`.
RESERVED_HEADERS = frozenset({"x-priority", "x-msmail-priority", "importance"})

MAX_RECIPIENTS = 500
MAX_HEADER_VALUE_BYTES = 600
MAX_ATTACHMENTS = 100
# Rendered messages up to this size are stored with the row, so workers skip building them.
MAX_STORED_CONTENT_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Attachment:
    filename: str
    content: bytes
    content_type: str = "application/octet-stream"

    @classmethod
    def from_path(cls, path: str) -> Attachment:
        p = Path(path)
        try:
            content = p.read_bytes()
        except OSError as exc:
            raise ValidationError(f"cannot read attachment {path}: {exc.strerror}") from exc
        ctype = mimetypes.guess_type(p.name)[0] or "application/octet-stream"
        return cls(filename=p.name, content=content, content_type=ctype)


@dataclass(frozen=True)
class Draft:
    """A validated message, ready to insert. Built by `prepare`."""

    from_addr: str
    to: list[str]
    cc: list[str]
    bcc: list[str]
    subject: str
    text: str | None
    html: str | None
    from_name: str | None = None
    reply_to: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    attachments: tuple[Attachment, ...] = ()
    importance: str = "normal"
    priority: int = 0
    system_generated: bool = False
    reference: str | None = None
    idempotency_key: str | None = None
    send_after: datetime | None = None
    message_id: str = ""
    size_bytes: int = 0
    content: bytes | None = None  # rendered once here; the worker sends these bytes


def check_line(value: str | None, what: str) -> None:
    """Refuse line breaks and control characters in a header value, encoded words, and values
    too long for one header line."""
    if value is None:
        return
    if not isinstance(value, str):
        raise ValidationError(f"{what} must be text")
    if _CONTROL.search(value):
        raise ValidationError(
            f"{what} must be a single line of text (line breaks and control characters are refused)"
        )
    if _ENCODED_WORD.search(value):
        raise ValidationError(f"{what} looks RFC 2047-encoded (=?...?=): give plain text")
    if len(value.encode("utf-8")) > MAX_HEADER_VALUE_BYTES:
        raise ValidationError(f"{what} is too long (at most {MAX_HEADER_VALUE_BYTES} bytes)")


def check_address(addr: str, what: str) -> str:
    """Validate one address (no DNS); return its normalised form."""
    if not isinstance(addr, str) or not addr:
        raise ValidationError(f"{what}: an address is required")
    check_line(addr, what)
    if _plain_address(addr):
        return addr
    try:
        return _normalised_address(addr)
    except ValueError as exc:
        raise ValidationError(f"{what}: invalid address {addr!r}: {exc}") from exc


# The common address, decided without email-validator (1 us instead of 40; the worker checks
# every envelope again): an ASCII dot-atom local part at a lower-case host name whose labels are
# letters and digits joined by single hyphens, under an alphabetic TLD. email-validator
# returns each of these unchanged (a property test checks it); anything else goes to it.
_PLAIN_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@((?:[a-z0-9]+(?:-[a-z0-9]+)*\.)+[a-z]{2,63})"
)
_SPECIAL_USE = ("arpa", "invalid", "local", "localhost", "onion", "test")  # email-validator's


@functools.lru_cache(maxsize=8192)  # asked again by the writer, and senders repeat
def _plain_address(addr: str) -> bool:
    match = _PLAIN_ADDRESS.fullmatch(addr)
    if match is None or len(addr) > 254 or addr.index("@") > 64:
        return False
    domain = match[1]
    return max(map(len, domain.split("."))) <= 63 and domain.rpartition(".")[2] not in _SPECIAL_USE


@functools.lru_cache(maxsize=4096)
def _normalised_address(addr: str) -> str:
    """email-validator's verdict (40 us a call), once per address: senders repeat, and the
    worker checks the envelope of every message again. Raises ValueError."""
    # Imported here: a process that never validates never pays for the import.
    from email_validator import validate_email

    info = validate_email(
        addr,
        check_deliverability=False,
        allow_smtputf8=True,
        allow_quoted_local=False,
        allow_domain_literal=False,
        allow_display_name=False,
        strict=True,  # RFC 5321 lengths: local part <= 64, address <= 254 octets
    )
    # Keep the local part as given (it may be case-sensitive); normalise the domain.
    return f"{addr.rpartition('@')[0]}@{info.domain}"


def check_addresses(addrs: Iterable[str] | str | None, what: str) -> list[str]:
    if addrs is None:
        return []
    if isinstance(addrs, str):
        addrs = [addrs]
    return [check_address(a, what) for a in addrs]


def envelope_domain(addr: str) -> str:
    """The domain of an address, IDNA-encoded for the envelope and Message-ID."""
    domain = addr.rpartition("@")[2]
    try:
        return domain.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return domain.lower()


def new_message_id(from_addr: str) -> str:
    return f"<{uuid.uuid4().hex}@{envelope_domain(from_addr)}>"


@dataclass(frozen=True)
class Checked:
    """What the validator makes of a message's fields: addresses normalised as enqueue writes
    them (domain lower-case), custom headers as given."""

    from_addr: str
    to: list[str]
    cc: list[str]
    bcc: list[str]
    reply_to: str | None
    headers: dict[str, str]


def check_message(
    *,
    from_addr: str,
    to: Iterable[str] | str | None,
    cc: Iterable[str] | str | None,
    bcc: Iterable[str] | str | None,
    subject: Any,
    text: str | None,
    html: str | None,
    from_name: str | None = None,
    reply_to: str | None = None,
    headers: Mapping[str, Any] | None = None,
    attachments: Sequence[Attachment] = (),
    importance: str = "normal",
    reference: str | None = None,
    idempotency_key: str | None = None,
) -> Checked:
    """The one validator of a message's content, for both ways in: `prepare` (enqueue's
    arguments) and `check_row` (a row as any SQL writer inserted it). Raises ValidationError."""
    sender = check_address(from_addr, "from")
    to_l, cc_l, bcc_l = (
        check_addresses(to, "to"),
        check_addresses(cc, "cc"),
        check_addresses(bcc, "bcc"),
    )
    total = len(to_l) + len(cc_l) + len(bcc_l)
    if total == 0:
        raise ValidationError("at least one recipient (to, cc or bcc) is required")
    if total > MAX_RECIPIENTS:
        raise ValidationError(f"too many recipients: {total} (at most {MAX_RECIPIENTS})")
    if not isinstance(subject, str):
        raise ValidationError("subject must be text")
    check_line(subject, "subject")
    check_line(from_name, "from name")
    check_line(reference, "reference")
    check_line(idempotency_key, "idempotency key")
    reply = check_address(reply_to, "reply-to") if reply_to else None
    if text is None and html is None:
        raise ValidationError("a text or an HTML body is required")
    if importance not in IMPORTANCE:
        raise ValidationError(f"importance must be one of {', '.join(IMPORTANCE)}")
    if headers is not None and not isinstance(headers, Mapping):
        raise ValidationError("headers must be a mapping of name to value")
    custom = {}
    for name, value in (headers or {}).items():
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise ValidationError(f"invalid header name {name!r}")
        if name.lower() in RESERVED_HEADERS:
            raise ValidationError(f"header {name!r} is set from importance; use importance=")
        if not (name.lower().startswith("x-") or name.lower() in ALLOWED_HEADERS):
            raise ValidationError(
                f"header {name!r} is not allowed (use X-* or {', '.join(sorted(ALLOWED_HEADERS))})"
            )
        check_line(value, f"header {name}")
        custom[name] = value
    if len(attachments) > MAX_ATTACHMENTS:
        raise ValidationError(f"too many attachments: {len(attachments)} (at most {MAX_ATTACHMENTS})")
    for a in attachments:
        if not isinstance(a.content, bytes | bytearray):
            raise ValidationError(f"attachment {a.filename!r}: content must be bytes")
        check_line(a.filename, "attachment filename")
        check_line(a.content_type, "attachment content type")
        if a.content_type.count("/") != 1:
            raise ValidationError(f"attachment {a.filename!r}: content type must be type/subtype")
    return Checked(sender, to_l, cc_l, bcc_l, reply, custom)


def prepare(
    *,
    from_addr: str,
    to: Sequence[str] | str = (),
    cc: Sequence[str] | str = (),
    bcc: Sequence[str] | str = (),
    subject: str,
    text: str | None = None,
    html: str | None = None,
    from_name: str | None = None,
    reply_to: str | None = None,
    headers: Mapping[str, str] | None = None,
    attachments: Iterable[Attachment] = (),
    importance: str = "normal",
    priority: int | None = None,
    system_generated: bool = False,
    reference: str | None = None,
    idempotency_key: str | None = None,
    send_after: datetime | None = None,
) -> Draft:
    """Validate everything and render once to know the exact size. Raises ValidationError."""
    files = tuple(attachments)
    c = check_message(
        from_addr=from_addr,
        to=to,
        cc=cc,
        bcc=bcc,
        subject=subject,
        text=text,
        html=html,
        from_name=from_name,
        reply_to=reply_to,
        headers=headers,
        attachments=files,
        importance=importance,
        reference=reference,
        idempotency_key=idempotency_key,
    )
    if send_after is not None and send_after.tzinfo is None:
        raise ValidationError("send_after must be timezone-aware")
    draft = Draft(
        from_addr=c.from_addr,
        from_name=from_name,
        to=c.to,
        cc=c.cc,
        bcc=c.bcc,
        reply_to=c.reply_to,
        subject=subject,
        text=text,
        html=html,
        headers=c.headers,
        attachments=files,
        importance=importance,
        priority=_IMPORTANCE_PRIORITY[importance] if priority is None else int(priority),
        system_generated=system_generated,
        reference=reference,
        idempotency_key=idempotency_key,
        send_after=send_after,
        message_id=new_message_id(c.from_addr),
    )
    content = render_row(draft_fields(draft), files, date=datetime.now(UTC))
    kept = content if len(content) <= MAX_STORED_CONTENT_BYTES else None
    return replace(draft, size_bytes=len(content), content=kept)


# What `new_message_id` makes (and the schema's trigger, for SQL writers): <id@domain>, ASCII
# without spaces, brackets or anything the header parser would treat as structure.
_MESSAGE_ID = re.compile(r"<[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,200}@[A-Za-z0-9.-]{1,253}>")


def check_row(row: Mapping[str, Any], attachments: Sequence[Attachment] = ()) -> dict[str, Any]:
    """The validator of `enqueue`, applied to a message row however it was written (plain SQL
    included), before the worker builds it or contacts a server. Returns the row with its
    addresses normalised as enqueue writes them. Raises ValidationError."""
    c = check_message(
        from_addr=row["from_addr"],
        to=row.get("to_addrs") or (),
        cc=row.get("cc_addrs") or (),
        bcc=row.get("bcc_addrs") or (),
        subject=row.get("subject"),
        text=row.get("text_body"),
        html=row.get("html_body"),
        from_name=row.get("from_name"),
        reply_to=row.get("reply_to"),
        headers=row.get("headers"),
        attachments=attachments,
        importance=row.get("importance", "normal"),
        reference=row.get("reference"),
        idempotency_key=row.get("idempotency_key"),
    )
    check_message_id(row["message_id"])
    return {
        **row,
        "from_addr": c.from_addr,
        "to_addrs": c.to,
        "cc_addrs": c.cc,
        "bcc_addrs": c.bcc,
        "reply_to": c.reply_to,
        "headers": c.headers,
    }


def check_envelope(row: Mapping[str, Any]) -> dict[str, Any]:
    """The part of `check_row` a row with pre-rendered `content` needs before its envelope
    goes to a server: sender and recipients are addresses enqueue would take (normalised)."""
    to, cc, bcc = (row.get(k) or () for k in ("to_addrs", "cc_addrs", "bcc_addrs"))
    return {
        **row,
        "from_addr": check_address(row["from_addr"], "from"),
        "to_addrs": check_addresses(to, "to"),
        "cc_addrs": check_addresses(cc, "cc"),
        "bcc_addrs": check_addresses(bcc, "bcc"),
    }


def check_message_id(value: Any) -> None:
    if not isinstance(value, str) or not _MESSAGE_ID.fullmatch(value):
        raise ValidationError(f"message_id {value!r} is not of the form <unique@domain> (ASCII)")


def draft_fields(d: Draft) -> dict[str, Any]:
    """A Draft as the column names of `outbox.message`."""
    return {
        "from_addr": d.from_addr,
        "from_name": d.from_name,
        "to_addrs": d.to,
        "cc_addrs": d.cc,
        "bcc_addrs": d.bcc,
        "reply_to": d.reply_to,
        "subject": d.subject,
        "text_body": d.text,
        "html_body": d.html,
        "headers": d.headers,
        "importance": d.importance,
        "priority": d.priority,
        "system_generated": d.system_generated,
        "reference": d.reference,
        "idempotency_key": d.idempotency_key,
        "send_after": d.send_after,
        "message_id": d.message_id,
        "size_bytes": d.size_bytes,
        "content": d.content,
    }


def header_address(addr: str, display_name: str = "") -> Address:
    """An address for a header: the domain as punycode (RFC 2047 forbids encoded words in
    addresses); a non-ASCII local part stays as it is (SMTPUTF8 messages only)."""
    return Address(display_name=display_name, username=addr.rpartition("@")[0], domain=envelope_domain(addr))


def needs_smtputf8(row: Mapping[str, Any]) -> bool:
    addrs = [row["from_addr"], *(row.get("to_addrs") or ()), *(row.get("cc_addrs") or ())]
    if row.get("reply_to"):
        addrs.append(row["reply_to"])
    return any(not a.rpartition("@")[0].isascii() for a in addrs)


@functools.lru_cache(maxsize=64)
def _date_header(date: datetime | None) -> str:
    """Rows written together share their created_at, and so their Date (none: the epoch)."""
    return format_datetime(date) if date else "Thu, 01 Jan 1970 00:00:00 +0000"


def build(
    row: Mapping[str, Any], attachments: Iterable[Attachment] = (), *, date: datetime | None
) -> EmailMessage:
    """Build the MIME message from a message row. Bcc never appears in it."""
    msg = EmailMessage(policy=POLICY_UTF8 if needs_smtputf8(row) else POLICY)
    msg["From"] = header_address(row["from_addr"], row.get("from_name") or "")
    if row.get("to_addrs"):
        msg["To"] = [header_address(a) for a in row["to_addrs"]]
    if row.get("cc_addrs"):
        msg["Cc"] = [header_address(a) for a in row["cc_addrs"]]
    if row.get("reply_to"):
        msg["Reply-To"] = header_address(row["reply_to"])
    msg["Subject"] = row.get("subject") or ""
    msg["Message-ID"] = row["message_id"]
    msg["Date"] = _date_header(date)
    if row.get("importance") in _IMPORTANCE_HEADERS:
        importance, x_priority = _IMPORTANCE_HEADERS[row["importance"]]
        msg["Importance"] = importance
        msg["X-Priority"] = x_priority
    for name, value in (row.get("headers") or {}).items():
        msg[name] = value
    text, html = row.get("text_body"), row.get("html_body")
    if text is not None:
        msg.set_content(text)
        if html is not None:
            msg.add_alternative(html, subtype="html")
    else:
        msg.set_content(html or "", subtype="html")
    for a in attachments:
        maintype, subtype = a.content_type.split("/", 1)
        msg.add_attachment(a.content, maintype=maintype, subtype=subtype, filename=a.filename)
    return msg


def render(msg: EmailMessage) -> bytes:
    """The wire form: CRLF line ends, bodies 7-bit clean (headers too unless SMTPUTF8)."""
    return msg.as_bytes(policy=msg.policy)


def render_row(
    row: Mapping[str, Any], attachments: Sequence[Attachment] = (), *, date: datetime | None
) -> bytes:
    """The wire form of a message row: `render(build(row))`, written directly for the common
    message (see `_plain_wire`)."""
    if not attachments:
        data = _plain_wire(row, date)
        if data is not None:
            return data
    return render(build(row, attachments, date=date))


# The common message written directly. Most mail is a handful of ASCII header values, plain
# addresses and an ASCII text and/or HTML body with lines under 998 octets. For that message
# `_plain_wire` writes the very bytes `build` + `render` write (tests compare the two over
# generated rows), in a tenth of the time: the email package parses every value it is given,
# builds the body through its content manager and parses its own Content-Type again. Anything
# else -- non-ASCII, SMTPUTF8, attachments, long lines, odd spacing -- goes through `build`;
# a header value that is not simple is made by the header registry and policy, as `build` does.

_SIMPLE_VALUE = re.compile(r"[!-~]+(?: [!-~]+)*")  # printable ASCII words, single spaces
_TEXT_HEADERS = b'Content-Type: text/%s; charset="utf-8"\r\nContent-Transfer-Encoding: 7bit\r\n'
_MIME_VERSION = b"MIME-Version: 1.0\r\n"


def _line(name: str, value: Any) -> bytes:
    """One header line as `build` + `render` write it (value: text, or a list of addresses)."""
    if isinstance(value, str):
        if _SIMPLE_VALUE.fullmatch(value) and len(name) + 2 + len(value) <= POLICY.max_line_length:
            return f"{name}: {value}\r\n".encode("ascii")
    else:
        joined = ", ".join(value)
        if len(name) + 2 + len(joined) <= POLICY.max_line_length:
            return f"{name}: {joined}\r\n".encode("ascii")
        value = [header_address(a) for a in value]
    return POLICY.fold_binary(name, POLICY.header_store_parse(name, value)[1])  # refuses line breaks


@functools.lru_cache(maxsize=64)
def _from_line(from_addr: str, from_name: str) -> bytes:
    """The sender repeats: its line is made by the registry and policy once."""
    return POLICY.fold_binary(
        "From", POLICY.header_store_parse("From", header_address(from_addr, from_name))[1]
    )


def _body_7bit(body: str) -> bytes | None:
    """A body as the content manager writes it 7 bit (lines joined by CRLF, one at the end),
    or None where it would choose quoted-printable or base64."""
    if not body.isascii():
        return None
    lines = body.encode("ascii").splitlines()
    if lines and max(map(len, lines)) > POLICY.max_line_length:
        return None
    return b"\r\n".join(lines) + b"\r\n"


def _boundary(*bodies: bytes) -> str:
    """A boundary in the generator's own form that no body contains."""
    while True:
        boundary = "=" * 15 + f"{random.randrange(sys.maxsize):019d}=="
        if not any(boundary.encode() in b for b in bodies):
            return boundary


def _plain_wire(row: Mapping[str, Any], date: datetime | None) -> bytes | None:
    addresses = (row["from_addr"], *(row.get("to_addrs") or ()), *(row.get("cc_addrs") or ()))
    if not all(map(_plain_address, addresses)) or (
        row.get("reply_to") and not _plain_address(row["reply_to"])
    ):
        return None
    text, html = row.get("text_body"), row.get("html_body")
    bodies = {"plain": text, "html": html} if text is not None else {"html": html or ""}
    parts = [(subtype, _body_7bit(body)) for subtype, body in bodies.items() if body is not None]
    if any(data is None for _, data in parts):
        return None
    out = [_from_line(row["from_addr"], row.get("from_name") or "")]
    for name, key in (("To", "to_addrs"), ("Cc", "cc_addrs")):
        if row.get(key):
            out.append(_line(name, row[key]))
    if row.get("reply_to"):
        out.append(_line("Reply-To", [row["reply_to"]]))
    out.append(_line("Subject", row.get("subject") or ""))
    out.append(_line("Message-ID", row["message_id"]))
    out.append(_line("Date", _date_header(date)))
    if row.get("importance") in _IMPORTANCE_HEADERS:
        importance, x_priority = _IMPORTANCE_HEADERS[row["importance"]]
        out += (_line("Importance", importance), _line("X-Priority", x_priority))
    out += (_line(name, value) for name, value in (row.get("headers") or {}).items())
    if len(parts) == 1:
        ((subtype, data),) = parts
        out += (_TEXT_HEADERS % subtype.encode(), _MIME_VERSION, b"\r\n", data)
    else:  # multipart/alternative, as EmailMessage.add_alternative leaves it
        (_, text_b), (_, html_b) = parts
        b = _boundary(text_b, html_b).encode("ascii")
        out += (_MIME_VERSION, b'Content-Type: multipart/alternative; boundary="%s"\r\n\r\n--%s\r\n' % (b, b))
        out += (_TEXT_HEADERS % b"plain", b"\r\n", text_b, b"\r\n--%s\r\n" % b)
        out += (_TEXT_HEADERS % b"html", _MIME_VERSION, b"\r\n", html_b, b"\r\n--%s--\r\n" % b)
    return b"".join(out)
