"""Running the pieces in one process: a poller, a worker (Dramatiq threads on one event
loop), or both (`worker/supervisor.py` runs several such processes). SIGTERM/SIGINT stop them
gracefully (within `shutdown_seconds`): in-flight sends finish, unstarted broker messages go
back to Redis, and anything left is re-dispatched after its lease by Postgres. A second signal
stops at once."""

from __future__ import annotations

import gc
import os
import signal
import threading
import time

import dramatiq
import redis

from outbox import logs
from outbox.config import Config
from outbox.connections import redact_url, redis_client
from outbox.store.sql import queries
from worker import metrics
from worker.broker import make_broker
from worker.poller import Poller

log = logs.get("outbox.runner")
Q = queries("worker")
# How long an idle Dramatiq consumer waits on Redis before looking again. Dramatiq polls, so
# a message that reaches an empty queue waits half of this on average: the floor of pick-up
# latency, against a Redis round trip per poll.
CONSUMER_POLL_MS = 10
# Worker threads only wake on an empty work queue to notice a shutdown.
THREAD_WAKE_MS = 200
# How often a main thread looks whether a stop signal came.
SIGNAL_CHECK_SECONDS = 0.05


class _Worker(dramatiq.Worker):
    """Dramatiq's worker, tuned for an outbox: its one consumer polls Redis often (latency),
    its threads wake rarely (idle threads polling every few ms cost CPU), and it starts
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
        """Until stopped (or `thread`, when given, has ended: at once, not a check later)."""
        while not self.check():
            if thread is None:
                time.sleep(SIGNAL_CHECK_SECONDS)
            else:
                thread.join(SIGNAL_CHECK_SECONDS)
                if not thread.is_alive():
                    return


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


def tune_gc() -> None:
    """What start-up created (modules, configuration) lives as long as the process: freeze it
    out of the cyclic collector's sight (before forking, so children share those pages too;
    without collecting first, as the `gc.freeze` documentation advises: start-up leaves the
    collector little, and a full collection is slow), and collect young objects less often.
    What a worker allocates per message is freed by reference counting, so the collector finds
    next to nothing to free; at the default threshold (700) it still ran every few messages
    (figures in bench/RESULTS.md)."""
    gc.freeze()
    gc.set_threshold(20_000, 10, 10)
