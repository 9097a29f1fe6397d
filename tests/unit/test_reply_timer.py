"""worker.transport.ReplyTimer: each reply's time limit, moved before each command."""

from __future__ import annotations

import asyncio

import aiosmtplib
import pytest

from worker.transport import ReplyTimer


def run(coro):
    return asyncio.run(coro)


def test_a_reply_that_never_comes_is_a_read_timeout_and_the_task_carries_on():
    async def main():
        with pytest.raises(aiosmtplib.SMTPReadTimeoutError):
            async with ReplyTimer(0.01) as timer:
                timer.arm()
                await asyncio.Event().wait()
        await asyncio.sleep(0)  # not left cancelled
        return asyncio.current_task().cancelling()

    assert run(main()) == 0


def test_a_deadline_moved_earlier_takes_effect():
    async def main():
        async with ReplyTimer(3600) as timer:
            timer.arm()
            timer.arm(0.01)
            await asyncio.Event().wait()

    with pytest.raises(aiosmtplib.SMTPReadTimeoutError):
        run(main())


def test_moving_the_deadline_later_keeps_the_transaction_alive():
    """The timer first goes off at the first deadline, finds a later one and waits for it."""

    async def main():
        async with ReplyTimer(0.02) as timer:
            timer.arm()
            timer.arm(3600)
            await asyncio.sleep(0.1)  # past the first deadline
        return "finished"

    assert run(main()) == "finished"


def test_disarmed_it_never_goes_off():
    async def main():
        async with ReplyTimer(0.01) as timer:
            timer.arm()
            timer.disarm()
            await asyncio.sleep(0.05)
        return "finished"

    assert run(main()) == "finished"


def test_a_cancellation_from_elsewhere_passes_through():
    async def main():
        async with ReplyTimer(3600) as timer:
            timer.arm()
            await asyncio.Event().wait()

    async def outer():
        task = asyncio.ensure_future(main())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(outer())
