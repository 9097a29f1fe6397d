"""Two independent `outbox worker` processes (each its own configuration and Redis client)
hold one connector's rate limit together (issue 18)."""

from __future__ import annotations

from tests.windows import Stalls, crowded_windows


def test_two_worker_processes_hold_one_rate_limit_together(chaos):
    chaos.sql("UPDATE outbox.connector SET rate_limits = '{10/s}' WHERE name = 'gw'")
    chaos.poller()
    chaos.worker()
    chaos.worker()
    with Stalls() as stalls:  # the SMTP server runs in this process
        chaos.enqueue(60)
        chaos.wait_sent(60, timeout=120)
    # Each message counted when the server saw its MAIL FROM. The two workers' limiter admits
    # them (just before MAIL) at least 1.01 s per 10, so every sliding second holds at most 10,
    # but for a message that arrived late: excused as tests/windows.py's MOST_LATENESS says.
    times = chaos.server.recorder.mail_times
    assert len(times) == 60
    assert crowded_windows(times, 10, 1.0, stalls) == [], (
        "11 messages within a second (start, how much under 1 s)",
        f"stalls seen: {[(round(w - times[0], 3), round(s, 3)) for w, s in stalls.seen if s > 0.005]}",
    )
    assert chaos.sql("SELECT count(*) FROM outbox.message WHERE status = 'sent' AND attempts = 1")[0][0] == 60
    assert max(times) - min(times) >= 5.9
