"""Running the pieces: a poller, a worker process (Dramatiq threads on one event loop), or
both for one machine under a supervisor. SIGTERM/SIGINT stop them gracefully (within
`shutdown_seconds`): in-flight sends finish, unstarted broker messages go back to Redis, and
anything left is re-dispatched after its lease by Postgres. A second signal stops at once."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import select
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime

import dramatiq
import psycopg
import redis
from psycopg.rows import dict_row

from outbox import logs
from outbox.config import Config
from outbox.connections import pg_kwargs, redact_url, redis_client
from outbox.store.sql import queries
from worker import metrics
from worker.broker import make_broker
from worker.poller import Poller

log = logs.get("outbox.runner")
Q = queries("worker")
# How long an idle Dramatiq consumer waits on Redis before looking again: the floor of the
# pick-up latency when the queue was empty (Dramatiq polls; 100 ms cost ~50 ms at p50).
CONSUMER_POLL_MS = 10
# Worker threads only wake on an empty work queue to notice a shutdown.
THREAD_WAKE_MS = 200
# How often a main thread looks whether a stop signal came.
SIGNAL_CHECK_SECONDS = 0.05


class _Worker(dramatiq.Worker):
    """Dramatiq's worker, tuned for an outbox: its one consumer polls Redis often (latency),
    its threads wake rarely (idle CPU: 8 threads at 10 ms were 10% of a core), and it starts
    no consumer for delay queues (the outbox never delays a broker message: its schedule lives
    in Postgres). Overrides two internal hooks of dramatiq 2.x."""

    def _add_consumer(self, queue_name: str, *, delay: bool = False) -> None:
        if not delay:
            super()._add_consumer(queue_name, delay=delay)

    def _add_worker(self) -> None:
        self.worker_timeout, consumer_timeout = THREAD_WAKE_MS, self.worker_timeout
        try:
            super()._add_worker()
        finally:
            self.worker_timeout = consumer_timeout


class StopSignals:
    """SIGTERM/SIGINT handlers that only record the signal: a handler that logs or sets a
    `threading.Event` can deadlock on a lock its own thread holds at that moment (a second
    SIGTERM landing while the first one's log line is being written did). The main thread
    turns the record into `stop` (`check`, `wait`). With `escalate`, a second signal ends the
    process at once (what is in flight is left to its lease)."""

    def __init__(self, stop: threading.Event, *, escalate: bool = True) -> None:
        self.stop = stop
        self.escalate = escalate
        self.received: list[int] = []
        signal.signal(signal.SIGTERM, self._handler)
        signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum: int, frame: object) -> None:
        self.received.append(signum)
        if self.escalate and len(self.received) > 1:
            name = signal.Signals(signum).name
            os.write(2, f"outbox: {name} again: stopping at once\n".encode())
            os._exit(128 + signum)

    def check(self) -> bool:
        """Set `stop` once a signal came (and log it); True when stopping."""
        if self.received and not self.stop.is_set():
            log.info("stopping", signal=signal.Signals(self.received[0]).name)
            self.stop.set()
        return self.stop.is_set()

    def wait(self, thread: threading.Thread | None = None) -> None:
        """Until stopped (or `thread`, when given, has ended)."""
        while not self.check() and (thread is None or thread.is_alive()):
            time.sleep(SIGNAL_CHECK_SECONDS)


def wait_for_redis(config: Config, stop: threading.Event) -> bool:
    """Block until Redis answers (False when `stop` is set first). An unreachable Redis is one
    warning line, its return one info line: no traceback, nothing per retry."""
    client = redis_client(config.redis_url)
    delay, warned = 0.5, False
    try:
        while not stop.is_set():
            try:
                client.ping()
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                if not warned:
                    log.warning(
                        f"cannot reach Redis at {redact_url(config.redis_url)}; retrying", error=str(exc)
                    )
                    warned = True
                stop.wait(delay)
                delay = min(delay * 2, 5.0)
                continue
            if warned:
                log.info(f"reached Redis at {redact_url(config.redis_url)}")
            return True
        return False
    finally:
        client.close()


def run_poller(config: Config, stop: threading.Event, *, until_idle: bool = False) -> None:
    _, actor, _ = make_broker(config)
    Poller(config, actor).run(stop, until_idle=until_idle)


def run_poller_process(config: Config) -> None:
    """`outbox poll`: the poller on a thread, this (main) thread watching for signals."""
    stop = threading.Event()
    signals = StopSignals(stop)
    metrics.serve(config.metrics_port, config.metrics_host)
    failed: list[BaseException] = []

    def poll() -> None:
        try:
            run_poller(config, stop)
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=poll, name="outbox-poller", daemon=True)
    thread.start()
    signals.wait(thread)
    stop.set()
    thread.join()
    if failed:
        raise failed[0]  # as if it had run on this thread: the CLI reports it


class WorkerProcess:
    """A Dramatiq worker consuming `config.queue` in this process."""

    def __init__(self, config: Config) -> None:
        self.config = config
        # Dramatiq's consumer expects only connection errors from Redis; a timeout (a hung
        # Redis) it logs as unexpected, with a traceback of some 80 lines every few seconds.
        logs.one_line_errors(redis.exceptions.RedisError, dramatiq.errors.BrokerError)
        self.broker, self.actor, _ = make_broker(config)
        self.worker = _Worker(
            self.broker,
            queues={config.queue},
            worker_threads=config.worker_threads,
            worker_timeout=CONSUMER_POLL_MS,
        )
        # Take one batch per thread from Redis, not two: a prefetched batch waits in this
        # process while another process may be idle (the last batches of a burst).
        self.worker.queue_prefetch = config.worker_threads

    def start(self) -> None:
        self.worker.start()
        log.info("worker started", queue=self.config.queue, threads=self.config.worker_threads)

    def join(self) -> None:
        """Wait until the queue is empty and every worker thread is idle (tests, drain)."""
        self.broker.join(self.config.queue)
        self.worker.join()

    def stop(self, timeout_seconds: float = 25) -> None:
        self.worker.stop(timeout=int(timeout_seconds * 1000))
        self.broker.close()
        log.info("worker stopped")


def drain_seconds(config: Config) -> float:
    """How long a process may spend finishing its in-flight sends once stopped: within
    `shutdown_seconds`, leaving the supervisor a moment to reap it before its deadline."""
    return max(config.shutdown_seconds - 2.0, config.shutdown_seconds / 2)


def _redis_or_stop(config: Config, signals: StopSignals) -> bool:
    """Wait for Redis on a thread while this one watches for signals; False when stopped."""
    reached: list[bool] = []
    thread = threading.Thread(
        target=lambda: reached.append(wait_for_redis(config, signals.stop)), name="outbox-redis-wait"
    )
    thread.start()
    signals.wait(thread)
    thread.join()
    return bool(reached and reached[0]) and not signals.stop.is_set()


def run_worker(config: Config, signals: StopSignals) -> None:
    if not _redis_or_stop(config, signals):
        return
    worker = WorkerProcess(config)
    worker.start()
    try:
        signals.wait()
    finally:
        worker.stop(drain_seconds(config))


def run_poller_and_worker(config: Config, signals: StopSignals, *, until_idle: bool = False) -> int:
    """A worker with the poller on a thread beside it (the first process of `outbox run`).
    Returns 0 once stopped (or, with `until_idle`, once nothing is left), 1 if the poller
    failed."""
    stop = signals.stop
    if not _redis_or_stop(config, signals):
        return 0
    worker = WorkerProcess(config)
    worker.start()
    failed: list[BaseException] = []

    def poll() -> None:
        try:
            run_poller(config, stop, until_idle=until_idle)
        except BaseException as exc:
            failed.append(exc)
            log.exception("poller failed")

    poller_thread = threading.Thread(target=poll, name="outbox-poller", daemon=True)
    poller_thread.start()
    try:
        signals.wait(poller_thread)
        if until_idle and not failed and not signals.check():
            worker.join()
    finally:
        stop.set()
        poller_thread.join(timeout=drain_seconds(config))
        worker.stop(drain_seconds(config))
    return 1 if failed else 0


def _tune_gc() -> None:
    """What start-up created (modules, configuration) lives as long as the process: freeze it
    out of the cyclic collector's sight (before forking, so children share those pages too),
    and collect young objects less often. What a worker allocates per message is freed by
    reference counting; at the default threshold (700) the collector took ~5% of a worker's
    CPU; at 20,000 it ran once or not at all in a 6,000-message benchmark run."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 10, 10)


# -- supervision ---------------------------------------------------------------------------

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
    _tune_gc()
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
    _tune_gc()
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
