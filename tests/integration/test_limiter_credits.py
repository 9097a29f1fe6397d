"""The rate limiter's credits (issue 18): while a limit is far from binding, one Redis round
trip hands a process credits for many messages; still at most N over any interval of a
limit's length, for limiters in two worker processes sharing one Redis, credits and paced
slots mixed."""

from __future__ import annotations

import asyncio
import multiprocessing
import time

from outbox.core.resolve import Connector
from tests.conftest import REDIS_URL
from tests.integration.test_transport import connector_for
from tests.windows import most_in_any_window
from worker import limiter as limiter_module
from worker.limiter import CREDIT_SECONDS, Limiter, usage


def connector(*rates: str) -> Connector:
    return connector_for(25, id=7, rate_limits=rates)


class Counting:
    """Counts the limiter's script calls (Redis round trips)."""

    def __init__(self, limiter: Limiter) -> None:
        self.calls, self._script = 0, limiter._script
        limiter._script = self  # type: ignore[assignment]

    async def __call__(self, **kw):
        self.calls += 1
        return await self._script(**kw)


async def sends(
    limiter: Limiter, c: Connector, n: int, times: list[float], workers: int = 4, send: float = 0.0
) -> None:
    """`workers` coroutines (sessions) each admitted by the limiter, then 'sending' for `send`
    seconds (other sessions run meanwhile)."""
    left = [n]

    async def session() -> None:
        while left[0] > 0:
            left[0] -= 1
            slot = await limiter.reserve(c, max_wait_seconds=2.0)
            assert slot.taken
            if slot.wait_seconds > 0:
                await asyncio.sleep(slot.wait_seconds)
            times.append(time.monotonic())
            await asyncio.sleep(send)

    await asyncio.gather(*(session() for _ in range(workers)))


def test_a_limit_that_does_not_bind_costs_a_round_trip_per_many_messages(redis_namespace):
    async def run() -> int:
        limiter = Limiter(REDIS_URL, redis_namespace)
        counting = Counting(limiter)
        try:
            await sends(limiter, connector("1000000/s"), 2000, [])
        finally:
            await limiter.aclose()
        return counting.calls

    calls = asyncio.run(run())
    assert calls <= 2000 / 50, calls  # grants double while used up


def test_two_limiters_hold_200_per_second_in_every_sliding_second(redis_namespace):
    c = connector("200/s")

    async def run() -> list[float]:
        times: list[float] = []
        a, b = Limiter(REDIS_URL, redis_namespace), Limiter(REDIS_URL, redis_namespace)
        try:
            await asyncio.gather(sends(a, c, 300, times), sends(b, c, 300, times))
        finally:
            await a.aclose()
            await b.aclose()
        return times

    times = asyncio.run(run())
    assert len(times) == 600
    # when each coroutine woke for its slot (no SMTP between): a loaded machine wakes some
    # late, which can bunch them by that much; 0.1 s allowed for it (two limiters that did
    # not share the limit would put 400 in a second)
    assert most_in_any_window(times, 0.9) <= 200
    span = max(times) - min(times)
    assert span >= 599 / 200 * (1 + limiter_module.GUARD) - 0.2  # credits take the pace too


def test_credits_nobody_used_in_time_are_given_back_not_used_late(redis_namespace):
    c = connector("1000/h")  # credits of up to 10

    async def run() -> None:
        limiter = Limiter(REDIS_URL, redis_namespace)
        counting = Counting(limiter)
        try:
            for _ in range(2):  # grants of 1 then 2: one credit left
                assert (await limiter.reserve(c, max_wait_seconds=2.0)).taken
            assert counting.calls == 2
            await asyncio.sleep(CREDIT_SECONDS * 3)  # its time is over: settled on its own
            assert counting.calls == 3
            [used] = usage(REDIS_URL, redis_namespace, [c])[c.id].rates
            assert used[1] == 2, used  # messages, not the credit left unused
            assert (await limiter.reserve(c, max_wait_seconds=2.0)).taken
            assert counting.calls == 4, "a credit was used after its time"
        finally:
            await limiter.aclose()

    asyncio.run(run())


def _process(
    namespace: str, start: float, n: int, sessions: int, send: float, out: multiprocessing.Queue
) -> None:
    """One worker process's limiter: `n` admissions from `start` (monotonic), for `sessions`
    sessions each 'sending' for `send` seconds."""

    async def run() -> tuple[list[float], int]:
        limiter = Limiter(REDIS_URL, namespace)
        counting = Counting(limiter)
        times: list[float] = []
        try:
            await asyncio.sleep(max(0.0, start - time.monotonic()))
            await sends(limiter, connector("1000/s"), n, times, workers=sessions, send=send)
        finally:
            await limiter.aclose()
        return times, counting.calls

    out.put(asyncio.run(run()))


def test_credits_and_paced_slots_of_two_processes_hold_n_in_every_sliding_second(redis_namespace):
    """1000/s: one process alone sends ~500/s (credits: the limit does not bind), the other
    joins a second later as fast as it can (the limit binds: paced slots, for both). Credits and
    slots enter one log and one pace, so no second holds more than 1000, whichever process took
    what; credits that counted against neither would let ~1500 through."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start = time.monotonic() + 1.5  # both past their imports
    procs = [
        ctx.Process(target=_process, args=(redis_namespace, start, 1500, 2, 0.004, out)),
        ctx.Process(target=_process, args=(redis_namespace, start + 1.0, 1500, 6, 0.0, out)),
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=10)
    times = sorted(t for ts, _ in results for t in ts)
    calls = sum(c for _, c in results)
    assert len(times) == 3000
    assert calls < 3000 - 300, f"{calls} calls: hardly any credits, the test tests little"
    # admission times as each session saw them: paced ones wake late by up to 20 ms under load
    assert most_in_any_window(times, 0.98) <= 1000, most_in_any_window(times, 0.98)
    assert max(times) - min(times) >= 2999 / 1000 - 0.2


def test_two_limiters_take_no_more_than_an_hourly_limit_allows(redis_namespace):
    """An hourly limit is a sliding log only (no pace): credits and single slots of two
    limiters together take exactly N, and the rest are told to wait about an hour."""
    c = connector("300/h")  # credits of up to 3

    async def run() -> tuple[int, list[float]]:
        a, b = Limiter(REDIS_URL, redis_namespace), Limiter(REDIS_URL, redis_namespace)
        taken, refused = [0], []

        async def session(limiter: Limiter) -> None:
            for _ in range(100):
                slot = await limiter.reserve(c, max_wait_seconds=2.0)
                if slot.taken:
                    taken[0] += 1
                else:
                    refused.append(slot.wait_seconds)

        try:
            await asyncio.gather(*(session(x) for x in (a, b) for _ in range(2)))
        finally:
            await a.aclose()
            await b.aclose()
        return taken[0], refused

    taken, refused = asyncio.run(run())
    assert taken == 300 and len(refused) == 100
    assert all(3500 < w < 3700 for w in refused), (min(refused), max(refused))
