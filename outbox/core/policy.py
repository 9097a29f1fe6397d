"""The one place that decides retry vs fail.

`classify` turns an SMTP phase plus reply (or the lack of one) into a verdict; `decide`
turns an attempt's per-recipient verdicts, the attempt count and the message's age into the
row's next status.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from outbox.core.settings import Settings

# SMTP phases, in order. After `dot` the server may have accepted the message.
# "token": an `oauth2` connector's access token is fetched before connecting.
PHASES = ("token", "connect", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "dot")
# Failures in these phases are the connector's (its token endpoint, server, TLS or login).
CONNECTOR_PHASES = ("token", "connect", "ehlo", "starttls", "auth")


class Verdict(StrEnum):
    ACCEPTED = "accepted"  # 250 after the final dot
    TRANSIENT = "transient"  # try again later
    PERMANENT = "permanent"  # refused for good
    AMBIGUOUS = "ambiguous"  # lost after the final dot: the server may have it


def classify(phase: str, code: int | None) -> Verdict:
    """Verdict for a failure at `phase` with reply `code` (None: no reply, the connection
    dropped or timed out)."""
    if code is None:
        return Verdict.AMBIGUOUS if phase == "dot" else Verdict.TRANSIENT
    if 200 <= code < 400:
        return Verdict.ACCEPTED
    if 400 <= code < 500:
        return Verdict.TRANSIENT
    if phase == "rcpt" and code == 552:  # RFC 5321 4.5.3.1.10: treat as 452
        return Verdict.TRANSIENT
    if phase in CONNECTOR_PHASES:
        # Greeting refusals (554), TLS and AUTH failures are the connector's problem, not
        # this message's: never spend a message's life on them as permanent.
        return Verdict.TRANSIENT
    return Verdict.PERMANENT


@dataclass(frozen=True)
class Decision:
    status: str  # next message status
    next_attempt_at: datetime | None
    recipients: dict[str, str]  # addr -> recipient status for this attempt
    failure: bool  # a failure to show (first_failed_at, last_error)
    last_error: str | None = None
    outcome: str = ""  # the attempt's label in outbox.attempt
    refund: bool = False  # the attempt does not count (the connector's fault, not the message's)


RECIPIENT_STATUS = {
    Verdict.ACCEPTED: "sent",
    Verdict.PERMANENT: "failed",
    Verdict.TRANSIENT: "deferred",
    Verdict.AMBIGUOUS: "ambiguous",
}


def backoff_seconds(attempts: int, settings: Settings, rng: random.Random | None = None) -> float:
    """Exponential backoff with equal jitter: half the step fixed, half random."""
    step = min(settings.retry_max_seconds, settings.retry_base_seconds * (2 ** max(0, attempts - 1)))
    r = (rng or random).random()
    return step / 2 + step / 2 * r


# Replies that say "slow down", not "this message is wrong": RFC 3463 4.7.x (421/450/451/454
# with 4.7.0 and friends: Microsoft 365, Amazon SES, Gmail), 452 4.5.3 (too many recipients in
# this transaction) and the common wordings of servers that send no enhanced code.
_THROTTLE_CODES = (421, 450, 451, 452, 454)
_THROTTLE_STATUS = re.compile(r"^\s*4\.(7\.\d{1,3}|5\.3)\b")
_THROTTLE_WORDS = re.compile(
    r"throttl|rate limit|too many (messages|recipients|connections|emails)|sending rate|"
    r"slow down|exceeded.*(rate|quota|limit)",
    re.IGNORECASE,
)


def is_throttling(code: int | None, reply: str | None) -> bool:
    """A temporary refusal that means the server wants us slower: the message spends no
    attempt on it (only its maximum age ends it)."""
    if code not in _THROTTLE_CODES or not reply:
        return False
    return bool(_THROTTLE_STATUS.match(reply) or _THROTTLE_WORDS.search(reply))


def is_connector_problem(phase: str, verdicts: Mapping[str, Verdict]) -> bool:
    """Failures before MAIL (token, connect, greeting, TLS, AUTH) are the connector's, not the
    message's: they must not spend every queued message's attempts."""
    return (
        phase in CONNECTOR_PHASES
        and bool(verdicts)
        and all(v is Verdict.TRANSIENT for v in verdicts.values())
    )


def decide(
    *,
    verdicts: Mapping[str, Verdict],
    settled: Mapping[str, str],
    attempts: int,
    created_at: datetime,
    now: datetime,
    settings: Settings,
    summary: str = "",
    refused: Mapping[str, str] | None = None,
    connector_problem: bool = False,
    connector_retry_at: datetime | None = None,
    throttled: bool = False,
) -> Decision:
    """Next status from this attempt's verdict per recipient.

    `settled` holds recipients finished by earlier attempts ('sent'/'failed'), which this
    attempt did not send to. Pending recipients (transient or ambiguous) retry until
    `max_attempts` or `max_age_seconds`, then fail. An ambiguous outcome (lost after the final
    dot) is retried with the same Message-ID, or failed for an operator when
    `ambiguous_policy` is `hold`. A connector problem retries when the connector is due again,
    without spending the message's attempt; only the maximum age ends it. So does throttling
    (`throttled`: the server said slow down, see `is_throttling`) for the recipients left.
    """
    everyone_has_it = all(v is Verdict.ACCEPTED for v in verdicts.values()) and all(
        s == "sent" for s in settled.values()
    )
    if everyone_has_it and not connector_problem:  # the common case, as the rest below would say
        return Decision("sent", None, dict.fromkeys(verdicts, "sent"), False, None, "sent")
    recipients = {addr: RECIPIENT_STATUS[v] for addr, v in verdicts.items()}
    pending = [a for a, s in recipients.items() if s in ("deferred", "ambiguous")]
    ambiguous = any(s == "ambiguous" for s in recipients.values())
    too_old = now - created_at >= timedelta(seconds=settings.max_age_seconds)
    label = "ambiguous" if ambiguous else ""
    if connector_problem and not too_old:
        when = connector_retry_at or now + timedelta(seconds=backoff_seconds(1, settings))
        return Decision("retry", max(when, now), recipients, True, summary, "retry", refund=True)
    if ambiguous and settings.ambiguous_policy == "hold":
        reason = (
            f"ambiguous outcome after the final dot ({summary}): the server may have accepted it; "
            "held for an operator (ambiguous-policy hold) - replay to send again"
        )
        recipients.update({a: "ambiguous" for a in pending})
        return Decision("failed", None, recipients, True, reason, "ambiguous")
    if pending and throttled and not too_old:
        delay = backoff_seconds(1, settings)
        return Decision(
            "retry", now + timedelta(seconds=delay), recipients, True, summary, label or "retry", refund=True
        )
    exhausted = attempts >= settings.max_attempts or too_old
    if pending and not exhausted:
        delay = backoff_seconds(attempts, settings)
        return Decision("retry", now + timedelta(seconds=delay), recipients, True, summary, label or "retry")
    if pending:
        recipients.update({a: "failed" for a in pending})
        why = "maximum age reached" if too_old else f"gave up after {attempts} attempts"
        reason = f"{why}: {summary}"
    else:
        reason = "; ".join(f"{a}: {r}" for a, r in (refused or {}).items()) or summary
    final = list(settled.values()) + list(recipients.values())
    sent = sum(1 for s in final if s == "sent")
    if sent == len(final):
        return Decision("sent", None, recipients, False, None, label or "sent")
    status = "partial" if sent else "failed"
    return Decision(status, None, recipients, True, reason[:2000], label or status)


def unbuildable(recipients: list[str], reason: str) -> Decision:
    """A message whose row cannot be built into MIME fails at once: building it again would
    give the same error, and trying would spend attempts and time for nothing."""
    return Decision("failed", None, dict.fromkeys(recipients, "failed"), True, reason[:2000], "failed")


# Phases a lease renewal records before any SMTP progress: the worker had claimed the row, or
# waited for its connector. A message lost there gives its attempt back, twice at most.
UNSTARTED_PHASES = ("claimed", "waiting")
REFUNDS_AT_MOST = 2


@dataclass(frozen=True)
class LeaseExpiry:
    status: str  # the row's next status
    attempts: int  # its attempt count afterwards
    outcome: str | None  # the attempt row written (None: a dispatched row had no attempt)
    refund: bool  # the attempt was given back


def after_lease_expired(
    *, was: str, phase: str | None, attempts: int, earlier_refunds: int, settings: Settings
) -> LeaseExpiry:
    """What becomes of a row whose lease expired (its worker, or Redis, was lost). The poller's
    `reap_expired` statement applies this to many rows at once, in SQL;
    tests/integration/test_vocabulary.py checks it against this function case by case.

    A `sending` row lost before its worker recorded SMTP progress gives its attempt back (at most
    REFUNDS_AT_MOST times per message); lost after DATA began it is ambiguous (failed for an
    operator under `ambiguous_policy` hold); otherwise it retries while attempts remain."""
    sending = was == "sending"
    ambiguous = sending and phase in ("data", "dot")
    refund = sending and phase in UNSTARTED_PHASES and attempts > 0 and earlier_refunds < REFUNDS_AT_MOST
    left = attempts - int(refund)
    if (ambiguous and settings.ambiguous_policy == "hold") or (
        sending and not refund and left >= settings.max_attempts
    ):
        status = "failed"
    elif left == 0:
        status = "queued"
    else:
        status = "retry"
    outcome = ("ambiguous" if ambiguous else "lease-expired") if sending else None
    return LeaseExpiry(status, left, outcome, refund)


def waiting(
    *,
    attempts: int,
    created_at: datetime,
    now: datetime,
    settings: Settings,
    until: datetime,
    reason: str,
) -> Decision:
    """A message that met its connector's limits before anything was sent: back in the queue
    (`queued`, or `retry` when earlier attempts counted), due at `until`, its attempt given
    back and the reason on the row (`waiting for rate limit 30/min until T`). Only the maximum
    age ends such a message."""
    if now - created_at >= timedelta(seconds=settings.max_age_seconds):
        return Decision("failed", None, {}, True, f"maximum age reached: {reason}"[:2000], "failed")
    status = "retry" if attempts > 1 else "queued"
    return Decision(status, until, {}, False, reason, "waiting", refund=True)
