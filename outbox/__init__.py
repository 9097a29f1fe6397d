"""outbox-worker: a durable Postgres outbox for outbound email.

Applications call `outbox.enqueue(conn, ...)` inside their own transaction; delivery hosts
run `outbox run` (or `outbox poll` and `outbox worker`).
"""

from outbox.enqueue import enqueue, enqueue_async
from outbox.errors import (
    ConfigurationError,
    NotFoundError,
    OutboxError,
    ValidationError,
)
from outbox.message import Attachment

__all__ = [
    "Attachment",
    "ConfigurationError",
    "NotFoundError",
    "OutboxError",
    "ValidationError",
    "enqueue",
    "enqueue_async",
]
