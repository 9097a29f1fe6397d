"""Sliding windows over the times an SMTP server saw messages: how many fell within any
interval of a limit's length, and which crowded windows the test's own stalls excuse. Shared by
the rate-limit tests (in-process pipeline, independent worker processes, the limiter alone)."""

from __future__ import annotations

import threading
import time

JITTER = 0.05  # seconds: arrival times vary this much more than admission times under load


def most_in_any_window(times, seconds):
    """The most arrivals in any half-open interval [t, t + seconds)."""
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - seconds:
            j += 1
        best = max(best, i - j + 1)
    return best


class Stalls:
    """When this process stalled: a thread sleeping PROBE_SECONDS at a time records each
    wake-up later than STALL_SECONDS (when it woke, how late). The test's SMTP server (and an
    in-process pipeline's worker) run in this process: a stall that delays a message between
    the limiter's admission and the server's MAIL delays this thread too."""

    PROBE_SECONDS = 0.002
    STALL_SECONDS = 0.002

    def __init__(self) -> None:
        self.seen: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            time.sleep(self.PROBE_SECONDS)
            woke = time.monotonic()
            late = woke - t0 - self.PROBE_SECONDS
            if late > self.STALL_SECONDS:
                self.seen.append((woke, late))

    def before(self, t: float, within: float) -> float:
        """How long this process stalled in the `within` seconds before `t` (a stall noticed
        up to 10 ms after it ended counts too)."""
        return sum(late for woke, late in self.seen if t - within <= woke <= t + 0.01)

    def __enter__(self) -> Stalls:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# A message reaches the server a little later than the limiter admitted it (the Redis reply,
# the worker's wake-up for its slot, the server's read): up to JITTER on a busy machine, more
# when this process stalls meanwhile. A window of a limit's length that holds one message too
# many is excused when it is short by at most JITTER, or by at most MOST_LATENESS if a stall
# of this process seen just before its first message explains the rest. A limit of 11/s
# (11 messages in 0.909 s: 0.091 short) fails the test, and so does no limit at all.
MOST_LATENESS = 0.08


def crowded_windows(times, n, seconds, stalls):
    """The sliding windows of `seconds` that hold more than `n` of these arrival times and are
    not excused (see MOST_LATENESS): (start from the first arrival, how much short)."""
    times = sorted(times)
    crowded = []
    for first, last in zip(times, times[n:], strict=False):
        short = seconds - (last - first)
        excused = short <= JITTER or (
            short <= MOST_LATENESS and stalls.before(first, MOST_LATENESS) >= short - JITTER
        )
        if short > 0 and not excused:
            crowded.append((round(first - times[0], 3), round(short, 3)))
    return crowded
