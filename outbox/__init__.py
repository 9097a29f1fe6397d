"""outbox-worker: a durable Postgres outbox for outbound email.

Applications call `outbox.enqueue(conn, ...)` inside their own transaction; delivery hosts
run `outbox run` (or `outbox poll` and `outbox worker`).
"""

import gc as _gc

# What these imports create lives as long as the process: the cyclic collector need not walk
# it while it grows (a sixth of the command line's start-up). Its state is given back after.
_collecting = _gc.isenabled()
_gc.disable()

try:
    from outbox.core.errors import (
        ConfigurationError,
        NotFoundError,
        OutboxError,
        ValidationError,
    )
    from outbox.core.message import Attachment
    from outbox.enqueue import enqueue, enqueue_async
finally:
    if _collecting:
        _gc.enable()

__all__ = [
    "Attachment",
    "ConfigurationError",
    "NotFoundError",
    "OutboxError",
    "ValidationError",
    "enqueue",
    "enqueue_async",
]
