"""Limits and reserved headers from the README's security table, refused before any write."""

from __future__ import annotations

import pytest

from outbox.core.errors import ValidationError
from outbox.core.message import MAX_ATTACHMENTS, MAX_RECIPIENTS, Attachment, prepare


def make(**kw):
    args = {"from_addr": "a@example.com", "to": ["b@example.org"], "subject": "s", "text": "t"} | kw
    return prepare(**args)


def test_too_many_recipients():
    with pytest.raises(ValidationError, match="too many recipients"):
        make(to=[f"r{i}@example.org" for i in range(MAX_RECIPIENTS + 1)])
    assert make(to=[f"r{i}@example.org" for i in range(MAX_RECIPIENTS)])


def test_too_many_attachments():
    files = [Attachment(f"f{i}.txt", b"x", "text/plain") for i in range(MAX_ATTACHMENTS + 1)]
    with pytest.raises(ValidationError, match="too many attachments"):
        make(attachments=files)


def test_attachment_content_must_be_bytes():
    with pytest.raises(ValidationError, match="content must be bytes"):
        make(attachments=[Attachment("f.txt", "text", "text/plain")])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "addr",
    ["x" * 65 + "@example.org", "a@" + "d" * 63 + "." + "e" * 63 + "." + "f" * 63 + "." + "g" * 60 + ".org"],
)
def test_overlong_addresses(addr):
    with pytest.raises(ValidationError, match="invalid address"):
        make(to=[addr])


@pytest.mark.parametrize("name", ["X-Priority", "Importance", "X-MSMail-Priority"])
def test_priority_headers_come_from_importance_only(name):
    with pytest.raises(ValidationError, match="set from importance"):
        make(headers={name: "1"})


def test_subject_too_long_for_one_header_line():
    with pytest.raises(ValidationError, match="too long"):
        make(subject="ü" * 400)
