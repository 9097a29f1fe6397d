"""Provider limits of a connector: rate limits (`N/s`, `N/min`, `N/h`, `N/day`), and how they
read in listings. Enforced by the workers (`worker/limiter.py`); stored on the connector as
canonical strings (`30/min`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from outbox.core.errors import ValidationError

UNITS = {"s": 1, "min": 60, "h": 3600, "day": 86400}
_ALIASES = {
    "sec": "s",
    "second": "s",
    "m": "min",
    "minute": "min",
    "hour": "h",
    "d": "day",
}
_RATE = re.compile(r"^\s*([0-9]{1,9})\s*/\s*([a-z]+)\s*$")


@dataclass(frozen=True, order=True)
class Rate:
    """At most `count` messages over any interval of `seconds`."""

    seconds: int
    count: int

    @property
    def unit(self) -> str:
        return next(u for u, s in UNITS.items() if s == self.seconds)

    def __str__(self) -> str:
        return f"{self.count}/{self.unit}"

    @property
    def interval_seconds(self) -> float:
        """The even spacing that keeps the promise: one message per seconds/count."""
        return self.seconds / self.count


def parse_rate(text: str) -> Rate:
    """`30/min` -> Rate(60, 30). Raises ValidationError with a one-line reason."""
    m = _RATE.match(text.lower())
    unit = _ALIASES.get(m.group(2), m.group(2)) if m else None
    if m is None or unit not in UNITS:
        raise ValidationError(f"rate limit {text!r} must be N/s, N/min, N/h or N/day (like 30/min)")
    count = int(m.group(1))
    if count < 1:
        raise ValidationError(f"rate limit {text!r} must allow at least 1 message")
    return Rate(UNITS[unit], count)


def parse_rates(texts: tuple[str, ...] | list[str]) -> tuple[Rate, ...]:
    """Rate limits as stored: parsed, one per interval length (two for the same interval
    would be one limit: the lower), shortest interval first."""
    best: dict[int, Rate] = {}
    for t in texts:
        r = parse_rate(t)
        if r.seconds not in best or r.count < best[r.seconds].count:
            best[r.seconds] = r
    return tuple(sorted(best.values()))


def summary(
    rates: tuple[Rate, ...],
    max_connections: int | None,
    max_recipients: int | None,
    max_messages_per_connection: int | None,
) -> str:
    """One compact cell for `connector list`: `30/min 10000/day conn 4 rcpt 500 msg/conn 100`."""
    parts = [str(r) for r in rates]
    if max_connections is not None:
        parts.append(f"conn {max_connections}")
    if max_recipients is not None:
        parts.append(f"rcpt {max_recipients}")
    if max_messages_per_connection is not None:
        parts.append(f"msg/conn {max_messages_per_connection}")
    return " ".join(parts) or "none"


# Adaptive slow-down after throttling replies. A throttling reply sets the spacing
# between sends to the connector (`throttle_interval_seconds`, at `throttled_at`): twice the
# current one, at least twice the spacing of its paced rate limits (THROTTLE_FIRST_RATE per
# second without one), at most THROTTLE_MAX_INTERVAL; once per reaction time (the spacing, at
# least a second), however many replies say so at once. It halves every
# THROTTLE_HALF_LIFE_SECONDS after that (the rate doubles), and is gone once it is no slower
# than the connector's own limits.
THROTTLE_FIRST_RATE = 10.0  # messages a second, for a connector without a paced rate limit
THROTTLE_MAX_INTERVAL = 60.0
THROTTLE_HALF_LIFE_SECONDS = 30.0
THROTTLE_GONE_SECONDS = 0.001  # a spacing this small no longer slows anything


def paced_interval(rates: tuple[Rate, ...]) -> float:
    """The spacing the connector's rate limits under an hour already impose (0: none)."""
    return max((r.interval_seconds for r in rates if r.seconds < 3600), default=0.0)


def slowdown(
    interval: float | None, throttled_at: datetime | None, rates: tuple[Rate, ...], now: datetime
) -> float | None:
    """The spacing between sends a throttling slow-down imposes now, or None."""
    if not interval or throttled_at is None:
        return None
    age = max(0.0, (now - throttled_at).total_seconds())
    current = interval * 0.5 ** (age / THROTTLE_HALF_LIFE_SECONDS)
    if current <= max(paced_interval(rates), THROTTLE_GONE_SECONDS):
        return None
    return current


def first_slowdown(rates: tuple[Rate, ...]) -> float:
    """The spacing of a connector's first step down: half the rate of its paced limit."""
    paced = paced_interval(rates)
    return min(THROTTLE_MAX_INTERVAL, 2 * paced if paced else 1 / THROTTLE_FIRST_RATE)


def per_second(interval: float) -> str:
    """A spacing as a rate for people: `2.5/s`, `12/min`."""
    rate = 1 / interval
    if rate >= 1:
        return f"{rate:.3g}/s"
    return f"{rate * 60:.3g}/min"
