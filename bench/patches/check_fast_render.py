"""Check that the fast_render prototype (sitecustomize.py) writes exactly the bytes of
`outbox.message.render(build(...))`, and time both. Run:

    OUTBOX_BENCH_PATCHES=fast_render PYTHONPATH=bench/patches \
        .venv/bin/python -m bench.patches.check_fast_render
"""

from __future__ import annotations

import timeit
from datetime import UTC, datetime

from bench.common import body, subject
from outbox.core.message import build, render
from worker import delivery

BODIES = [
    body(1),
    body(123456),
    "short\n",
    "no newline at the end",
    "line\r\nwith CRLF\r\n\r\n. a dot line\n.\n",
    "Grüße aus Köln — naïve café\n",
    "x" * 200 + "\n" + "y" * 90,
    "From the start\nFrom me\n",
    "",
]


def row(text: str, i: int = 1) -> dict[str, object]:
    return {
        "from_addr": "app@bench.example",
        "to_addrs": [f"user{i}@bench.example"],
        "cc_addrs": [],
        "subject": subject(i),
        "message_id": "<0123456789abcdef@bench.example>",
        "text_body": text,
        "html_body": None,
        "headers": {},
        "importance": "normal",
        "from_name": None,
        "reply_to": None,
    }


def main() -> None:
    assert delivery.build is not build, "run with OUTBOX_BENCH_PATCHES=fast_render PYTHONPATH=bench/patches"
    date = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    fast = 0
    for text in BODIES:
        r = row(text)
        expected = render(build(r, (), date=date))
        got = delivery.render(delivery.build(r, (), date=date))
        assert got == expected, (text, expected, got)
        fast += type(delivery.build(r, (), date=date)).__name__ == "Rendered"
    print(f"identical bytes for {len(BODIES)} bodies ({fast} took the fast path)")
    r = row(body(1))
    n = 3000
    slow = timeit.timeit(lambda: render(build(r, (), date=date)), number=n) / n * 1e6
    quick = timeit.timeit(lambda: delivery.render(delivery.build(r, (), date=date)), number=n) / n * 1e6
    print(f"build+render: {slow:.0f} us/msg; fast path: {quick:.0f} us/msg")


if __name__ == "__main__":
    main()
