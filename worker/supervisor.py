"""Supervision for `outbox run` and `outbox worker --processes N`: a single-threaded parent
that forks the worker processes (`worker/runner.py` runs each), forwards signals, restarts a
crashed child with backoff and kills what outlives the shutdown deadline."""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg.rows import dict_row

from outbox import logs
from outbox.config import Config
from outbox.connections import pg_kwargs
from outbox.store.sql import queries
from worker import metrics
from worker.runner import StopSignals, run_poller_and_worker, run_worker, tune_gc

Q = queries("worker")
log = logs.get("outbox.runner")

# A crashed child is forked again after RESTART_FIRST_SECONDS, doubling up to
# RESTART_MAX_SECONDS while it keeps crashing; one that ran STABLE_SECONDS starts afresh.
RESTART_FIRST_SECONDS = 1.0
RESTART_MAX_SECONDS = 30.0
STABLE_SECONDS = 30.0
PR_SET_PDEATHSIG = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _die_with_parent(parent_pid: int) -> bool:
    """Ask Linux to SIGTERM this process when its parent dies (prctl PR_SET_PDEATHSIG), so
    no worker outlives its supervisor, even a SIGKILLed one. False when the parent is gone
    already (it died between fork and prctl). Elsewhere: nothing to set."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    return os.getppid() == parent_pid


@dataclass
class _Slot:
    index: int
    pid: int | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    backoff: float = RESTART_FIRST_SECONDS


class Supervisor:
    """The parent of `outbox run` and `outbox worker --processes N`: a single-threaded
    process that only forks, watches and signals its children (no broker, no connections, no
    threads). Forking stays safe at any time, so a crashed child can be forked again, and the
    children share its imports and configuration (ready at once).

    Child i serves metrics on metrics_port + i (a restarted child takes its predecessor's
    port). With `with_poller`, child 0 also runs the poller (on a thread, as `outbox run`
    always did in its first process). SIGTERM/SIGINT are forwarded to every child at once as
    SIGTERM; all drain in parallel, and whatever still runs after `shutdown_seconds` is
    killed. A second SIGTERM/SIGINT kills the children and exits at once."""

    def __init__(self, config: Config, *, with_poller: bool, until_idle: bool = False) -> None:
        self.config = config
        self.with_poller = with_poller
        self.until_idle = until_idle
        self.slots = [_Slot(i) for i in range(config.worker_processes)]
        self.pid = os.getpid()
        self.stopping_since: float | None = None
        self.exit_code = 0
        self._signals: list[int] = []

    # -- signals -------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: object) -> None:
        if os.getpid() == self.pid:  # never acted on in a child that has not reset it yet
            self._signals.append(signum)

    def _install(self) -> tuple[int, int]:
        """Handlers that only record the signal; the wake-up pipe ends `select` at once."""
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        for sig in (*STOP_SIGNALS, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        return r, w

    # -- children ------------------------------------------------------------------------

    def _spawn(self, slot: _Slot, wakeup: tuple[int, int]) -> None:
        if threading.active_count() > 1:
            raise RuntimeError("the supervisor must stay single-threaded to fork safely")
        blocked = {*STOP_SIGNALS, signal.SIGCHLD}
        signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            pid = os.fork()
            if pid == 0:
                self._child(slot, wakeup, blocked)  # never returns
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
        slot.pid, slot.started_at, slot.restart_at = pid, time.monotonic(), None
        log.info("worker process started", slot=slot.index, pid=pid, poller=self._has_poller(slot))

    def _has_poller(self, slot: _Slot) -> bool:
        return self.with_poller and slot.index == 0

    def _child(self, slot: _Slot, wakeup: tuple[int, int], blocked: set[signal.Signals]) -> None:
        """In the forked child: one worker process (and the poller in slot 0 of `run`),
        never back into the supervisor's code."""
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for fd in wakeup:
                os.close(fd)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            # SIGTERM comes from the supervisor (or from the kernel when the supervisor dies);
            # a terminal's Ctrl-C reaches the supervisor, which forwards it as SIGTERM. The
            # supervisor escalates with SIGKILL.
            signals = StopSignals(threading.Event(), escalate=False)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
            if not _die_with_parent(self.pid):
                code = 0
                return
            config = self.config
            port = config.metrics_port + slot.index if config.metrics_port is not None else None
            metrics.serve(port, config.metrics_host)
            if self._has_poller(slot):
                code = run_poller_and_worker(config, signals, until_idle=self.until_idle)
            else:
                run_worker(config, signals)
                code = 0
        except BaseException:
            log.exception("worker process failed")
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is not None:
                self._exited(slot, os.waitstatus_to_exitcode(status))

    def _exited(self, slot: _Slot, code: int) -> None:
        pid, slot.pid = slot.pid, None
        now = time.monotonic()
        if self.stopping_since is not None:
            return
        if self.until_idle and self._has_poller(slot) and code == 0:
            log.info("nothing left to do; stopping")
            self._begin_stop()
            return
        how = {"signal": signal.Signals(-code).name} if code < 0 else {"exit_code": code}
        if now - slot.started_at >= STABLE_SECONDS:
            slot.backoff = RESTART_FIRST_SECONDS
        slot.restart_at = now + slot.backoff
        log.warning(
            "worker process died; restarting it", slot=slot.index, pid=pid, restart_in=slot.backoff, **how
        )
        slot.backoff = min(slot.backoff * 2, RESTART_MAX_SECONDS)

    def _alive(self) -> list[_Slot]:
        return [s for s in self.slots if s.pid is not None]

    def _signal_children(self, sig: signal.Signals) -> None:
        for slot in self._alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.pid, sig)  # type: ignore[arg-type]

    def _begin_stop(self) -> None:
        self.stopping_since = time.monotonic()
        self._signal_children(signal.SIGTERM)

    def _kill_now(self) -> None:
        self._signal_children(signal.SIGKILL)
        deadline = time.monotonic() + 5
        while self._alive() and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.01)

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> int:
        wakeup = self._install()
        for slot in self.slots:
            self._spawn(slot, wakeup)
        while True:
            self._reap()
            for signum in self._take_signals():
                name = signal.Signals(signum).name
                if self.stopping_since is None:
                    log.info("stopping", signal=name, processes=len(self._alive()))
                    self._begin_stop()
                else:
                    log.warning("stopping at once", signal=name)
                    self._kill_now()
                    return 128 + signum
            now = time.monotonic()
            if self.stopping_since is not None:
                if not self._alive():
                    log.info("stopped")
                    return self.exit_code
                if now - self.stopping_since >= self.config.shutdown_seconds:
                    log.warning(
                        "worker processes still running at the shutdown deadline; killing them",
                        pids=[s.pid for s in self._alive()],
                    )
                    self._kill_now()
                    return 1
            else:
                for slot in self.slots:
                    if slot.pid is None and slot.restart_at is not None and now >= slot.restart_at:
                        self._spawn(slot, wakeup)
            self._sleep(wakeup[0], self._timeout(now))

    def _take_signals(self) -> list[int]:
        taken = []
        while self._signals:  # popped one by one: a handler may append meanwhile
            signum = self._signals.pop(0)
            if signum != signal.SIGCHLD:
                taken.append(signum)
        return taken

    def _timeout(self, now: float) -> float:
        due = [s.restart_at for s in self.slots if s.pid is None and s.restart_at is not None]
        if self.stopping_since is not None:
            due.append(self.stopping_since + self.config.shutdown_seconds)
        return max(0.0, min([now + 1.0, *due]) - now)

    def _sleep(self, fd: int, timeout: float) -> None:
        """Until a signal arrives (the wake-up pipe) or `timeout` passes."""
        if self._signals:
            return
        with contextlib.suppress(InterruptedError):
            select.select([fd], [], [], timeout)
        with contextlib.suppress(BlockingIOError):
            while os.read(fd, 512):
                pass


def run_all_workers(config: Config) -> int:
    """`outbox worker`: one worker in this process, or N supervised worker processes."""
    tune_gc()
    if config.worker_processes == 1:
        # The process is the worker: signals reach it directly, and what runs it (compose,
        # systemd, Kubernetes) restarts it when it dies.
        signals = StopSignals(threading.Event())
        metrics.serve(config.metrics_port, config.metrics_host)
        run_worker(config, signals)
        return 0
    return Supervisor(config, with_poller=False).run()


def run_all(config: Config, *, until_idle: bool = False) -> int:
    """`outbox run`: poller and workers for one machine, as supervised worker processes (the
    first also runs the poller). With `until_idle`, ends with a one-line summary of the run."""
    tune_gc()
    since = _db_now(config) if until_idle else None
    code = Supervisor(config, with_poller=True, until_idle=until_idle).run()
    if since is not None and code == 0:
        _summarise(config, since)
    return code


def _db_now(config: Config) -> datetime | None:
    """The database's clock (one short connection, closed before anything is forked)."""
    with (
        contextlib.suppress(psycopg.Error),
        psycopg.connect(config.database_url, **pg_kwargs(config.database_url)) as conn,
    ):
        row = conn.execute("SELECT now()").fetchone()
        return row[0] if row else None
    return None


def _summarise(config: Config, since: datetime) -> None:
    with (
        contextlib.suppress(psycopg.Error),
        psycopg.connect(config.database_url, **pg_kwargs(config.database_url)) as conn,
    ):
        with conn.cursor(row_factory=dict_row) as cur:
            s = cur.execute(Q["run_summary"], {"since": since}).fetchone() or {}
        finished = {k: s[k] for k in ("sent", "partial", "failed") if s.get(k)}
        log.info(
            f"done: {sum(finished.values())} message(s) finished"
            + (" (" + ", ".join(f"{k} {v}" for k, v in finished.items()) + ")" if finished else "")
            + f"; {s.get('waiting', 0)} wait for a later retry or schedule"
        )
