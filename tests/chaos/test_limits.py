"""Two independent `outbox worker` processes (each its own configuration and Redis client)
hold one connector's rate limit together (issue 18)."""

from __future__ import annotations

from tests.integration.test_limits import JITTER, most_in_any_window


def test_two_worker_processes_hold_one_rate_limit_together(chaos):
    chaos.sql("UPDATE outbox.connector SET rate_limits = '{10/s}' WHERE name = 'gw'")
    chaos.poller()
    chaos.worker()
    chaos.worker()
    chaos.enqueue(60)
    chaos.wait_sent(60, timeout=60)
    times = chaos.server.recorder.arrival_times
    assert len(times) == 60
    # paced at admission (just before MAIL) 1.01 s per 10; arrival adds the scheduling jitter of
    # busy test processes (tens of ms), which the window allows for
    assert most_in_any_window(times, 1.0 - JITTER) <= 10, [
        round(b - a, 3) for a, b in zip(times, times[10:], strict=False)
    ]
    assert chaos.sql("SELECT count(*) FROM outbox.message WHERE status = 'sent' AND attempts = 1")[0][0] == 60
    assert max(times) - min(times) >= 5.9
