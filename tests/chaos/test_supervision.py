"""`outbox run` under its supervisor, killed and stopped the way a machine or compose does
it, with real processes. Every test ends in `check_invariants` and prints its tallies."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

import pytest

from tests.chaos.conftest import Chaos
from tests.chaos.test_processes import report
from tests.conftest import wait_until

pytestmark = pytest.mark.chaos


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.parametrize("slot", [0, 1], ids=["with-poller", "worker-only"])
def test_child_sigkilled_under_run_is_restarted(chaos: Chaos, slot: int):
    chaos.server.recorder.data_delay = 0.02
    chaos.enqueue(1000)
    run = chaos.start("run", "--processes", "3", "--threads", "4")
    chaos.wait_sent(150)
    assert chaos.count("sent") < 850, "the kill must land mid-run"
    victim = run.slots()[slot]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: run.slots().get(slot) != victim, timeout=15, what="the child to be forked again")
    chaos.wait_final()
    tallies = chaos.check_invariants()
    assert tallies["sent"] == 1000
    [died] = [line for line in run.output().splitlines() if "worker process died" in line]
    assert f"pid={victim}" in died and "signal=SIGKILL" in died
    assert run.alive() and len(run.children()) == 3
    report(f"run: child {slot} ({'poller + worker' if slot == 0 else 'worker'}) SIGKILLed", tallies)


def test_run_stopped_like_compose_mid_backlog_loses_nothing_and_sends_nothing_twice(chaos: Chaos):
    chaos.server.recorder.data_delay = 0.01
    chaos.enqueue(600)
    run = chaos.start("run", "--processes", "2", "--threads", "4", OUTBOX_SHUTDOWN_SECONDS="5")
    chaos.wait_sent(100)
    assert chaos.count("sent") < 500, "the stop must land mid-run"
    children = run.children()
    # compose: SIGTERM to the container's main process, SIGKILL to everything after the grace
    began = time.monotonic()
    run.signal(signal.SIGTERM)
    try:
        code: int | None = run.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        code = None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
        run.proc.wait(timeout=30)
    stopped_after = time.monotonic() - began
    assert code == 0, f"did not drain within the grace period ({run.output()[-3000:]})"
    assert all(_gone(pid) for pid in children)
    assert chaos.count("sending") == 0, "the stop left rows mid-send"
    chaos.start("run", "--processes", "2", "--threads", "4")
    chaos.wait_final()
    tallies = chaos.check_invariants()
    assert tallies["sent"] == 600 and tallies["duplicates"] == 0
    print(f"\nstopped {stopped_after:.2f} s after SIGTERM")
    report("run stopped like compose (SIGTERM, SIGKILL after 10 s) mid-backlog, then started again", tallies)


def test_second_sigterm_stops_run_at_once(chaos: Chaos):
    recorder = chaos.server.recorder
    recorder.gate.set()  # every DATA waits: the drain after the first SIGTERM cannot finish
    chaos.enqueue(20)
    run = chaos.start("run", "--processes", "2", OUTBOX_SHUTDOWN_SECONDS="60")
    assert recorder.data_started.wait(60), chaos.diagnose()
    children = run.children()
    run.signal(signal.SIGTERM)
    wait_until(
        lambda: run.output().count("stopping") >= 3, timeout=10, what="every process to begin stopping"
    )
    assert run.alive(), "the first SIGTERM drains (and the drain is stuck on DATA)"
    began = time.monotonic()
    run.signal(signal.SIGTERM)
    assert run.proc.wait(timeout=10) == 128 + signal.SIGTERM
    took = time.monotonic() - began
    assert took < 2, took
    assert all(_gone(pid) for pid in children)
    assert "stopping at once" in run.output()
    recorder.gate.clear()
    chaos.start("run", "--processes", "2")
    chaos.wait_final()
    tallies = chaos.check_invariants()
    assert tallies["sent"] == 20
    print(f"\nexited {took:.2f} s after the second SIGTERM")
    report("run: second SIGTERM mid-drain, then started again", tallies)
