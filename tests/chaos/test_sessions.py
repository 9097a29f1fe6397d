"""`--max-connections N` across worker processes (issue 18): two independent `outbox worker`
processes never hold more than N sessions to the server at once; messages that wait for a
session spend no attempt; a killed worker's seats come back."""

from __future__ import annotations

from tests.conftest import wait_until


def test_max_connections_1_never_opens_a_second_session_across_two_workers(chaos):
    chaos.sql("UPDATE outbox.connector SET max_connections = 1 WHERE name = 'gw'")
    chaos.server.recorder.data_delay = 0.03  # each message keeps its session a little while
    chaos.poller(dispatch_batch=3)  # both workers get rows all along
    chaos.worker()
    chaos.worker()
    chaos.enqueue(60)
    chaos.wait_sent(60, timeout=120)
    recorder = chaos.server.recorder
    assert recorder.most_connections == 1, recorder.most_connections
    assert len(recorder.received) == 60
    # waiting for the other worker's session spent no attempt
    assert chaos.sql("SELECT count(*) FROM outbox.message WHERE status = 'sent' AND attempts = 1")[0][0] == 60
    chaos.check_invariants()


def test_a_killed_workers_session_seats_come_back(chaos):
    chaos.sql("UPDATE outbox.connector SET max_connections = 2 WHERE name = 'gw'")
    recorder = chaos.server.recorder
    recorder.data_delay = 0.05
    chaos.poller()
    doomed = chaos.worker()
    chaos.enqueue(20)
    wait_until(
        lambda: recorder.connections >= 1 and len(recorder.received) >= 3, what="the first worker sending"
    )
    doomed.kill()
    wait_until(lambda: recorder.connections == 0, timeout=10, what="its sessions closed by the kernel")
    chaos.enqueue(20)
    chaos.worker()  # its seats are gone with their leases (SESSION_LEASE_SECONDS), not forever
    chaos.wait_sent(40, timeout=120)
    assert recorder.most_connections <= 2, recorder.most_connections
    chaos.wait_final()
    chaos.check_invariants()
