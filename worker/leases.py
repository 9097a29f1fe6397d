"""The rows a worker process has in flight, and their leases kept alive while they are.

A claim gives each row a lease (`lease-seconds`); past it the poller may hand the row to
another worker. A message that waits long for its connector or for a slow server would
outlive it, so one task per process renews the leases of rows in flight for longer than a
third of the lease, in one statement, and records each row's phase with it: the reaper then
knows whether a lost worker's row had only waited for its connector (no attempt spent) or
had reached the server. See docs/design.md ("Leases and fencing").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from outbox import logs

log = logs.get("outbox.worker")

# Before its content goes out a row must still have this share of its lease left; renewals
# every third of the lease keep a healthy worker well above it, so only a worker cut off from
# Postgres (or stalled) for half a lease stops before DATA, long before the row could be
# re-dispatched, with time left for the final dot's reply.
DATA_MARGIN_SHARE = 0.5
RENEW_SHARE = 1 / 3
WAITING = "waiting"  # the phase of a message that waits for its connector (no SMTP yet)


@dataclass(eq=False)
class Flight:
    id: int
    token: str
    lease_seconds: float
    expires: float  # time.monotonic() at which this process must assume the lease is gone
    phase: str = "claimed"
    lost: bool = False

    def may_send_data(self) -> bool:
        """Still ours, with enough lease left for the content and the final dot's reply."""
        margin = self.lease_seconds * DATA_MARGIN_SHARE
        return not self.lost and time.monotonic() < self.expires - margin

    def set_phase(self, phase: str) -> None:
        self.phase = phase


# Renews the given flights under `lease_seconds`; returns the ids still held.
Renewer = Callable[[list[Flight], float], Awaitable[set[int]]]


class Leases:
    def __init__(self, renew: Renewer) -> None:
        self._renew = renew
        self._flights: dict[int, Flight] = {}
        self._task: asyncio.Task[None] | None = None
        self._lease_seconds = 300.0

    def track(
        self, ids_tokens: list[tuple[int, str]], sent_at: float, lease_seconds: float
    ) -> dict[int, Flight]:
        """Rows just claimed; `sent_at` is when the claim statement was sent (the lease can
        only have started after it)."""
        self._lease_seconds = lease_seconds
        flights = {i: Flight(i, t, lease_seconds, sent_at + lease_seconds) for i, t in ids_tokens}
        self._flights.update(flights)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="outbox-leases")
        return flights

    def release(self, flight: Flight) -> None:
        if self._flights.get(flight.id) is flight:
            del self._flights[flight.id]

    def __len__(self) -> int:
        return len(self._flights)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(max(0.05, min(self._lease_seconds / 6, 5.0)))
            try:
                await self.renew_due()
            except Exception as exc:  # Postgres away: the next tick tries again
                log.warning("could not renew leases", error=str(exc))

    async def renew_due(self) -> None:
        now = time.monotonic()
        due = [
            f
            for f in self._flights.values()
            if not f.lost and f.expires - now < f.lease_seconds * (1 - RENEW_SHARE)
        ]
        if not due:
            return
        lease = self._lease_seconds
        sent_at = time.monotonic()
        held = await self._renew(due, lease)
        for f in due:
            if f.id in held:
                f.expires, f.lease_seconds = sent_at + lease, lease
            else:
                f.lost = True
                log.warning("lease lost while in flight; the row is left to its new owner", message=f.id)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
