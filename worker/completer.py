"""Writing outcomes as messages finish, not when their broker batch does.

One `Completer` per worker process. Each finished message hands it its outcome; a single
writer task writes it at once when idle, and whatever arrived during a write (up to a size
bound) with the next `finish_attempts` statement. Fetch batches stay large (one claim per broker message),
while the window in which a killed worker has sent mail it has not recorded is a time: one
write, milliseconds. River's batch completer works the same way (see
docs/design.md, "Outcomes: the completer").
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from outbox import logs

log = logs.get("outbox.worker")

# How long the oldest pending outcome of a busy process waits for others to join its write
# (none: what finishes during a write goes into the next one, which batches enough), and how
# many one write takes at most. A killed worker has sent, but not recorded, what finished
# within the linger plus one write.
LINGER_SECONDS = 0.0
MAX_PER_WRITE = 500

# Writes a list of outcome params; returns the ids it wrote (rows whose lease was lost are not).
Writer = Callable[[Sequence[Mapping[str, Any]]], Awaitable[set[int]]]


class Completer:
    def __init__(
        self, write: Writer, *, linger: float = LINGER_SECONDS, max_per_write: int = MAX_PER_WRITE
    ) -> None:
        self._write = write
        self._linger = linger
        self._max = max_per_write
        self._pending: list[tuple[Mapping[str, Any], asyncio.Future[bool]]] = []
        self._arrived = asyncio.Event()
        self._full = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._first_at = 0.0
        self._busy = False

    def submit(self, params: Mapping[str, Any]) -> asyncio.Future[bool]:
        """Queue one outcome; the future says whether it was written (False: the lease was
        lost and the row belongs to another worker now)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="outbox-completer")
        self._loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = self._loop.create_future()
        if not self._pending:
            self._first_at = self._loop.time()
        self._pending.append((params, future))
        self._arrived.set()
        if len(self._pending) >= self._max:
            self._full.set()
        return future

    async def _run(self) -> None:
        while True:
            if self._closing and not self._pending:
                return
            await self._arrived.wait()
            # Under light load (the last write carried one outcome) an outcome is written at
            # once. Otherwise the linger counts from the oldest pending outcome's arrival, so
            # what arrived during the previous write goes out at once too.
            linger = self._first_at + self._linger - self._loop.time() if self._busy else 0.0
            if not self._closing and len(self._pending) < self._max and linger > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), linger)
            batch, self._pending = self._pending[: self._max], self._pending[self._max :]
            self._busy = len(batch) > 1
            self._first_at = self._loop.time()  # what is left arrived during this flush, at the latest
            if not self._pending:
                self._arrived.clear()
            if len(self._pending) < self._max:
                self._full.clear()
            if not batch:
                if self._closing:
                    return
                continue
            await self._flush(batch)

    async def _flush(self, batch: list[tuple[Mapping[str, Any], asyncio.Future[bool]]]) -> None:
        try:
            written = await self._write([params for params, _ in batch])
        except Exception:
            # The writer retries for as long as a lease lasts; past that the rows are the
            # poller's to re-dispatch, so the outcomes are dropped, never guessed.
            log.exception("could not write outcomes; their rows are re-dispatched after the lease")
            written = set()
        for params, future in batch:
            if not future.done():
                future.set_result(params["id"] in written)

    async def aclose(self) -> None:
        """Write whatever is pending, then stop."""
        self._closing = True
        self._arrived.set()
        self._full.set()
        if self._task is not None:
            await self._task
