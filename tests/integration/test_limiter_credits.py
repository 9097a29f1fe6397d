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


async def sends(limiter: Limiter, c: Connector, n: int, times: list[float], workers: int = 4) -> None:
    """`workers` coroutines (sessions) each admitted by the limiter and 'sending' at their time."""
    left = [n]

    async def session() -> None:
        while left[0] > 0:
            left[0] -= 1
            slot = await limiter.reserve(c, max_wait_seconds=2.0)
            assert slot.taken
            if slot.wait_seconds > 0:
                await asyncio.sleep(slot.wait_seconds)
            times.append(time.monotonic())
            await asyncio.sleep(0)  # the send: other sessions run meanwhile

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
    # credits take the first 100 at once (under N/2), the 500 others are paced
    assert span >= 499 / 200 * (1 + limiter_module.GUARD) - 0.2


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


def _process(namespace: str, rate: str, n: int, start: float, out: multiprocessing.Queue) -> None:
    """One worker process's limiter: `n` admissions by 6 sessions, from `start` (monotonic)."""

    async def run() -> tuple[list[float], int]:
        limiter = Limiter(REDIS_URL, namespace)
        counting = Counting(limiter)
        times: list[float] = []
        try:
            await asyncio.sleep(max(0.0, start - time.monotonic()))
            await sends(limiter, connector(rate), n, times, workers=6)
        finally:
            await limiter.aclose()
        return times, counting.calls

    out.put(asyncio.run(run()))


def test_credits_and_paced_slots_of_two_processes_hold_n_in_every_sliding_second(redis_namespace):
    """Each process starts under N/2 (credits), then the limit binds (paced slots): both modes
    enter one log, so no second holds more than N, whichever process took what. Credits that
    did not count against paced slots, or the other way round, would put ~N/2 more in the
    first second."""
    rate, n = 400, 900  # credits of up to 4 while under 200 in the last second
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start = time.monotonic() + 1.5  # both past their imports
    procs = [
        ctx.Process(target=_process, args=(redis_namespace, f"{rate}/s", n, start, out)) for _ in range(2)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=10)
    times = sorted(t for ts, _ in results for t in ts)
    calls = sum(c for _, c in results)
    assert len(times) == 2 * n
    assert calls < 2 * n - rate / 4, "no credits were handed out: the test tests nothing"
    # admission times as each session saw them (paced ones woke late by up to 50 ms under load)
    assert most_in_any_window(times, 0.95) <= rate, most_in_any_window(times, 0.95)
    assert max(times) - min(times) >= (2 * n - rate) / rate - 0.2
