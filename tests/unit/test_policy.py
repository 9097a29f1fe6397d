"""worker.policy: SMTP failure classification, the next status of a message, and backoff."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outbox.core.policy import PHASES, Verdict, backoff_seconds, classify, decide
from outbox.core.settings import Settings

ACCEPTED, TRANSIENT, PERMANENT, AMBIGUOUS = (
    Verdict.ACCEPTED,
    Verdict.TRANSIENT,
    Verdict.PERMANENT,
    Verdict.AMBIGUOUS,
)
CONNECTOR_PHASES = ("connect", "ehlo", "starttls", "auth")
MESSAGE_PHASES = ("mail", "rcpt", "data", "dot")

NOW = datetime(2025, 3, 17, 12, 0, tzinfo=UTC)
POLICY = Settings(retry_base_seconds=60, retry_max_seconds=900, max_attempts=5, max_age_seconds=86400)


class FixedRandom(random.Random):
    """An rng whose random() is always `value` (0 = shortest delay, just under 1 = longest)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def random(self) -> float:
        return self.value


def next_status(verdicts, *, settled=None, attempts=1, age=timedelta(minutes=1), policy=POLICY):
    return decide(
        verdicts=verdicts,
        settled=settled or {},
        attempts=attempts,
        created_at=NOW - age,
        now=NOW,
        settings=policy,
    )


# -- classify -------------------------------------------------------------------------------


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("code", [421, 450, 451, 452, 454, 471])
def test_4xx_is_transient_at_every_phase(phase, code):
    assert classify(phase, code) is TRANSIENT


@pytest.mark.parametrize("phase", MESSAGE_PHASES)
@pytest.mark.parametrize("code", [500, 501, 550, 551, 553, 554])
def test_5xx_is_permanent_from_mail_on(phase, code):
    assert classify(phase, code) is PERMANENT


def test_552_at_rcpt_is_transient():
    # RFC 5321 4.5.3.1.10: "too many recipients" given as 552 is to be treated as 452.
    assert classify("rcpt", 552) is TRANSIENT
    assert classify("dot", 552) is PERMANENT


@pytest.mark.parametrize("phase", CONNECTOR_PHASES)
@pytest.mark.parametrize("code", [535, 530, 554, 502])
def test_5xx_before_mail_is_the_connectors_problem_so_transient(phase, code):
    assert classify(phase, code) is TRANSIENT


@pytest.mark.parametrize("phase", [p for p in PHASES if p != "dot"])
def test_no_reply_before_the_final_dot_is_transient(phase):
    assert classify(phase, None) is TRANSIENT


def test_no_reply_after_the_final_dot_is_ambiguous():
    assert classify("dot", None) is AMBIGUOUS


def test_2xx_is_accepted():
    assert classify("dot", 250) is ACCEPTED
    assert classify("rcpt", 251) is ACCEPTED


# -- decide: final statuses -------------------------------------------------------------------


def test_all_accepted_is_sent():
    d = next_status({"a@x.example": ACCEPTED, "b@x.example": ACCEPTED})
    assert (d.status, d.next_attempt_at) == ("sent", None)
    assert d.recipients == {"a@x.example": "sent", "b@x.example": "sent"}


def test_accepted_and_permanently_refused_is_partial():
    d = next_status({"a@x.example": ACCEPTED, "b@x.example": PERMANENT})
    assert (d.status, d.next_attempt_at) == ("partial", None)
    assert d.recipients == {"a@x.example": "sent", "b@x.example": "failed"}


def test_all_permanently_refused_is_failed():
    d = next_status({"a@x.example": PERMANENT, "b@x.example": PERMANENT})
    assert (d.status, d.next_attempt_at) == ("failed", None)


# -- decide: retries ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("verdicts", "recipients"),
    [
        ({"a@x.example": TRANSIENT}, {"a@x.example": "deferred"}),
        ({"a@x.example": AMBIGUOUS}, {"a@x.example": "ambiguous"}),
        (
            {"a@x.example": ACCEPTED, "b@x.example": TRANSIENT},
            {"a@x.example": "sent", "b@x.example": "deferred"},
        ),
        (
            {"a@x.example": PERMANENT, "b@x.example": TRANSIENT},
            {"a@x.example": "failed", "b@x.example": "deferred"},
        ),
    ],
    ids=["transient", "ambiguous", "sent+transient", "refused+transient"],
)
def test_pending_recipients_with_attempts_left_retry(verdicts, recipients):
    d = next_status(verdicts, attempts=1)
    assert d.status == "retry"
    assert d.next_attempt_at is not None and d.next_attempt_at > NOW
    # Settled recipients keep their result; only the pending ones are tried again.
    assert d.recipients == recipients


def test_first_retry_is_within_half_to_one_base_delay():
    for _ in range(200):
        d = next_status({"a@x.example": TRANSIENT}, attempts=1)
        assert timedelta(seconds=30) <= d.next_attempt_at - NOW <= timedelta(seconds=60)


def test_later_retries_are_capped_by_retry_max_seconds():
    # 60 * 2**3 = 480 s for the 4th attempt, under the 900 s cap.
    d = next_status({"a@x.example": TRANSIENT}, attempts=4)
    assert timedelta(seconds=240) <= d.next_attempt_at - NOW <= timedelta(seconds=480)
    policy = Settings(retry_base_seconds=60, retry_max_seconds=300, max_attempts=10, max_age_seconds=86400)
    for attempts in range(4, 10):
        d = next_status({"a@x.example": TRANSIENT}, attempts=attempts, policy=policy)
        assert timedelta(seconds=150) <= d.next_attempt_at - NOW <= timedelta(seconds=300)


@pytest.mark.parametrize("attempts", [5, 6])
def test_retries_exhausted_is_failed(attempts):
    d = next_status({"a@x.example": TRANSIENT, "b@x.example": AMBIGUOUS}, attempts=attempts)
    assert (d.status, d.next_attempt_at) == ("failed", None)
    assert d.recipients == {"a@x.example": "failed", "b@x.example": "failed"}


def test_retries_exhausted_after_some_were_sent_is_partial():
    d = next_status({"a@x.example": ACCEPTED, "b@x.example": TRANSIENT}, attempts=5)
    assert d.status == "partial"
    assert d.recipients == {"a@x.example": "sent", "b@x.example": "failed"}


def test_maximum_age_ends_retries_even_with_attempts_left():
    d = next_status({"a@x.example": TRANSIENT}, attempts=1, age=timedelta(days=1, seconds=1))
    assert (d.status, d.next_attempt_at) == ("failed", None)


def test_just_under_maximum_age_still_retries():
    d = next_status({"a@x.example": TRANSIENT}, attempts=1, age=timedelta(days=1) - timedelta(seconds=1))
    assert d.status == "retry"


# -- decide: recipients settled by earlier attempts ----------------------------------------------


@pytest.mark.parametrize(
    ("settled", "verdicts", "status"),
    [
        ({"a@x.example": "sent"}, {"b@x.example": ACCEPTED}, "sent"),
        ({"a@x.example": "sent"}, {"b@x.example": PERMANENT}, "partial"),
        ({"a@x.example": "failed"}, {"b@x.example": ACCEPTED}, "partial"),
        ({"a@x.example": "failed"}, {"b@x.example": PERMANENT}, "failed"),
        ({"a@x.example": "sent", "c@x.example": "failed"}, {"b@x.example": ACCEPTED}, "partial"),
    ],
)
def test_recipients_settled_earlier_count_in_the_final_status(settled, verdicts, status):
    assert next_status(verdicts, settled=settled, attempts=3).status == status


def test_retry_exhausted_with_earlier_sent_recipient_is_partial():
    d = next_status({"b@x.example": TRANSIENT}, settled={"a@x.example": "sent"}, attempts=5)
    assert d.status == "partial"


# -- backoff --------------------------------------------------------------------------------


def test_backoff_doubles_per_attempt_until_the_cap():
    shortest = [backoff_seconds(n, POLICY, FixedRandom(0.0)) for n in range(1, 8)]
    assert shortest == [30, 60, 120, 240, 450, 450, 450]
    longest = [backoff_seconds(n, POLICY, FixedRandom(0.999999)) for n in range(1, 8)]
    assert longest == pytest.approx([60, 120, 240, 480, 900, 900, 900], rel=1e-5)


@settings(max_examples=200, deadline=None)
@given(
    attempts=st.integers(min_value=1, max_value=64),
    base=st.floats(min_value=0.1, max_value=3600),
    cap_factor=st.floats(min_value=1, max_value=1000),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_backoff_is_within_half_to_one_step_and_never_above_the_cap(attempts, base, cap_factor, seed):
    policy = Settings(retry_base_seconds=base, retry_max_seconds=base * cap_factor)
    step = min(policy.retry_max_seconds, base * 2 ** (attempts - 1))
    delay = backoff_seconds(attempts, policy, random.Random(seed))
    assert step / 2 <= delay <= step <= policy.retry_max_seconds
