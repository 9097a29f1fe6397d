"""What every system in the benchmark sends: the same small text email, N times."""

from __future__ import annotations

FROM_ADDR = "app@bench.example"
# How often the harness counts finished rows while a system sends. Timing comes from the rows'
# own timestamps (last sent_at / last_updated), so this only decides how soon the harness
# notices the end; counting scans the whole table, so it is kept rare enough not to take CPU
# from the system being measured (the same for every system).
POLL_SECONDS = 0.2
GATEWAY_ADDR = "gateway@bench.example"
SUBJECT = "Your order {i} has shipped"
BODY = (
    "Hello,\n\n"
    "your order {i} left our warehouse today and should arrive within three working days.\n"
    "You can follow the parcel with the tracking link in your account.\n\n"
    "Thank you for shopping with us.\n"
)


def to_addr(i: int) -> str:
    return f"user{i}@bench.example"


def subject(i: int) -> str:
    return SUBJECT.format(i=i)


def body(i: int) -> str:
    return BODY.format(i=i)


# The same messages for outbox-worker, inserted by SQL (the minimal contract insert).
INSERT_OUTBOX_SQL = """
INSERT INTO outbox.message (from_addr, to_addrs, subject, text_body)
SELECT %(from_addr)s, ARRAY['user' || i || '@bench.example'],
       replace(%(subject)s, '{i}', i::text), replace(%(body)s, '{i}', i::text)
  FROM generate_series(%(first)s::int, %(last)s::int) AS i
"""


def insert_params(first: int, last: int) -> dict[str, object]:
    return {"from_addr": FROM_ADDR, "subject": SUBJECT, "body": BODY, "first": first, "last": last}
