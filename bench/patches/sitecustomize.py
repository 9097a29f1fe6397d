"""Prototypes of product changes, measured without touching the product's files.

Only active when the benchmark runs `outbox run` with this directory on PYTHONPATH and
OUTBOX_BENCH_PATCHES set (comma-separated names below); then it monkeypatches the already
installed `worker.delivery` at interpreter start, in the parent and the worker children alike.
These are measurement devices for bench/RESULTS.md, not proposed code:

- fast_render: the common message (short ASCII headers, text only, To only; no attachments,
  custom headers, display name, Reply-To or importance) is written as bytes directly with the
  stdlib's body encoder, byte-for-byte what `outbox.message.render(build(...))` produces for
  it (bench/patches/check_fast_render.py compares them); anything else takes the general path.

(Two earlier prototypes, batched outcome writes and a 10 ms Dramatiq consumer wait, are now
part of the product and were removed from here.)
"""

from __future__ import annotations

import os

_ACTIVE = {p.strip() for p in os.environ.get("OUTBOX_BENCH_PATCHES", "").split(",") if p.strip()}


def _fast_render() -> None:
    from email.contentmanager import _encode_text  # type: ignore[attr-defined]
    from email.utils import format_datetime

    from outbox.core.message import POLICY
    from worker import delivery

    original_build, original_render = delivery.build, delivery.render

    class Rendered:
        __slots__ = ("data",)

        def __init__(self, data: bytes) -> None:
            self.data = data

    def fast(row, attachments, date):  # type: ignore[no-untyped-def]
        if attachments or row.get("html_body") is not None or row.get("headers") or row.get("from_name"):
            return None
        if row.get("reply_to") or row.get("cc_addrs") or row.get("importance", "normal") != "normal":
            return None
        text = row.get("text_body")
        to = row.get("to_addrs") or []
        subject = row.get("subject") or ""
        head = [
            f"From: {row['from_addr']}",
            *([f"To: {', '.join(to)}"] if to else []),
            f"Subject: {subject}",
            f"Message-ID: {row['message_id']}",
            f"Date: {format_datetime(date) if date else 'Thu, 01 Jan 1970 00:00:00 +0000'}",
        ]
        if text is None or any(len(h) > 78 or not h.isascii() or "=?" in h for h in head):
            return None
        # The body exactly as EmailMessage.set_content encodes it (7bit, QP or base64).
        cte, payload = _encode_text(text, "utf-8", None, POLICY)
        head += [
            'Content-Type: text/plain; charset="utf-8"',
            f"Content-Transfer-Encoding: {cte}",
            "MIME-Version: 1.0",
        ]
        body = "".join(line + "\r\n" for line in payload.splitlines())
        return ("\r\n".join(head) + "\r\n\r\n" + body).encode("ascii")

    def build(row, attachments=(), *, date):  # type: ignore[no-untyped-def]
        data = fast(row, attachments, date)
        return Rendered(data) if data is not None else original_build(row, attachments, date=date)

    def render(msg):  # type: ignore[no-untyped-def]
        return msg.data if isinstance(msg, Rendered) else original_render(msg)

    delivery.build, delivery.render = build, render


if "fast_render" in _ACTIVE:
    _fast_render()
