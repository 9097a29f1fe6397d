"""Killed, stopped and restarted processes and servers, with real `outbox` processes.
Every test ends in `check_invariants`: zero lost, every row final, duplicates explained."""

from __future__ import annotations

import signal
import time

import psycopg
import pytest

from tests.chaos.conftest import Chaos, init_schema
from tests.chaos.services import PgInstance, RedisInstance, wait_for_postgres
from tests.conftest import wait_until

pytestmark = pytest.mark.chaos


def report(name: str, tallies: dict[str, int]) -> None:
    print(f"\nCHAOS {name}: {tallies}")


def test_worker_sigkill_mid_batch(chaos: Chaos):
    chaos.server.recorder.data_delay = 0.02
    chaos.enqueue(1000)
    chaos.poller()
    first = chaos.worker(threads=8)
    chaos.wait_sent(200)
    assert chaos.count("sent") < 900, "the kill must land mid-run"
    first.kill()
    chaos.worker(threads=8)
    chaos.wait_final()
    tallies = chaos.check_invariants()
    assert tallies["sent"] == 1000
    report("worker SIGKILL mid-batch", tallies)


@pytest.mark.parametrize("policy", ["retry", "hold"])
def test_worker_sigkill_during_data(chaos: Chaos, policy: str):
    chaos.sql("UPDATE outbox.settings SET ambiguous_policy = %s", [policy])
    recorder = chaos.server.recorder
    recorder.gate.set()
    chaos.enqueue(1)
    chaos.poller()
    first = chaos.worker()
    assert recorder.data_started.wait(60), chaos.diagnose()
    first.kill()  # the content is on the wire; no reply was read
    recorder.gate.clear()  # the server keeps the message and answers a dead connection
    chaos.worker()
    chaos.wait_final()
    tallies = chaos.check_invariants()
    [(status, last_error)] = chaos.sql("SELECT status, last_error FROM outbox.message")
    copies = recorder.wait_for(2 if policy == "retry" else 1, timeout=5)
    if policy == "retry":  # at-least-once: sent again, same Message-ID
        assert status == "sent" and len(copies) == 2
        assert copies[0].message_id == copies[1].message_id
    else:  # known to have died after DATA began: held for an operator, one copy
        assert status == "failed" and "ambiguous" in last_error and len(copies) == 1
    report(f"worker SIGKILL during DATA ({policy})", tallies)


def test_sigterm_mid_batch_finishes_in_flight_and_loses_nothing(chaos: Chaos):
    chaos.server.recorder.data_delay = 0.01
    chaos.enqueue(300)
    chaos.poller()
    first = chaos.worker(threads=4)
    chaos.wait_sent(50)
    assert chaos.count("sent") < 250, "SIGTERM must land mid-run"
    assert first.terminate(timeout=60) == 0, first.output()
    in_flight = chaos.count("sending")
    assert in_flight == 0, "SIGTERM left rows mid-send"
    chaos.worker(threads=4)
    chaos.wait_final()
    tallies = chaos.check_invariants()
    assert tallies["duplicates"] == 0 and tallies["sent"] == 300
    report("worker SIGTERM mid-batch", tallies)


def test_redis_killed_and_restarted_empty(chaos_factory, database_url, smtp):
    redis_server = RedisInstance()
    try:
        chaos = chaos_factory(database_url, redis_server.url, smtp)
        smtp.recorder.data_delay = 0.02
        chaos.enqueue(500)
        chaos.poller()
        chaos.worker(threads=8)
        chaos.wait_sent(100)
        assert chaos.count("sent") < 450, "Redis must die mid-run"
        redis_server.kill()
        time.sleep(0.5)  # the outage itself: poller and workers see Redis gone
        redis_server.start()  # same port, nothing in it
        chaos.wait_final()
        tallies = chaos.check_invariants()
        assert tallies["sent"] == 500
        report("Redis killed and restarted empty", tallies)
    finally:
        redis_server.destroy()


def test_postgres_connections_terminated_and_server_restarted(chaos_factory, smtp):
    from tests.conftest import REDIS_URL

    pg = PgInstance()
    try:
        with psycopg.connect(pg.url, autocommit=True) as admin:
            admin.execute("CREATE DATABASE chaos")
        url = pg.database_url("chaos")
        init_schema(url)
        chaos = chaos_factory(url, REDIS_URL, smtp)
        smtp.recorder.data_delay = 0.02
        chaos.enqueue(600)
        chaos.poller()
        chaos.worker(threads=8)
        chaos.wait_sent(100)
        with psycopg.connect(pg.url, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = 'chaos' AND pid <> pg_backend_pid()"
            ).fetchone()[0]
        assert killed >= 2
        chaos.wait_sent(250)
        assert chaos.count("sent") < 550, "the restart must land mid-run"
        pg.restart()  # immediate: like a crash
        wait_for_postgres(url)
        chaos.wait_final(timeout=240)
        tallies = chaos.check_invariants()
        assert tallies["sent"] == 600
        report("Postgres backends terminated, then server restarted", tallies)
    finally:
        pg.destroy()


def test_stale_worker_stopped_past_its_lease_writes_nothing(chaos: Chaos):
    recorder = chaos.server.recorder
    recorder.data_delay = 0.05
    chaos.enqueue(60)
    chaos.poller(dispatch_batch=10)  # outcomes land batch by batch, so the stop lands mid-run
    stale = chaos.worker(threads=4)
    chaos.wait_sent(5)
    assert chaos.count("sent") < 50, "the stop must land mid-run"
    stale.signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    chaos.worker(threads=4)
    chaos.wait_final()
    assert time.monotonic() - stopped_at > 3  # its leases (3 s) ran out while it slept
    stale.signal(signal.SIGCONT)
    # let the stale worker wake up and try to finish what it held
    wait_until(
        lambda: "lease" in stale.output() or "attempt finished" in stale.output(),
        timeout=30,
        what="the stale worker to resume",
    )
    time.sleep(1)
    tallies = chaos.check_invariants()
    assert chaos.count("sent") == 60
    report("stale worker SIGSTOP past lease, SIGCONT", tallies)
