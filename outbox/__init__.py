"""outbox-worker: a durable Postgres outbox for outbound email.

Applications call `outbox.enqueue(conn, ...)` inside their own transaction; delivery hosts
run `outbox run` (or `outbox poll` and `outbox worker`).
"""

from outbox.core.errors import (
    ConfigurationError,
    NotFoundError,
    OutboxError,
    ValidationError,
)
from outbox.core.message import Attachment
from outbox.enqueue import enqueue, enqueue_async

__all__ = [
    "Attachment",
    "ConfigurationError",
    "NotFoundError",
    "OutboxError",
    "ValidationError",
    "enqueue",
    "enqueue_async",
]
