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

Batches: one script call may take several paced slots at once (`k`, evenly spaced, held in
the process for the next messages of that connector), so a limit that does not bind costs a
Redis round trip per batch, not per message. A slot is used at its time or, if no message
took it within TOLERANCE of it, dropped (never used late: a late send could crowd the next
interval); unused slots only lower the rate. The batch grows (doubling, at most
LOOKAHEAD_SECONDS of slots and BATCH_MAX) while every slot is used, and halves when some were
dropped. Only connectors whose limits are all paced batch (a sliding log takes one at a time).

A send asks for the earliest time it may go (`reserve`). Within `max_wait_seconds` the slot
is taken and the message's own coroutine sleeps until then (other messages, of this connector
or others, run meanwhile); beyond it nothing is taken and the message goes back to the queue,
due shortly before its window opens (see `outbox/core/policy.py` `waiting`).

If Redis cannot be reached the message is sent (mail is never held for the limiter's sake);
losing Redis's keys forgets the log: at worst one extra window's worth goes out.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import redis
import redis.asyncio

from outbox import logs
from outbox.connections import REDIS_OPTIONS
from outbox.core.limits import Rate, parse_rates, per_second, slowdown
from outbox.core.resolve import Connector
from worker import metrics

log = logs.get("outbox.worker")

GUARD = 0.01  # each interval counted 1 % long (see the module's docstring)
LOG_FROM_SECONDS = 3600  # intervals this long or longer: a sliding log; shorter: pacing
LOG_EVERY_SECONDS = 30.0  # at most one warning this often while Redis cannot be reached
# Slots taken per script call, at most (1: a round trip per message, as before batching);
# OUTBOX_RATE_LIMIT_BATCH overrides it (bench/limits.py compares the two).
BATCH_MAX = max(1, int(os.environ.get("OUTBOX_RATE_LIMIT_BATCH", "64")))
LOOKAHEAD_SECONDS = 0.05  # a batch reaches at most this far ahead of now
TOLERANCE = GUARD / 2  # a slot not taken within this share of the interval's length is dropped
# A slot this close is taken at once, not slept for (the guard absorbs a send this early).
EARLY_SECONDS = 0.001

# KEYS: one per limit. ARGV: max_wait_ms, guard, member, slots wanted, then per limit: kind,
# count, seconds. Returns {taken (1/0), wait in ms as a string, the binding limit's index from
# 1 (0: none), slots taken, their spacing in ms as a string}: slot j (from 0) is at
# wait + j * spacing. Several slots only when every limit is paced and none binds now.
RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local max_wait = tonumber(ARGV[1])
local guard = tonumber(ARGV[2])
local member = ARGV[3]
local k = tonumber(ARGV[4])
local at, which = now, 0
for i, key in ipairs(KEYS) do
  local b = 4 + (i - 1) * 3
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
if wait > max_wait then return {0, tostring(wait), which, 0, '0'} end
local spacing = 0
for i, key in ipairs(KEYS) do
  local b = 4 + (i - 1) * 3
  local kind, n = ARGV[b + 1], tonumber(ARGV[b + 2])
  local span = tonumber(ARGV[b + 3]) * 1000 * (1 + guard)
  if kind == 'p' then spacing = math.max(spacing, span / n) else k = 1 end
end
if which > 0 then k = 1 end  -- a limit binds now: one at a time, exactly as paced
if k > 1 then k = math.max(1, math.min(k, math.floor((max_wait - wait) / spacing) + 1)) end
local last = at + (k - 1) * spacing
for i, key in ipairs(KEYS) do
  local b = 4 + (i - 1) * 3
  local kind, n = ARGV[b + 1], tonumber(ARGV[b + 2])
  local span = tonumber(ARGV[b + 3]) * 1000 * (1 + guard)
  if kind == 'p' then
    -- %.3f, not tostring: a ms timestamp in 14 digits keeps only 0.1 ms, which rounded 5.05 ms
    -- spacings (200/s with the guard) to 5.0 and lost the guard at high rates
    local tat = last + span / n
    redis.call('SET', key, string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1000)
    -- usage, for `connector list`: slots taken per tenth of the interval (see USAGE)
    local width = tonumber(ARGV[b + 3]) * 100
    local bucket = key .. ':u:' .. math.floor(at / width)
    redis.call('INCRBY', bucket, k)
    redis.call('PEXPIRE', bucket, math.ceil(width * 12))
  else
    redis.call('ZADD', key, at, member)
    redis.call('PEXPIRE', key, math.ceil(wait + span) + 1000)
  end
end
return {1, tostring(wait), which, k, tostring(spacing)}
"""

# `connector list`'s usage: slots taken within the last interval of each limit, and sessions
# open. KEYS: one per limit (as RESERVE), then the sessions' set. ARGV: per limit: kind,
# seconds. Paced limits count slots per tenth of the interval (RESERVE's `:u:` buckets): the
# last ten tenths, the oldest weighted by how much of it is still inside the interval. A
# sliding log counts its entries (those reserved moments ahead included). Returns the counts
# as strings, the sessions' last.
USAGE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local out = {}
for i = 1, #KEYS - 1 do
  local kind, seconds = ARGV[2 * i - 1], tonumber(ARGV[2 * i])
  local used = 0
  if kind == 'p' then
    local width = seconds * 100
    local cb = math.floor(now / width)
    for b = cb - 9, cb do
      used = used + tonumber(redis.call('GET', KEYS[i] .. ':u:' .. b) or '0')
    end
    local oldest = tonumber(redis.call('GET', KEYS[i] .. ':u:' .. (cb - 10)) or '0')
    used = used + oldest * ((cb + 1) * width - now) / width
  else
    used = redis.call('ZCOUNT', KEYS[i], '(' .. (now - seconds * 1000), '+inf')
  end
  table.insert(out, tostring(used))
end
table.insert(out, tostring(redis.call('ZCOUNT', KEYS[#KEYS], '(' .. math.floor(now), '+inf')))
return out
"""
USAGE_TIMEOUT_SECONDS = 2.0  # `connector list` shows `?` rather than wait longer for Redis


@dataclass(frozen=True)
class Slot:
    """The limiter's answer: `taken` (send after `wait_seconds`), or not (the earliest slot is
    `wait_seconds` away: give the message back). `binding` is the limit that decided it."""

    taken: bool
    wait_seconds: float
    binding: Rate | None = None
    slowed: float | None = None  # the binding limit was a throttling slow-down to this spacing

    @property
    def waits_for(self) -> str:
        """What the message waits for, for its row: `rate limit 30/min`."""
        if self.slowed is not None:
            return f"slow-down to {per_second(self.slowed)} after throttling"
        return f"rate limit {self.binding}"


FREE = Slot(True, 0.0)


@dataclass
class _Reserved:
    """A connector's slots taken in this process and not used yet (local monotonic times)."""

    rates: tuple[Rate, ...]
    slots: deque[float] = field(default_factory=deque)
    binding: Rate | None = None
    batch: int = 1
    dropped: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def tolerance(self) -> float:
        return min(r.seconds for r in self.rates) * TOLERANCE

    @property
    def most(self) -> int:
        """The largest batch: LOOKAHEAD_SECONDS of slots; 1 with a sliding log."""
        if any(_kind(r) == "l" for r in self.rates):
            return 1
        spacing = max(r.seconds * (1 + GUARD) / r.count for r in self.rates)
        return max(1, min(BATCH_MAX, math.floor(LOOKAHEAD_SECONDS / spacing)))

    def take(self, now: float) -> Slot | None:
        """The next slot held here, if one is not stale."""
        while self.slots and self.slots[0] < now - self.tolerance:
            self.slots.popleft()
            self.dropped = True
        if not self.slots:
            return None
        return Slot(True, _wait(self.slots.popleft() - now), self.binding)

    def wanted(self) -> int:
        """Slots to ask for now: twice as many as last time when all were used, half when
        some were dropped."""
        self.batch = max(1, self.batch // 2) if self.dropped else min(self.most, self.batch * 2)
        self.dropped = False
        return min(self.batch, self.most)


class Limiter:
    """One per worker process; keys under `{namespace}:limit:`."""

    def __init__(self, redis_url: str, namespace: str) -> None:
        self.namespace = namespace
        self._client = redis.asyncio.Redis.from_url(redis_url, **REDIS_OPTIONS)
        self._script = self._client.register_script(RESERVE)
        self._warned_at = -LOG_EVERY_SECONDS
        self._reserved: dict[int, _Reserved] = {}
        # slow-downs recorded by this process: (spacing, when, time.monotonic() when recorded)
        self._slowed: dict[int, tuple[float, datetime, float]] = {}

    def keys(self, connector: Connector, rates: Sequence[Rate]) -> list[str]:
        return rate_keys(self.namespace, connector, rates)

    def slowed(self, connector: Connector) -> float | None:
        """The spacing a throttling slow-down imposes on this connector now, or None: as read
        from Postgres (any worker's), or as this process recorded it since its last read."""
        here = self._slowed.get(connector.id)
        if connector.throttled_at is None and here is None:
            return None
        rates, now = _rates(connector.rate_limits), datetime.now(UTC)
        read = slowdown(connector.throttle_interval_seconds, connector.throttled_at, rates, now)
        mine = slowdown(here[0], here[1], rates, now) if here else None
        return max((s for s in (read, mine) if s is not None), default=None)

    def slowed_here(self, connector: Connector, interval: float) -> None:
        """This process just slowed the connector down (before its next read of Postgres)."""
        self._slowed[connector.id] = (interval, datetime.now(UTC), time.monotonic())

    def reloaded(self, started: float) -> None:
        """The connectors were read from Postgres by a read begun at `started`
        (time.monotonic()): slow-downs this process recorded before it are in what was read,
        or were ended there since by an operator (`connector reset`, a change of limits)."""
        for cid in [cid for cid, (_, _, at) in self._slowed.items() if at < started]:
            del self._slowed[cid]

    async def reserve(self, connector: Connector, *, max_wait_seconds: float) -> Slot:
        """The earliest time this connector may take one more message, taken if it is within
        `max_wait_seconds`: a slot held in this process, or a new batch from Redis. A
        connector without rate limits (nor a slow-down) never asks Redis."""
        rates = _rates(connector.rate_limits)
        slowed = self.slowed(connector)
        if not rates and slowed is None:
            return FREE
        held = self._reserved.get(connector.id)
        if held is None or held.rates != rates:
            held = self._reserved[connector.id] = _Reserved(rates)
        async with held.lock:  # one call at a time per connector: the others take its slots
            if slowed is not None:  # slots held were taken at the faster pace
                held.slots.clear()
            else:
                slot = held.take(time.monotonic())
                if slot is not None:
                    return slot
            return await self._ask(connector, held, max_wait_seconds, slowed)

    async def _ask(
        self, connector: Connector, held: _Reserved, max_wait_seconds: float, slowed: float | None
    ) -> Slot:
        rates = held.rates
        want = held.wanted() if slowed is None else 1
        args: list[str | int | float] = [max_wait_seconds * 1000, GUARD, uuid.uuid4().hex, want]
        keys = self.keys(connector, rates)
        for r in rates:
            args += [_kind(r), r.count, r.seconds]
        if slowed is not None:  # one more paced limit: one message per `slowed` seconds
            args += ["p", 1, slowed]
            keys.append(f"{self.namespace}:limit:{{{connector.id}}}:slow:p")
        try:
            taken, wait_ms, which, k, spacing_ms = await self._script(keys=keys, args=args)
        except (redis.exceptions.RedisError, OSError) as exc:
            self.unreachable(connector, exc)
            return FREE
        now = time.monotonic()
        wait = _wait(float(wait_ms) / 1000)
        which = int(which)
        binding = rates[which - 1] if 0 < which <= len(rates) else None
        slow = slowed if which > len(rates) else None
        if not int(taken):
            return Slot(False, wait, binding, slow)
        spacing = float(spacing_ms) / 1000
        held.binding = binding
        held.slots.extend(now + wait + j * spacing for j in range(1, int(k)))
        return Slot(True, wait, binding, slow)

    def unreachable(self, connector: Connector, exc: BaseException) -> None:
        metrics.LIMITER_ERRORS.inc()
        if time.monotonic() - self._warned_at >= LOG_EVERY_SECONDS:
            self._warned_at = time.monotonic()
            log.warning(
                "rate limiter unreachable; sending without it", connector=connector.name, error=str(exc)
            )

    async def aclose(self) -> None:
        await self._client.aclose()


def rate_keys(namespace: str, connector: Connector, rates: Sequence[Rate]) -> list[str]:
    # one hash slot per connector (Redis Cluster runs a script only on keys of one slot)
    return [f"{namespace}:limit:{{{connector.id}}}:{r.seconds}:{_kind(r)}" for r in rates]


def sessions_key(namespace: str, connector: Connector) -> str:
    return f"{namespace}:limit:{{{connector.id}}}:sessions"


def _wait(seconds: float) -> float:
    return 0.0 if seconds <= EARLY_SECONDS else seconds


@functools.lru_cache(maxsize=1024)
def _rates(texts: tuple[str, ...]) -> tuple[Rate, ...]:
    """parse_rates, once per set of limits (asked for every message)."""
    return parse_rates(texts)


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
        return sessions_key(self._limiter.namespace, connector)

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


@dataclass(frozen=True)
class Usage:
    """A connector's use of its limits now: slots taken within each rate limit's last interval
    (in the order of `parse_rates`), and SMTP sessions holding a `--max-connections` seat."""

    rates: tuple[tuple[Rate, int], ...]
    sessions: int


def usage(redis_url: str, namespace: str, connectors: Sequence[Connector]) -> dict[int, Usage] | None:
    """Each connector's usage as the workers' limiter sees it on Redis (one script call per
    connector), or None when Redis cannot be reached (`connector list` shows `?`)."""
    options = REDIS_OPTIONS | {
        "socket_timeout": USAGE_TIMEOUT_SECONDS,
        "socket_connect_timeout": USAGE_TIMEOUT_SECONDS,
        "retry_on_timeout": False,
    }
    client = redis.Redis.from_url(redis_url, **options)
    try:
        script = client.register_script(USAGE)
        out: dict[int, Usage] = {}
        for c in connectors:
            rates = _rates(c.rate_limits)
            keys = [*rate_keys(namespace, c, rates), sessions_key(namespace, c)]
            args: list[str | int] = []
            for r in rates:
                args += [_kind(r), r.seconds]
            counts = [round(float(x)) for x in script(keys=keys, args=args)]
            out[c.id] = Usage(tuple(zip(rates, counts[:-1], strict=True)), counts[-1])
        return out
    except (redis.exceptions.RedisError, OSError):
        return None
    finally:
        client.close()
