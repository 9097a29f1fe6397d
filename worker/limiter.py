"""Rate limits per connector, shared by every worker process and host through Redis.

The promise: over ANY interval of a limit's length, at most N messages are handed to the
server. Two shapes, chosen by the interval, both decided in one Lua script on Redis's clock
(one clock for all hosts; every limit of a connector checked and taken atomically):

- Pacing (intervals under an hour: `N/s`, `N/min`): GCRA without burst. Sends are spaced at
  least T/N apart (the key holds the next free time), so any interval of T holds at most N.
  A fixed window would allow 2N across its boundary, and so would a token bucket of burst N;
  even spacing also keeps the server's own count (taken at arrival, a few ms later) honest.
- A sliding log (an hour and longer: `N/h`, `N/day`): a sorted set of send times, at most N
  within any T. Bursts are fine here (a day cap must not spread 10,000 messages evenly over
  24 hours), and the log stays small enough (N entries).

Each interval is counted a little long (`GUARD`, 1 %): the server counts arrivals, not our
reservations, and a message reserved at the edge of a window can arrive a few ms into the
next one. The achieved rate is therefore ~99 % of the configured one.

A send asks for the earliest time it may go (`reserve`). Within `max_wait_seconds` the slot
is taken and the message's own coroutine sleeps until then (other messages, of this connector
or others, run meanwhile); beyond it nothing is taken and the message goes back to the queue,
due shortly before its window opens (see `worker/policy.py` `waiting`).

If Redis cannot be reached the message is sent (mail is never held for the limiter's sake);
losing Redis's keys forgets the log: at worst one extra window's worth goes out.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import redis
import redis.asyncio

from outbox import logs
from outbox.connections import REDIS_OPTIONS
from outbox.limits import Rate, parse_rates
from outbox.resolve import Connector
from worker import metrics

log = logs.get("outbox.worker")

GUARD = 0.01  # each interval counted 1 % long (see the module's docstring)
LOG_FROM_SECONDS = 3600  # intervals this long or longer: a sliding log; shorter: pacing
LOG_EVERY_SECONDS = 30.0  # at most one warning this often while Redis cannot be reached

# KEYS: one per limit. ARGV: max_wait_ms, guard, member, then per limit: kind, count, seconds.
# Returns {taken (1/0), wait in ms as a string, the binding limit's index from 1 (0: none)}.
RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local max_wait = tonumber(ARGV[1])
local guard = tonumber(ARGV[2])
local member = ARGV[3]
local at, which = now, 0
for i, key in ipairs(KEYS) do
  local b = 3 + (i - 1) * 3
  local kind, n = ARGV[b + 1], tonumber(ARGV[b + 2])
  local span = tonumber(ARGV[b + 3]) * 1000 * (1 + guard)
  if kind == 'p' then
    local tat = tonumber(redis.call('GET', key) or '0')
    if tat > at then at, which = tat, i end
  else
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - span)
    local card = redis.call('ZCARD', key)
    if card >= n then
      local e = redis.call('ZRANGE', key, card - n, card - n, 'WITHSCORES')
      if tonumber(e[2]) + span > at then at, which = tonumber(e[2]) + span, i end
    end
    if card > 0 then
      local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
      if tonumber(last[2]) > at then at, which = tonumber(last[2]), i end
    end
  end
end
local wait = at - now
if wait > max_wait then return {0, tostring(wait), which} end
for i, key in ipairs(KEYS) do
  local b = 3 + (i - 1) * 3
  local kind, n = ARGV[b + 1], tonumber(ARGV[b + 2])
  local span = tonumber(ARGV[b + 3]) * 1000 * (1 + guard)
  if kind == 'p' then
    redis.call('SET', key, tostring(at + span / n), 'PX', math.ceil(wait + span / n) + 1000)
  else
    redis.call('ZADD', key, at, member)
    redis.call('PEXPIRE', key, math.ceil(wait + span) + 1000)
  end
end
return {1, tostring(wait), which}
"""


@dataclass(frozen=True)
class Slot:
    """The limiter's answer: `taken` (send after `wait_seconds`), or not (the earliest slot is
    `wait_seconds` away: give the message back). `binding` is the limit that decided it."""

    taken: bool
    wait_seconds: float
    binding: Rate | None = None


FREE = Slot(True, 0.0)


class Limiter:
    """One per worker process; keys under `{namespace}:limit:`."""

    def __init__(self, redis_url: str, namespace: str) -> None:
        self.namespace = namespace
        self._client = redis.asyncio.Redis.from_url(redis_url, **REDIS_OPTIONS)
        self._script = self._client.register_script(RESERVE)
        self._warned_at = -LOG_EVERY_SECONDS

    def keys(self, connector: Connector, rates: Sequence[Rate]) -> list[str]:
        # one hash slot per connector (Redis Cluster runs a script only on keys of one slot)
        return [f"{self.namespace}:limit:{{{connector.id}}}:{r.seconds}:{_kind(r)}" for r in rates]

    async def reserve(self, connector: Connector, *, max_wait_seconds: float) -> Slot:
        """The earliest time this connector may take one more message, taken if it is within
        `max_wait_seconds`. A connector without rate limits never asks Redis."""
        rates = parse_rates(connector.rate_limits)
        if not rates:
            return FREE
        args: list[str | int | float] = [max_wait_seconds * 1000, GUARD, uuid.uuid4().hex]
        for r in rates:
            args += [_kind(r), r.count, r.seconds]
        try:
            taken, wait_ms, which = await self._script(keys=self.keys(connector, rates), args=args)
        except (redis.exceptions.RedisError, OSError) as exc:
            self.unreachable(connector, exc)
            return FREE
        wait = max(0.0, float(wait_ms) / 1000)
        return Slot(bool(int(taken)), wait, rates[int(which) - 1] if int(which) else None)

    def unreachable(self, connector: Connector, exc: BaseException) -> None:
        metrics.LIMITER_ERRORS.inc()
        if time.monotonic() - self._warned_at >= LOG_EVERY_SECONDS:
            self._warned_at = time.monotonic()
            log.warning(
                "rate limiter unreachable; sending without it", connector=connector.name, error=str(exc)
            )

    async def aclose(self) -> None:
        await self._client.aclose()


def _kind(rate: Rate) -> str:
    return "l" if rate.seconds >= LOG_FROM_SECONDS else "p"


# Sessions (`--max-connections N`): a counting semaphore on Redis shared by every worker. The
# key is a sorted set of the sessions open now (member: a session's id, score: when its lease
# ends, on Redis's clock). A session takes a seat before it connects and gives it back when it
# closes; its worker renews the lease while it is open, so a killed worker's seats come back
# within SESSION_LEASE_SECONDS. KEYS: the set. ARGV: cap, member, lease in ms.
# Returns {1, 0} when seated, else {0, ms until the earliest lease ends}.
SEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[2])
  redis.call('PEXPIRE', KEYS[1], lease * 2)
  return {1, 0}
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, tonumber(first[2]) - now}
"""
# KEYS: the set. ARGV: lease in ms, then the members still open. Only members still seated
# are renewed (one whose lease ran out has lost its seat; its session closes at its next use).
# Returns the members that lost their seat.
RENEW_SEATS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
local lost = {}
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) > now then
    redis.call('ZADD', KEYS[1], now + lease, ARGV[i])
  else
    table.insert(lost, ARGV[i])
  end
end
redis.call('PEXPIRE', KEYS[1], lease * 2)
return lost
"""
SESSION_LEASE_SECONDS = 15.0  # a killed worker's seats come back this soon
SEAT_POLL_SECONDS = (0.02, 0.25)  # a seat is asked again after this, growing to that


class Seats:
    """`--max-connections N` across all workers: seats for SMTP sessions, on Redis. One per
    worker process (shares the rate limiter's client). If Redis cannot be reached, a session
    opens without a seat (mail is never held for the limiter's sake): each process then keeps
    to N on its own."""

    def __init__(self, limiter: Limiter) -> None:
        self._limiter = limiter
        self._seat = limiter._client.register_script(SEAT)
        self._renew = limiter._client.register_script(RENEW_SEATS)

    def key(self, connector: Connector) -> str:
        return f"{self._limiter.namespace}:limit:{{{connector.id}}}:sessions"

    async def take(self, connector: Connector, cap: int, *, max_wait_seconds: float) -> str | None:
        """A seat for one more session (its id), waiting up to `max_wait_seconds` for one to
        free (asked again at growing intervals, never in a busy loop); None if none freed.
        "" when Redis cannot be reached (open without a seat)."""
        member = uuid.uuid4().hex
        deadline = time.monotonic() + max_wait_seconds
        pause = SEAT_POLL_SECONDS[0]
        while True:
            try:
                seated, _ = await self._seat(
                    keys=[self.key(connector)], args=[cap, member, int(SESSION_LEASE_SECONDS * 1000)]
                )
            except (redis.exceptions.RedisError, OSError) as exc:
                self._limiter.unreachable(connector, exc)
                return ""
            if int(seated):
                return member
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, SEAT_POLL_SECONDS[1])

    async def renew(self, connector: Connector, members: Sequence[str]) -> set[str]:
        """Renew the leases of these open sessions; returns those that had lost their seat."""
        members = [m for m in members if m]
        if not members:
            return set()
        try:
            lost = await self._renew(
                keys=[self.key(connector)], args=[int(SESSION_LEASE_SECONDS * 1000), *members]
            )
        except (redis.exceptions.RedisError, OSError) as exc:
            self._limiter.unreachable(connector, exc)
            return set()
        return {m.decode() if isinstance(m, bytes) else str(m) for m in lost}

    async def give_back(self, connector: Connector, member: str) -> None:
        if not member:
            return
        try:
            await self._limiter._client.zrem(self.key(connector), member)
        except (redis.exceptions.RedisError, OSError) as exc:  # its lease ends it anyway
            self._limiter.unreachable(connector, exc)
