"""Retention while delivering (issue 16): does the poller's retention hold delivery up?

    .venv/bin/python -m bench.retention [--old-rows 1000000] [--n 3000] [--runs 3]

One database (bench.outbox_e2e's template: the sink as System Default Gateway) is filled with
`--old-rows` finished messages (98 % sent, the rest failed, partial, cancelled), each with one
attempt and, when attempted, one recipient result, all last changed 60 to 90 days ago
(bench.lifecycle's loader, triggers off). Then, in that same database and interleaved
(off, on, off, on, ...) so that whatever else the machine does weighs on both alike:

1. throughput: `--n` fresh messages delivered end to end by `outbox run --until-idle` with
   `retention-days` 0 (off) and 30 (on: every old row is due, and the poller's retention
   thread deletes them in batches of 500 beside dispatch, resting 3x a batch's time between);
2. latency: one row every 1/50 s for `--latency-seconds` into a running `outbox run`, off and
   on, insert->sent p50/p99;
3. drain: `outbox run` with nothing to send and retention on for `--drain-seconds`: the
   deletion rate on its own, and from it how long the whole backlog takes.

While each run goes, pg_stat_activity is sampled every 20 ms: the longest retention
transaction seen (a lower bound: it is sampled) and every sample of a backend waiting on a
lock. Old rows deleted are counted before and after each run. Prints a Markdown report with
the load average (the machine is shared: compare off with on, not with other days). Every
database and Redis key it makes is removed at the end. Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import lifecycle
from bench import outbox_e2e as e2e
from bench.infra import PG_ADMIN_DEFAULT, REDIS_DEFAULT, Databases, clean_redis, connect, load_average
from bench.run import _require_loopback, say
from bench.sink import Sink

# Finished rows only: what retention may delete (shares as in bench.lifecycle's 10M table).
FINISHED_MIX = [("sent", 0.9800), ("failed", 0.0100), ("partial", 0.0070), ("cancelled", 0.0030)]
OLD_AGE_DAYS = 60  # rows last changed 60..90 days ago
RETENTION_DAYS = 30  # ... so every one is due
SAMPLE_SECONDS = 0.02

ACTIVITY_SQL = """
SELECT pid, xact_start, extract(epoch FROM clock_timestamp() - xact_start), wait_event_type,
       wait_event, left(query, 80), pg_blocking_pids(pid)
  FROM pg_stat_activity
 WHERE datname = current_database() AND pid <> pg_backend_pid() AND xact_start IS NOT NULL
"""


@dataclass
class Activity:
    """What pg_stat_activity showed during one run."""

    retention_xacts: dict[tuple[int, object], float] = field(default_factory=dict)
    lock_waits: list[str] = field(default_factory=list)  # every sample of a backend waiting on a lock
    waits_on_retention: int = 0  # ... of those, waits on a backend running a retention batch
    samples: int = 0

    @property
    def longest_ms(self) -> float:
        return max(self.retention_xacts.values(), default=0.0) * 1000


class ActivitySampler:
    """A thread sampling pg_stat_activity of one database until stopped."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.activity = Activity()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Activity:
        self._thread.start()
        return self.activity

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        a = self.activity
        with connect(self.url) as conn:
            while not self._stop.wait(SAMPLE_SECONDS):
                a.samples += 1
                rows = conn.execute(ACTIVITY_SQL).fetchall()
                retaining = set()
                for pid, started, age, _, _, query, _ in rows:
                    if "delete_finished" in query or "delete_old_history" in query:
                        retaining.add(pid)
                        key = (pid, started)
                        a.retention_xacts[key] = max(a.retention_xacts.get(key, 0.0), float(age))
                for _, _, _, wait_type, wait, query, blockers in rows:
                    if wait_type == "Lock":
                        a.lock_waits.append(f"{wait}: {' '.join(query.split())}")
                        a.waits_on_retention += bool(retaining.intersection(blockers or ()))


@dataclass
class Side:
    """Every run with retention off, or every run with it on."""

    rates: list[float] = field(default_factory=list)
    startups: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    deleted: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    longest_ms: list[float] = field(default_factory=list)
    retention_xacts: list[int] = field(default_factory=list)
    lock_waits: list[str] = field(default_factory=list)
    waits_on_retention: int = 0
    backlog_at_start: list[int] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    claim_p99: list[float] = field(default_factory=list)
    lat_max: list[float] = field(default_factory=list)
    lat_deleted: list[int] = field(default_factory=list)
    lat_seconds: list[float] = field(default_factory=list)

    def deletion_rate(self, deleted: list[int], seconds: list[float]) -> float:
        return sum(deleted) / sum(seconds) if seconds and sum(seconds) else 0.0


def old_left(url: str, old_max: int) -> int:
    with connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM outbox.message WHERE id <= %s", [old_max]).fetchone()
        assert row is not None
        return int(row[0])


def set_retention(url: str, days: int) -> None:
    with connect(url) as conn:
        conn.execute("UPDATE outbox.settings SET retention_days = %s", [days])


def time_batches(url: str, batches: int = 5) -> list[float]:
    """Seconds each of `batches` retention batches takes, called as the poller calls it."""
    from outbox.store.sql import queries

    sql = queries("worker")["retention_messages"]
    took = []
    with connect(url) as conn:
        for _ in range(batches):
            t = time.perf_counter()
            conn.execute(sql, {"days": RETENTION_DAYS, "batch": 500}).fetchall()
            took.append(time.perf_counter() - t)
    return took


def _observed(side: Side, activity: Activity) -> None:
    side.longest_ms.append(activity.longest_ms)
    side.retention_xacts.append(len(activity.retention_xacts))
    side.lock_waits += activity.lock_waits
    side.waits_on_retention += activity.waits_on_retention


def throughput_run(env: e2e.Env, database: str, old_max: int, n: int, side: Side, days: int) -> None:
    url = env.dbs.url(database)
    set_retention(url, days)
    backlog = old_left(url, old_max)
    with ActivitySampler(url) as activity:
        t0 = time.monotonic()
        r = e2e.throughput(env, n, database=database, label=f"ret{days}")
        seconds = time.monotonic() - t0
    _observed(side, activity)
    side.deleted.append(backlog - old_left(url, old_max))
    side.seconds.append(seconds)
    side.backlog_at_start.append(backlog)
    side.rates.append(r.rate)
    side.startups.append(r.startup)
    if r.cpu_ms_per_msg is not None:
        side.cpu_ms.append(r.cpu_ms_per_msg)


def latency_run(env: e2e.Env, database: str, old_max: int, seconds: float, side: Side, days: int) -> None:
    url = env.dbs.url(database)
    set_retention(url, days)
    backlog = old_left(url, old_max)
    with ActivitySampler(url) as activity:
        t0 = time.monotonic()
        lat = e2e.latency(env, rate=50, seconds=seconds, database=database)
        elapsed = time.monotonic() - t0
    side.p50.append(lat.p50)
    side.p99.append(lat.p99)
    side.claim_p99.append(lat.to_claim_p99)
    side.lat_max.append(lat.max)
    side.lat_deleted.append(backlog - old_left(url, old_max))
    side.lat_seconds.append(elapsed)
    _observed(side, activity)


def drain(env: e2e.Env, database: str, old_max: int, seconds: float) -> tuple[int, float, Activity]:
    """`outbox run` with nothing to send and retention on, for `seconds` (or until the old rows
    are gone): old rows deleted and the time taken, both from the first deletion seen (so that
    the interpreter's start is left out)."""
    url = env.dbs.url(database)
    set_retention(url, RETENTION_DAYS)
    backlog = old_left(url, old_max)
    namespace = env.namespace()
    log_path = env.workdir / "drain.log"
    try:
        with open(log_path, "wb") as log, ActivitySampler(url) as activity:
            t0: float | None = None
            proc = subprocess.Popen(
                [*e2e.outbox_command(), "run"], env=env.environ(database, namespace), stdout=log, stderr=log
            )
            try:
                for _ in range(int(seconds * 4) + 240):  # bounded: four looks a second
                    time.sleep(0.25)
                    if proc.poll() is not None:
                        raise RuntimeError(f"outbox run exited {proc.returncode}; see {log_path}")
                    left = old_left(url, old_max)
                    if left < backlog and t0 is None:
                        t0, backlog = time.monotonic(), left  # the first pass is under way
                    if left == 0 or (t0 is not None and time.monotonic() - t0 >= seconds):
                        break
            finally:
                e2e._stop(proc)
            elapsed = time.monotonic() - t0 if t0 is not None else 0.0
    finally:
        clean_redis(env.redis_url, namespace)
    return backlog - old_left(url, old_max), elapsed, activity


def _ms(values: list[float]) -> str:
    return ", ".join(f"{v * 1000:.0f}" for v in values)


def _list(values: list[float] | list[int], fmt: str = ",.0f") -> str:
    return ", ".join(format(v, fmt) for v in values)


def report(
    args: argparse.Namespace,
    off: Side,
    on: Side,
    load: dict[str, str],
    drained: tuple[int, float, Activity],
    fill_s: float,
    batches: list[float],
) -> str:
    f, o = statistics.median(off.rates), statistics.median(on.rates)
    ratios = [b / a for a, b in zip(off.rates, on.rates, strict=False)]
    on_rate = on.deletion_rate(on.deleted, on.seconds)
    lat_rate = on.deletion_rate(on.lat_deleted, on.lat_seconds)
    d_deleted, d_seconds, d_act = drained
    idle_rate = d_deleted / d_seconds if d_seconds else 0.0
    waits = sorted(set(off.lock_waits + on.lock_waits))
    cpu = [f"{statistics.median(s.cpu_ms):.2f} ms" if s.cpu_ms else "n/a" for s in (off, on)]
    rows = [
        ("e2e throughput, median", f"{f:,.0f} msg/s", f"{o:,.0f} msg/s ({100 * (o - f) / f:+.1f} %)"),
        ("each run (msg/s)", _list(off.rates), _list(on.rates)),
        (
            "on / off, each pair",
            "",
            f"{_list(ratios, '.2f')} (median {statistics.median(ratios):.2f})",
        ),
        (
            "first message sent, seconds after `outbox run` started",
            _list(off.startups, ".2f"),
            _list(on.startups, ".2f"),
        ),
        ("client CPU per message, median", *cpu),
        (
            "backlog of old rows at the start of each run",
            _list(off.backlog_at_start),
            _list(on.backlog_at_start),
        ),
        (
            "old rows deleted during each run",
            _list(off.deleted),
            f"{_list(on.deleted)} in {_list(on.seconds, '.1f')} s: {on_rate:,.0f} messages/s",
        ),
        (f"latency @ 50 msg/s, {args.latency_seconds:.0f} s each: p50 (ms)", _ms(off.p50), _ms(on.p50)),
        ("latency p99 (ms)", _ms(off.p99), _ms(on.p99)),
        ("latency max (ms)", _ms(off.lat_max), _ms(on.lat_max)),
        ("latency insert->worker claim p99 (ms)", _ms(off.claim_p99), _ms(on.claim_p99)),
        (
            "old rows deleted during each latency run",
            _list(off.lat_deleted),
            f"{_list(on.lat_deleted)}: {lat_rate:,.0f} messages/s",
        ),
        (
            f"retention transactions seen (pg_stat_activity every {SAMPLE_SECONDS * 1000:.0f} ms)",
            str(sum(off.retention_xacts)),
            str(sum(on.retention_xacts)),
        ),
        ("longest retention transaction seen, per run (ms)", _list(off.longest_ms), _list(on.longest_ms)),
        (
            "samples of a backend waiting on a lock (of them, on a retention batch)",
            f"{len(off.lock_waits)} ({off.waits_on_retention})",
            f"{len(on.lock_waits)} ({on.waits_on_retention})",
        ),
    ]
    out = [
        f"## Retention while delivering: {args.old_rows:,} old finished rows, N={args.n}, runs={args.runs}",
        f"load average (1/5/15 min): {'; '.join(f'{k} {v}' for k, v in load.items())}",
        f"old rows loaded (messages, attempts, recipient results; triggers off) in {fill_s:.0f} s",
        f"one retention batch (500 messages with their history) timed directly, {len(batches)} in a row:"
        f" median {statistics.median(batches) * 1000:.0f} ms, max {max(batches) * 1000:.0f} ms",
        "",
        "| measurement | retention off (retention-days 0) | on (retention-days 30: all old rows due) |",
        "|---|---|---|",
        *(f"| {a} | {b} | {c} |" for a, b, c in rows),
        "",
        "Idle drain: not run, or no old rows were left to drain."
        if not d_seconds
        else f"Idle drain (`outbox run`, nothing to send, retention on): {d_deleted:,} old messages deleted"
        f" in {d_seconds:.1f} s = {idle_rate:,.0f} messages/s (with their attempts and recipient"
        f" results); longest retention transaction seen {d_act.longest_ms:.0f} ms of"
        f" {len(d_act.retention_xacts)} seen.",
    ]
    if idle_rate:
        out.append(
            f"Full drain of {args.old_rows:,} old rows at the poller's pace: about"
            f" {args.old_rows / idle_rate / 60:.1f} min idle"
            + (f", {args.old_rows / on_rate / 60:.1f} min while delivering flat out" if on_rate else "")
            + "."
        )
    if waits:
        out += ["", "Lock waits seen:", *(f"- {w}" for w in waits)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--old-rows", type=int, default=1_000_000, help="old finished messages to load")
    parser.add_argument("--n", type=int, default=3000, help="fresh messages per throughput run")
    parser.add_argument("--runs", type=int, default=3, help="off/on pairs")
    parser.add_argument("--latency-seconds", type=float, default=10, help="each latency run, at 50 msg/s")
    parser.add_argument("--drain-seconds", type=float, default=30, help="the idle drain run (0: skip)")
    parser.add_argument("--pg-admin-url", default=os.environ.get("OUTBOX_BENCH_PG", PG_ADMIN_DEFAULT))
    parser.add_argument("--redis-url", default=os.environ.get("OUTBOX_BENCH_REDIS", REDIS_DEFAULT))
    args = parser.parse_args(argv)
    _require_loopback(args.pg_admin_url, args.redis_url)
    workdir = Path(tempfile.mkdtemp(prefix="outbox-bench-retention-"))
    dbs = Databases(args.pg_admin_url)
    sink = Sink.start("auto")
    env = e2e.Env(dbs=dbs, redis_url=args.redis_url, sink_port=sink.port, workdir=workdir)
    load = {"start": load_average()}
    off, on = Side(), Side()
    try:
        e2e.make_template(env)
        database = dbs.create("old", template=env.template)
        url = dbs.url(database)
        say(f"loading {args.old_rows:,} old finished messages; load average {load_average()}")
        t = time.monotonic()
        lifecycle.fill(url, args.old_rows, mix=FINISHED_MIX, age_days=OLD_AGE_DAYS, recipients=True)
        fill_s = time.monotonic() - t
        old_max = e2e._max_id(url)
        batches = time_batches(url)
        for k in range(args.runs):
            for side, days in ((off, 0), (on, RETENTION_DAYS)):
                say(f"throughput {k + 1}/{args.runs}, retention-days {days}; load average {load_average()}")
                throughput_run(env, database, old_max, args.n, side, days)
        load["after throughput"] = load_average()
        for k in range(args.runs):
            for side, days in ((off, 0), (on, RETENTION_DAYS)):
                say(f"latency {k + 1}/{args.runs}, retention-days {days}; load average {load_average()}")
                latency_run(env, database, old_max, args.latency_seconds, side, days)
        load["after latency"] = load_average()
        drained: tuple[int, float, Activity] = (0, 0.0, Activity())
        if args.drain_seconds > 0:
            say(f"idle drain for {args.drain_seconds:.0f} s; load average {load_average()}")
            drained = drain(env, database, old_max, args.drain_seconds)
        load["end"] = load_average()
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        return 130
    finally:
        env.cleanup()
        dbs.drop_all()
        sink.stop()
    print(report(args, off, on, load, drained, fill_s, batches))
    print(f"\n(SMTP sink: {sink.kind}; logs in {workdir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
