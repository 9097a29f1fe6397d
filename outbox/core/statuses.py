"""The outbox's vocabulary, defined once: message statuses, attempt outcomes and recipient
results. The SQL side is one CHECK constraint each (`message_status_valid`,
`attempt_outcome_valid`, `recipient_status_valid` in schema.sql); tests/unit/test_statuses.py
and tests/integration/test_vocabulary.py keep the two, and every status the .sql files name,
in agreement."""

from __future__ import annotations

from enum import StrEnum


class MessageStatus(StrEnum):
    QUEUED = "queued"  # due at next_attempt_at (first send_after or the insert)
    DISPATCHED = "dispatched"  # handed to the broker under a lease
    SENDING = "sending"  # claimed by a worker under its lease
    RETRY = "retry"  # waiting for its next attempt
    HELD = "held"  # its connector is disabled
    SENT = "sent"
    PARTIAL = "partial"  # some recipients refused for good
    FAILED = "failed"
    CANCELLED = "cancelled"


class AttemptOutcome(StrEnum):
    SENT = "sent"
    PARTIAL = "partial"
    RETRY = "retry"
    FAILED = "failed"
    HELD = "held"
    AMBIGUOUS = "ambiguous"  # lost after the final dot: the server may have it
    LEASE_EXPIRED = "lease-expired"  # its worker was lost


class RecipientStatus(StrEnum):
    SENT = "sent"
    FAILED = "failed"
    DEFERRED = "deferred"
    AMBIGUOUS = "ambiguous"


STATUSES = tuple(s.value for s in MessageStatus)
FINISHED = ("sent", "partial", "failed", "cancelled")  # retention and prune delete these
IN_FLIGHT = ("dispatched", "sending")  # under a lease
WAITING = ("queued", "retry", "held")
DUE = ("queued", "retry")  # claimed by the poller once next_attempt_at has come
OUTCOMES = tuple(o.value for o in AttemptOutcome)
RECIPIENT_STATUSES = tuple(r.value for r in RecipientStatus)
