"""The completer: outcomes written soon after they arrive, many per write, none forgotten."""

from __future__ import annotations

import asyncio

from worker.completer import Completer


class FakeWriter:
    """Records each write; `refuse` ids are reported as not written (lease lost)."""

    def __init__(self, refuse: set[int] | None = None, fail_first: bool = False) -> None:
        self.writes: list[list[int]] = []
        self.refuse = refuse or set()
        self.fail_first = fail_first
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, outcomes):
        await self.gate.wait()
        ids = [o["id"] for o in outcomes]
        self.writes.append(ids)
        if self.fail_first and len(self.writes) == 1:
            raise RuntimeError("database away")
        return {i for i in ids if i not in self.refuse}


def test_a_lone_outcome_is_written_at_once_and_a_busy_stream_lingers_to_share_writes():
    async def main():
        writer = FakeWriter(refuse={3})
        completer = Completer(writer, linger=0.05)
        assert await completer.submit({"id": 0})  # light load: no linger to wait for
        writer.gate.clear()
        blocked = completer.submit({"id": -1})  # these two go in one write: busy from now on
        futures = [completer.submit({"id": -2})]
        await asyncio.sleep(0.01)
        writer.gate.set()
        await asyncio.gather(blocked, *futures)
        futures = [completer.submit({"id": i}) for i in range(1, 6)]
        results = await asyncio.gather(*futures)
        await completer.aclose()
        return writer.writes, results

    writes, results = asyncio.run(main())
    assert writes == [[0], [-1, -2], [1, 2, 3, 4, 5]]
    assert results == [True, True, False, True, True]


def test_what_arrives_during_a_write_goes_into_the_next_one_at_once():
    async def main():
        writer = FakeWriter()
        completer = Completer(writer, linger=0.001)
        first = completer.submit({"id": 1})
        await asyncio.sleep(0.01)  # the first write is under way ...
        writer.gate.clear()
        await asyncio.sleep(0.01)
        later = [completer.submit({"id": i}) for i in (2, 3)]  # ... these wait for it
        writer.gate.set()
        await asyncio.gather(first, *later)
        await completer.aclose()
        return writer.writes

    assert asyncio.run(main()) == [[1], [2, 3]]


def test_a_full_batch_is_written_without_waiting_for_the_linger():
    async def main():
        writer = FakeWriter()
        completer = Completer(writer, linger=3600, max_per_write=3)
        futures = [completer.submit({"id": i}) for i in range(7)]
        done, _ = await asyncio.wait(futures[:6], timeout=5)
        await completer.aclose()  # the seventh goes out at close, not after an hour
        return writer.writes, len(done), futures[6].result()

    writes, done, last = asyncio.run(main())
    assert writes == [[0, 1, 2], [3, 4, 5], [6]] and done == 6 and last is True


def test_a_write_that_fails_reports_its_outcomes_unwritten_and_the_next_ones_still_go():
    async def main():
        writer = FakeWriter(fail_first=True)
        completer = Completer(writer, linger=0.001)
        first = await completer.submit({"id": 1})
        second = await completer.submit({"id": 2})
        await completer.aclose()
        return first, second

    assert asyncio.run(main()) == (False, True)
