"""The adaptive slow-down after throttling replies (issue 18): how far it slows a connector
down and how it recovers (outbox/limits.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from outbox.core import limits
from outbox.core.limits import parse_rates

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def test_a_connector_without_a_paced_limit_is_first_slowed_to_10_a_second():
    assert limits.first_slowdown(()) == 0.1
    assert limits.first_slowdown(parse_rates(["10000/day"])) == 0.1  # a day cap paces nothing


def test_a_paced_limit_is_halved_first():
    assert limits.first_slowdown(parse_rates(["30/min"])) == 4.0
    assert limits.first_slowdown(parse_rates(["14/s", "50000/day"])) == 2 / 14


def test_it_recovers_by_half_every_30_seconds_and_ends_at_the_connectors_own_pace():
    rates = parse_rates(["5/s"])  # 0.2 s apart of its own
    assert limits.slowdown(0.8, NOW, rates, NOW) == 0.8
    assert abs(limits.slowdown(0.8, NOW - timedelta(seconds=30), rates, NOW) - 0.4) < 1e-9
    assert limits.slowdown(0.8, NOW - timedelta(seconds=60), rates, NOW) is None  # 0.2: its own
    assert limits.slowdown(0.1, NOW - timedelta(seconds=600), (), NOW) is None
    assert limits.slowdown(None, None, rates, NOW) is None


def test_rates_for_people():
    assert limits.per_second(0.1) == "10/s"
    assert limits.per_second(4.0) == "15/min"
