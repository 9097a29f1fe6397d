"""Process supervision in `outbox run` and `outbox worker --processes N`: a signal to the
parent reaches every child at once, a crashed child is logged and restarted (on its metrics
port, with backoff), a child stuck past the shutdown deadline is killed, and no child
outlives its parent. Real processes; the delivery side is covered in tests/chaos."""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.request
from pathlib import Path

from tests.chaos.services import OutboxProcess
from tests.conftest import wait_until
from tests.smtp import free_ports


def workers_up(p: OutboxProcess, n: int) -> None:
    wait_until(
        lambda: p.output().count("worker started") >= n,
        timeout=30,
        what=lambda: f"{n} workers started ({p.output()[-2000:]})",
    )


def gone(pid: int) -> bool:
    """Exited (reaped, or a zombie nobody reaped yet)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return fields[0] == "Z"


def metrics_up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def test_sigterm_reaches_every_child_at_once_and_all_stop(start):
    p = start("run", "--processes", "3")
    workers_up(p, 3)
    children = p.children()
    assert len(children) == 3 and set(children) == set(p.slots().values())
    began = time.monotonic()
    p.signal(signal.SIGTERM)
    assert p.proc.wait(timeout=30) == 0, p.output()
    assert time.monotonic() - began < 10
    assert all(gone(pid) for pid in children)
    out = p.output()
    assert out.count("stopping") == 4, out  # the supervisor and each child, on one SIGTERM
    assert out.count("worker stopped") == 3 and "poller stopped" in out


def test_crashed_child_is_logged_and_restarted_on_its_metrics_port_with_backoff(start):
    port = free_ports(2)
    p = start("worker", "--processes", "2", "--metrics-port", str(port))
    workers_up(p, 2)
    wait_until(lambda: metrics_up(port) and metrics_up(port + 1), what="metrics on P and P+1")
    victim = p.slots()[1]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: p.slots()[1] != victim, timeout=10, what="slot 1 to be forked again")
    died = re.findall(r"worker process died; restarting it .*", p.output())
    assert len(died) == 1, p.output()
    assert f"pid={victim}" in died[0] and "signal=SIGKILL" in died[0] and "restart_in=1.0" in died[0]
    workers_up(p, 3)
    wait_until(lambda: metrics_up(port + 1), what="the restarted child's metrics on P+1")
    assert p.slots()[0] in p.children() and p.slots()[1] in p.children()
    # it crashes again at once: the next restart waits twice as long
    second = p.slots()[1]
    os.kill(second, signal.SIGTERM)  # an exit the supervisor did not ask for is a crash too
    wait_until(lambda: p.slots()[1] != second, timeout=15, what="slot 1 to be forked once more")
    died = re.findall(r"worker process died; restarting it .*", p.output())
    assert len(died) == 2 and f"pid={second}" in died[1] and "restart_in=2.0" in died[1], died
    assert "exit_code=0" in died[1]
    p.signal(signal.SIGTERM)
    assert p.proc.wait(timeout=30) == 0, p.output()


def test_children_never_outlive_their_supervisor(start):
    p = start("run", "--processes", "2")
    workers_up(p, 2)
    children = p.children()
    assert len(children) == 2
    os.kill(p.pid, signal.SIGKILL)  # only the parent; the kernel SIGTERMs the children
    p.proc.wait(timeout=10)
    wait_until(lambda: all(gone(pid) for pid in children), timeout=30, what="the orphans to stop")


def test_a_child_stuck_past_the_shutdown_deadline_is_killed(start):
    p = start("worker", "--processes", "2", OUTBOX_SHUTDOWN_SECONDS="2")
    workers_up(p, 2)
    stuck = p.slots()[1]
    os.kill(stuck, signal.SIGSTOP)
    began = time.monotonic()
    p.signal(signal.SIGTERM)
    assert p.proc.wait(timeout=30) == 1, p.output()
    took = time.monotonic() - began
    assert 1.9 <= took < 6, took
    assert "still running at the shutdown deadline" in p.output()
    wait_until(lambda: gone(stuck), timeout=10, what="the stuck child to be gone")


def test_one_worker_process_runs_in_the_process_itself(start):
    p = start("worker", "--processes", "1")
    workers_up(p, 1)
    assert p.children() == []
    p.signal(signal.SIGTERM)
    assert p.proc.wait(timeout=30) == 0, p.output()
