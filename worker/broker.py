"""The Dramatiq side: a Redis broker and the `deliver` actor.

Broker messages carry only hints ("rows N, M are due, under dispatch tokens T, U"); the
schedule and every retry live in Postgres, so Dramatiq's own retries stay off.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import dramatiq
from dramatiq.asyncio import get_event_loop_thread
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware
from dramatiq.middleware.asyncio import AsyncIO

from outbox.config import Config
from outbox.connections import redis_client
from worker.delivery import Delivery

ACTOR_NAME = "deliver"


class DeliveryLifecycle(Middleware):
    """Opens one `Delivery` per worker process on Dramatiq's event loop, closes it at shutdown."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.delivery: Delivery | None = None
        self._lock: asyncio.Lock | None = None

    async def get(self) -> Delivery:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.delivery is None:
                self.delivery = await Delivery.open(self.config)
        return self.delivery

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        # Connect while the poller claims the first rows, not when they arrive. Not waited
        # for; a failure is left to the first message, which opens it again and says why.
        loop_thread = get_event_loop_thread()
        if loop_thread is not None:
            asyncio.run_coroutine_threadsafe(self._open_early(), loop_thread.loop)

    async def _open_early(self) -> None:
        with contextlib.suppress(Exception):
            await self.get()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        # "after" hooks run in reverse order: this runs before AsyncIO stops the event loop.
        loop_thread = get_event_loop_thread()
        if self.delivery is not None and loop_thread is not None:
            loop_thread.run_coroutine(self.delivery.aclose())
        self.delivery = None
        self._lock = None


def make_broker(config: Config) -> tuple[RedisBroker, dramatiq.Actor[Any, Any], DeliveryLifecycle]:
    """A Redis broker with the `deliver` actor registered on `config.queue`."""
    lifecycle = DeliveryLifecycle(config)
    broker = RedisBroker(
        client=redis_client(config.redis_url),
        namespace=config.redis_namespace,
        middleware=[AsyncIO(), lifecycle],
    )

    async def deliver(batch: list[list[Any]]) -> None:
        delivery = await lifecycle.get()
        await delivery.run(batch)

    actor = dramatiq.actor(deliver, broker=broker, actor_name=ACTOR_NAME, queue_name=config.queue)
    return broker, actor, lifecycle
