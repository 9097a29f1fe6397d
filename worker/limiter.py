"""Rate limits per connector, shared by every worker process and host through Redis.

The promise: over ANY interval of a limit's length, at most N messages are handed to the
server. Every limit keeps a log on Redis (a sorted set): one entry per admission, or per
grant of credits, each with a weight (messages) and the end of the time in which those
messages may be admitted. Decided in one Lua script on Redis's clock (one clock for all
hosts; every limit of a connector checked and taken atomically), in two modes:

- Credits, while no limit binds (no paced limit's next free time is ahead of now, and the
  connector's limits are large enough to share: at least CREDIT_MIN messages per
  CREDIT_SHARE): k messages usable any time within CREDIT_SECONDS, one weighted entry,
  granted only if the log plus k stays <= N; they take k spacings of the pace. One call then
  serves many messages (k adapts to what the process uses: doubled when a grant was used up,
  halved when not). Workers slower than the limit keep the pace behind, so they keep taking
  credits; faster ones push it ahead, and are paced.
- Paced slots otherwise: one message per call at the earliest time every limit allows. A
  limit under an hour (`N/s`, `N/min`) is also paced, GCRA (sends spaced at least T/N apart:
  the key holds the next free time): a fixed window would allow 2N across its boundary, and
  so would a token bucket of burst N; even spacing also keeps the server's own count (taken
  at arrival, a few ms later) honest. Slots nobody was ready for are lost once older than
  the guard's share of the interval (senders that fell behind catch up that much, no more:
  the log still holds N). An hour and longer (`N/h`, `N/day`) only the log: bursts are fine
  there (a day cap must not spread 10,000 messages evenly over 24 hours).

Why any interval holds at most N: a slot or grant is entered only if the weights of the
entries that end within REACH before its start, plus its own, stay <= N. Take any interval of
REACH and, among the entries whose time overlaps it, the one entered last: every other one
ends after its start minus REACH, so its check counted them all. Entries only ever shrink
afterwards (`settle`), never grow.

Each interval is counted a little long (`GUARD`, 1 %): the server counts arrivals, not our
admissions, and a message admitted at the edge of a window can arrive a few ms into the next
one. A paced slot may be used up to half of it late (its entry lasts that long); REACH is the
interval plus that half, so the pace (T/N plus the guard) fits the log exactly. The achieved
rate is therefore ~99 % of the configured one.

Credits are settled with Redis when they are done: piggybacked on the process's next call for
that connector, or on their own call when some were left unused at the end of their time;
the entry then shrinks to what was used, and when (the next ones get the room back, and
`connector list` counts messages, not unused credits).

A paced send asks for the earliest time it may go (`reserve`). Within `max_wait_seconds` the
slot is taken and the message's own coroutine sleeps until then (other messages, of this
connector or others, run meanwhile); beyond it nothing is taken and the message goes back to
the queue, due shortly before its window opens (see `outbox/core/policy.py` `waiting`).

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
LOG_FROM_SECONDS = 3600  # intervals this long or longer: the log only; shorter: paced too
LOG_EVERY_SECONDS = 30.0  # at most one warning this often while Redis cannot be reached
CREDIT_SECONDS = 0.1  # credits are usable this long after the call that took them
CREDIT_SHARE = 0.01  # one grant is at most this share of each limit's N ...
CREDIT_MIN = 2  # ... and credits are handed out only if that share is at least this many
# OUTBOX_RATE_LIMIT_CREDITS=0: no credits, one call per message (bench/limits.py compares)
CREDITS = os.environ.get("OUTBOX_RATE_LIMIT_CREDITS", "1") != "0"
# A slot this close is taken at once, not slept for (the guard absorbs a send this early).
EARLY_SECONDS = 0.001

# KEYS: three per limit: its log (a sorted set; member `weight|token`, score: when the
# admissions it stands for end, ms on Redis's clock), the log's total weight, the next free
# time (paced limits). ARGV: max_wait_ms, guard, token, credits wanted (0: a paced slot;
# -1: settle only), credit_ms, then the grant to settle ('' if none), its weight, how many of
# it were used, within how many ms of its start; then per limit: kind, count, seconds.
# Returns {taken (1/0), wait in ms as a string, the binding limit's index from 1 (0: none),
# credits granted (0: a paced slot at `wait`)}.
RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local max_wait, guard, token = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local want, credit_ms = tonumber(ARGV[4]), tonumber(ARGV[5])
local old, old_k, used, used_ms = ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local function weight(member) return tonumber(string.match(member, '^(%d+)|')) end

local limits = {}
for i = 1, #KEYS / 3 do
  local b = 9 + (i - 1) * 3
  local ms, n = tonumber(ARGV[b + 3]) * 1000, tonumber(ARGV[b + 2])
  local l = {log = KEYS[3 * i - 2], total = KEYS[3 * i - 1], next = KEYS[3 * i], n = n,
             paced = ARGV[b + 1] == 'p', reach = ms * (1 + guard / 2), late = ms * guard / 2,
             spacing = ms * (1 + guard) / n, lag = ms * guard}
  local w = tonumber(redis.call('GET', l.total) or '-1')
  if old ~= '' then  -- the caller's credits before: shrink their entry to what was used
    local e = redis.call('ZSCORE', l.log, old)
    if e then
      redis.call('ZREM', l.log, old)
      w = w - old_k
      if used > 0 then
        local ends = math.min(tonumber(e), tonumber(e) - credit_ms + used_ms)
        redis.call('ZADD', l.log, ends, used .. string.match(old, '|.*$'))
        w = w + used
      end
    end
  end
  local gone = redis.call('ZRANGEBYSCORE', l.log, '-inf', now - l.reach)
  if #gone > 0 then redis.call('ZREMRANGEBYSCORE', l.log, '-inf', now - l.reach) end
  if w < 0 then  -- the total was lost: count it again
    w = 0
    for _, m in ipairs(redis.call('ZRANGE', l.log, 0, -1)) do w = w + weight(m) end
  else
    for _, m in ipairs(gone) do w = w - weight(m) end
  end
  l.w = w
  l.free = l.paced and tonumber(redis.call('GET', l.next) or '0') or 0
  limits[i] = l
end

-- a paced limit's next free time: slots nobody took are lost only when older than `lag`
-- (the guard's share of the interval), so senders that fell behind catch up a few
local function pace(l, free)
  -- %.3f, not tostring: a ms timestamp in 14 digits keeps only 0.1 ms, which rounded 5.05 ms
  -- spacings (200/s with the guard) to 5.0 and lost the guard at high rates
  redis.call('SET', l.next, string.format('%.3f', free), 'PX', math.max(1, math.ceil(free - now) + 1000))
end

local function save()
  for _, l in ipairs(limits) do
    local last = redis.call('ZRANGE', l.log, -1, -1, 'WITHSCORES')
    if #last == 0 then
      redis.call('DEL', l.total)
    else
      local ttl = math.ceil(tonumber(last[2]) - now + l.reach) + 1000
      redis.call('PEXPIRE', l.log, ttl)
      redis.call('SET', l.total, l.w, 'PX', ttl)
    end
  end
end

-- the earliest time from s at which this limit's log leaves room for k more: entries are
-- walked oldest first until those ending after (time - reach) weigh <= n - k
local function earliest(l, s, k)
  if l.w + k <= l.n then return s end
  local removed, i = 0, 0
  while true do
    local page = redis.call('ZRANGE', l.log, i, i + 63, 'WITHSCORES')
    if #page == 0 then return s end
    for j = 1, #page, 2 do
      local e = tonumber(page[j + 1])
      if e > s - l.reach then
        if l.w - removed + k <= l.n then return s end
        s = e + l.reach
      end
      removed = removed + weight(page[j])
    end
    i = i + 64
  end
end

if want < 0 then save() return {1, '0', 0, 0} end
-- credits while no limit binds: the pace is behind (no one is being paced) and the log has
-- room for all of them; they take their share of the pace (k spacings)
if want > 0 then
  local far = true
  for _, l in ipairs(limits) do
    if l.w + want > l.n or l.free > now then far = false end
  end
  if far then
    for _, l in ipairs(limits) do
      redis.call('ZADD', l.log, now + credit_ms, want .. '|' .. token)
      l.w = l.w + want
      if l.paced then pace(l, math.max(l.free, now - l.lag) + want * l.spacing) end
    end
    save()
    return {1, '0', 0, want}
  end
end
local at, which = now, 0
for i, l in ipairs(limits) do
  if l.free > at then at, which = l.free, i end
end
local s = at
for i, l in ipairs(limits) do
  local e = earliest(l, at, 1)
  if e > s then s, which = e, i end
end
local wait = s - now
if wait > max_wait then save() return {0, tostring(wait), which, 0} end
for _, l in ipairs(limits) do
  redis.call('ZADD', l.log, s + l.late, '1|' .. token)
  l.w = l.w + 1
  if l.paced then pace(l, math.max(l.free, s - l.lag) + l.spacing) end
end
save()
return {1, tostring(wait), which, 0}
"""

# `connector list`'s usage: messages within the last interval of each limit (the weights of
# its log's entries that end within it, those reserved moments ahead and credits not yet
# settled included), and sessions open. KEYS: each limit's log, then the sessions' set. ARGV:
# per limit: seconds. Returns the counts as strings, the sessions' last.
USAGE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local out = {}
for i = 1, #KEYS - 1 do
  local used = 0
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[i], '(' .. (now - tonumber(ARGV[i]) * 1000), '+inf')) do
    used = used + tonumber(string.match(m, '^(%d+)|'))
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
class _Credits:
    """A connector's credits in this process: the last grant, until it is settled with Redis."""

    rates: tuple[Rate, ...]
    want: int = 1  # credits to ask for next
    member: str = ""  # the grant's log entry ("" when settled)
    keys: list[str] = field(default_factory=list)  # the logs it was entered in
    granted: int = 0
    used: int = 0
    sent_at: float = 0.0  # time.monotonic() when its call was sent (before Redis's start)
    last_use: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def most(self) -> int:
        """The largest grant (0: no credits for these limits)."""
        most = min((math.floor(r.count * CREDIT_SHARE) for r in self.rates), default=0)
        return most if CREDITS and most >= CREDIT_MIN else 0

    def take(self, now: float) -> bool:
        """One credit of the grant held, if it has one left and its time is not over."""
        if self.member and self.used < self.granted and now <= self.sent_at + CREDIT_SECONDS:
            self.used += 1
            self.last_use = now
            return True
        return False

    def granted_now(self, member: str, k: int, keys: list[str], sent_at: float) -> None:
        """A grant of k credits, the first used at once."""
        self.member, self.granted, self.keys, self.sent_at = member, k, keys, sent_at
        self.used, self.last_use = 1, time.monotonic()

    def settle(self) -> list[str | int]:
        """The grant held, as RESERVE's settle arguments, and forget it (no credit of it is used
        after this); the next grant doubles after one used up, halves after one that was not."""
        if not self.member:
            return ["", 0, 0, 0]
        used_ms = f"{(self.last_use - self.sent_at) * 1000 + 0.001:.3f}"
        args: list[str | int] = [self.member, self.granted, self.used, used_ms]
        full = self.used >= self.granted
        self.want = min(self.most, self.want * 2) if full else max(1, self.want // 2)
        self.member = ""
        return args


class Limiter:
    """One per worker process; keys under `{namespace}:limit:`."""

    def __init__(self, redis_url: str, namespace: str) -> None:
        self.namespace = namespace
        self._client = redis.asyncio.Redis.from_url(redis_url, **REDIS_OPTIONS)
        self._script = self._client.register_script(RESERVE)
        self._warned_at = -LOG_EVERY_SECONDS
        self._credits: dict[int, _Credits] = {}
        self._expiring: set[asyncio.Task[None]] = set()
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
        `max_wait_seconds`: a credit held in this process, or a call to Redis. A connector
        without rate limits (nor a slow-down) never asks Redis."""
        rates = _rates(connector.rate_limits)
        slowed = self.slowed(connector)
        if not rates and slowed is None:
            return FREE
        held = self._credits.get(connector.id)
        if held is None or held.rates != rates:  # a grant for other limits settles on its own
            held = self._credits[connector.id] = _Credits(rates)
        # credits were taken at the faster pace: a slow-down settles them at the next call
        if slowed is None and held.take(time.monotonic()):
            return FREE  # (no await since the check: no other coroutine ran meanwhile)
        async with held.lock:  # one call at a time per connector: the others use its credits
            if slowed is None and held.take(time.monotonic()):
                return FREE  # credits granted while this one waited for the lock
            return await self._ask(connector, held, max_wait_seconds, slowed)

    async def _ask(
        self, connector: Connector, held: _Credits, max_wait_seconds: float, slowed: float | None
    ) -> Slot:
        rates = held.rates
        settle = held.settle()  # first: it sets how many credits to ask for
        want = held.want if slowed is None and held.most else 0
        keys = self.keys(connector, rates)
        token = uuid.uuid4().hex[:16]
        args = [
            max_wait_seconds * 1000,
            GUARD,
            token,
            want,
            CREDIT_SECONDS * 1000,
            *settle,
            *_limit_args(rates),
        ]
        if slowed is not None:  # one more paced limit: one message per `slowed` seconds
            args += ["p", 1, slowed]
            keys += _limit_keys(_key(self.namespace, connector, "slow"))
        sent_at = time.monotonic()
        try:
            taken, wait_ms, which, k = await self._script(keys=keys, args=args)
        except (redis.exceptions.RedisError, OSError) as exc:
            self.unreachable(connector, exc)
            return FREE
        if int(k):
            held.granted_now(f"{int(k)}|{token}", int(k), keys, sent_at)
            self._expire_later(connector, held)
            return FREE
        wait = _wait(float(wait_ms) / 1000)
        which = int(which)
        binding = rates[which - 1] if 0 < which <= len(rates) else None
        slow = slowed if which > len(rates) else None
        return Slot(bool(int(taken)), wait, binding, slow)

    def _expire_later(self, connector: Connector, held: _Credits) -> None:
        """When the grant's time is over, settle it if some of it was left unused and no later
        call has settled it meanwhile."""
        task = asyncio.get_running_loop().create_task(self._expire(connector, held, held.member))
        self._expiring.add(task)
        task.add_done_callback(self._expiring.discard)

    async def _expire(self, connector: Connector, held: _Credits, member: str) -> None:
        await asyncio.sleep(CREDIT_SECONDS)
        async with held.lock:
            if held.member != member or held.used >= held.granted:
                return
            args = [0, GUARD, "", -1, CREDIT_SECONDS * 1000, *held.settle(), *_limit_args(held.rates)]
            try:
                await self._script(keys=held.keys, args=args)
            except (redis.exceptions.RedisError, OSError) as exc:  # the entry ages out anyway
                self.unreachable(connector, exc)

    def unreachable(self, connector: Connector, exc: BaseException) -> None:
        metrics.LIMITER_ERRORS.inc()
        if time.monotonic() - self._warned_at >= LOG_EVERY_SECONDS:
            self._warned_at = time.monotonic()
            log.warning(
                "rate limiter unreachable; sending without it", connector=connector.name, error=str(exc)
            )

    async def aclose(self) -> None:
        for task in list(self._expiring):
            task.cancel()
        await self._client.aclose()


def _limit_keys(base: str) -> list[str]:
    """RESERVE's three keys of one limit: its log, the log's total weight, its next free time."""
    return [f"{base}:log", f"{base}:w", f"{base}:next"]


def _key(namespace: str, connector: Connector, name: str | int) -> str:
    # one hash slot per connector (Redis Cluster runs a script only on keys of one slot)
    return f"{namespace}:limit:{{{connector.id}}}:{name}"


def rate_keys(namespace: str, connector: Connector, rates: Sequence[Rate]) -> list[str]:
    return [k for r in rates for k in _limit_keys(_key(namespace, connector, r.seconds))]


def sessions_key(namespace: str, connector: Connector) -> str:
    return _key(namespace, connector, "sessions")


def _wait(seconds: float) -> float:
    return 0.0 if seconds <= EARLY_SECONDS else seconds


@functools.lru_cache(maxsize=1024)
def _rates(texts: tuple[str, ...]) -> tuple[Rate, ...]:
    """parse_rates, once per set of limits (asked for every message)."""
    return parse_rates(texts)


def _limit_args(rates: Sequence[Rate]) -> list[str | int]:
    """RESERVE's arguments of each limit: kind, count, seconds."""
    return [a for r in rates for a in (_kind(r), r.count, r.seconds)]


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
            log_keys = [_limit_keys(_key(namespace, c, r.seconds))[0] for r in rates]
            keys = [*log_keys, sessions_key(namespace, c)]
            args = [r.seconds for r in rates]
            counts = [round(float(x)) for x in script(keys=keys, args=args)]
            out[c.id] = Usage(tuple(zip(rates, counts[:-1], strict=True)), counts[-1])
        return out
    except (redis.exceptions.RedisError, OSError):
        return None
    finally:
        client.close()
