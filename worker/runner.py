"""Running the pieces: a poller, a worker process (Dramatiq threads on one event loop), or
both for one machine. SIGTERM/SIGINT stop them gracefully: in-flight sends finish,
unstarted broker messages go back to Redis, and anything left is re-dispatched after its
lease by Postgres."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import threading
import time

import dramatiq

from outbox import logs
from outbox.config import Config
from worker import metrics
from worker.broker import make_broker
from worker.poller import Poller

log = logs.get("outbox.runner")
# How long an idle Dramatiq consumer waits on Redis before looking again: the floor of the
# pick-up latency when the queue was empty (Dramatiq polls; 100 ms cost ~50 ms at p50).
CONSUMER_POLL_MS = 10
# Worker threads only wake on an empty work queue to notice a shutdown.
THREAD_WAKE_MS = 200


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


def install_signal_handlers(stop: threading.Event) -> None:
    def handler(signum: int, frame: object) -> None:
        log.info("stopping", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def run_poller(config: Config, stop: threading.Event, *, until_idle: bool = False) -> None:
    _, actor, _ = make_broker(config)
    Poller(config, actor).run(stop, until_idle=until_idle)


class WorkerProcess:
    """A Dramatiq worker consuming `config.queue` in this process."""

    def __init__(self, config: Config) -> None:
        self.config = config
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

    def stop(self, timeout_seconds: float = 600) -> None:
        self.worker.stop(timeout=int(timeout_seconds * 1000))
        self.broker.close()
        log.info("worker stopped")


def run_worker(config: Config, stop: threading.Event) -> None:
    worker = WorkerProcess(config)
    worker.start()
    try:
        stop.wait()
    finally:
        worker.stop()


def _tune_gc() -> None:
    """What start-up created (modules, configuration) lives as long as the process: freeze it
    out of the cyclic collector's sight (before forking, so children share those pages too),
    and collect young objects less often. What a worker allocates per message is freed by
    reference counting; at the default threshold (700) the collector took ~5% of a worker's
    CPU; at 20,000 it ran once or not at all in a 6,000-message benchmark run."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 10, 10)


def _fork_workers(config: Config, count: int, stop: threading.Event) -> list[int]:
    """More worker processes, forked from this one before it starts any thread or connection:
    they share its imports and configuration, so they are ready at once (a second interpreter
    importing Dramatiq, psycopg, redis... took as long as the parent's whole start-up). Each
    child stops on SIGTERM/SIGINT like this process (the handlers are inherited) and serves
    its own metrics on the next port up."""
    if count and threading.active_count() > 1:
        raise RuntimeError("worker processes must be forked before any thread starts")
    pids = []
    for i in range(1, count + 1):
        port = config.metrics_port + i if config.metrics_port is not None else None
        pid = os.fork()
        if pid == 0:  # the child: one worker process, never back into the caller's code
            code = 1
            try:
                metrics.serve(port, config.metrics_host)
                run_worker(config, stop)
                code = 0
            except BaseException:
                log.exception("worker process failed")
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    return pids


def _stop_children(pids: list[int], timeout_seconds: float = 600) -> None:
    """SIGTERM every child (each finishes its in-flight sends), then reap them; a child still
    running after `timeout_seconds` is killed."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_seconds
    for pid in pids:
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                log.warning("worker process did not stop; killing it", pid=pid)
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.05)


def run_all_workers(config: Config, stop: threading.Event) -> None:
    """`config.worker_processes` worker processes: this one and children."""
    _tune_gc()
    children = _fork_workers(config, config.worker_processes - 1, stop)
    metrics.serve(config.metrics_port, config.metrics_host)
    try:
        run_worker(config, stop)
    finally:
        _stop_children(children)


def run_all(config: Config, stop: threading.Event, *, until_idle: bool = False) -> None:
    """Poller and workers for one machine: one worker in this process, more as children."""
    _tune_gc()
    children = _fork_workers(config, config.worker_processes - 1, stop)
    metrics.serve(config.metrics_port, config.metrics_host)
    worker = WorkerProcess(config)
    worker.start()
    poller_thread = threading.Thread(
        target=run_poller,
        args=(config, stop),
        kwargs={"until_idle": until_idle},
        name="outbox-poller",
        daemon=True,
    )
    poller_thread.start()
    try:
        while poller_thread.is_alive() and not stop.is_set():
            poller_thread.join(timeout=0.5)
        if until_idle:
            worker.join()
    finally:
        stop.set()
        poller_thread.join(timeout=30)
        worker.stop()
        _stop_children(children)
