"""Prototypes of product changes, measured without touching the product's files.

Only active when the benchmark runs `outbox run` with this directory on PYTHONPATH and
OUTBOX_BENCH_PATCHES set (comma-separated names below); then it monkeypatches the already
installed `worker.delivery` at interpreter start, in the parent and the worker children alike.
These are measurement devices for bench/RESULTS.md, not proposed code:

- fast_render: the common message (short ASCII headers, text only, To only; no attachments,
  custom headers, display name, Reply-To or importance) is written as bytes directly with the
  stdlib's body encoder, byte-for-byte what `outbox.message.render(build(...))` produces for
  it (bench/patches/check_fast_render.py compares them); anything else takes the general path.
- consumer_timeout: Dramatiq workers built with worker_timeout=OUTBOX_BENCH_WORKER_TIMEOUT_MS
  (default 10) instead of the runner's 100 ms.
- batch_finish: the outcomes of one broker message are written with one pipelined
  `executemany` of the same `finish_attempt` statement after the batch, instead of one
  round trip per message.
"""

from __future__ import annotations

import os

_ACTIVE = {p.strip() for p in os.environ.get("OUTBOX_BENCH_PATCHES", "").split(",") if p.strip()}


def _fast_render() -> None:
    from email.contentmanager import _encode_text  # type: ignore[attr-defined]
    from email.utils import format_datetime

    from outbox.message import POLICY
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


def _batch_finish() -> None:
    import asyncio
    import contextvars

    from worker import delivery

    buffer: contextvars.ContextVar[list[dict] | None] = contextvars.ContextVar("bench_finish", default=None)
    original_write = delivery.Delivery._write

    async def run(self, handed):  # type: ignore[no-untyped-def]
        batch = await self._claim(handed)
        if batch is None:
            return
        pending: list[dict] = []
        token = buffer.set(pending)
        try:
            await asyncio.gather(*(self._deliver(row, batch) for row in batch.rows))
        finally:
            buffer.reset(token)
        if pending:
            async with self.pool.connection() as conn, conn.cursor() as cur:
                await cur.executemany(delivery.Q["finish_attempt"], pending)

    async def write(self, row, settings, params, recipients):  # type: ignore[no-untyped-def]
        pending = buffer.get()
        if pending is None:
            return await original_write(self, row, settings, params, recipients)
        params |= {
            "id": row["id"],
            "lease_token": row["lease_token"],
            "r_addrs": list(recipients),
            "r_status": [r[0] for r in recipients.values()],
            "r_codes": [r[1] for r in recipients.values()],
            "r_replies": [r[2] for r in recipients.values()],
        }
        pending.append(params)

    delivery.Delivery.run = run
    delivery.Delivery._write = write


def _consumer_timeout() -> None:
    """Dramatiq's Redis consumer polls an empty queue with a backoff up to `worker_timeout`
    (the runner passes 100 ms); a smaller cap shortens the pick-up delay at low load."""
    import dramatiq

    timeout_ms = int(os.environ.get("OUTBOX_BENCH_WORKER_TIMEOUT_MS", "10"))
    original_init = dramatiq.Worker.__init__

    def init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs["worker_timeout"] = timeout_ms
        original_init(self, *args, **kwargs)

    dramatiq.Worker.__init__ = init  # type: ignore[method-assign]


if "fast_render" in _ACTIVE:
    _fast_render()
if "batch_finish" in _ACTIVE:
    _batch_finish()
if "consumer_timeout" in _ACTIVE:
    _consumer_timeout()
