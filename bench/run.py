"""The outbox-worker benchmark: one command, everything in the same run on the same machine.

    .venv/bin/python -m bench.run --quick    # seconds; for CI; asserts nothing about speed
    .venv/bin/python -m bench.run --full     # N=3000, median of 3 runs: the numbers
    make bench / make bench-quick

It starts an SMTP sink (Postfix's smtp-sink when installed, else bench/sink.py), measures the
client baselines (raw aiosmtplib; Postfix's smtp-source as the machine's ceiling), django-post-
office (in its own virtualenv, bench/.venv-django, installed from PyPI on first use; skip it
with --no-django), and outbox-worker end to end, and prints one Markdown table with the
machine facts. Every database it uses is its own (outbox_bench_*) and is dropped at the end;
every Redis key is under its own namespace (outbox-bench-*) and is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from bench import outbox_e2e as e2e
from bench.common import POLL_SECONDS
from bench.infra import PG_ADMIN_DEFAULT, REDIS_DEFAULT, Databases, RssSampler, load_average, machine_facts
from bench.sink import Sink, smtp_source_path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DJANGO_VENV = BENCH_DIR / ".venv-django"
DJANGO_REQUIREMENTS = ["Django>=5.2,<6", "django-post-office==3.12.0", "psycopg[binary]>=3.2"]

# Every row of the table, in order (tests/integration/test_bench_quick.py checks them all).
ROW_SINK = "SMTP sink"
ROW_CEILING = "C ceiling: smtp-source, 8 sessions"
ROW_RAW_BYTES = "raw aiosmtplib, 8 conns, pre-rendered bytes"
ROW_RAW_MSG = "raw aiosmtplib, 8 conns, EmailMessage per message"
ROW_DJANGO = "django-post-office send_queued_mail (5 threads, batch 100)"
ROW_OUTBOX = "outbox-worker e2e: `outbox run --until-idle` (default)"
ROW_P1 = "outbox-worker e2e: --processes 1"
ROW_P2 = "outbox-worker e2e: --processes 2"
ROW_P4 = "outbox-worker e2e: --processes 4"
ROW_WARM = "outbox-worker warm: N rows into a running `outbox run`"
ROW_VS_DJANGO = "ratio outbox / django-post-office"
ROW_VS_RAW_MSG = "ratio outbox / raw aiosmtplib EmailMessage"
ROW_VS_RAW_BYTES = "ratio outbox / raw aiosmtplib pre-rendered"
ROW_P50 = "latency insert->sent p50 @ 50 msg/s"
ROW_P99 = "latency insert->sent p99 @ 50 msg/s"
ROW_CLAIM_EMPTY = "claim_due (500 due), no finished rows"
ROW_CLAIM_FULL = "claim_due (500 due), with finished `sent` rows"
ROW_CLAIM_PLAN = "claim plan uses partial index message_due_idx"
ROW_RSS_MAX = "worker RSS, max per process"
ROW_RSS_GROWTH = "worker RSS growth during run"
ROWS = [
    ROW_SINK,
    ROW_CEILING,
    ROW_RAW_BYTES,
    ROW_RAW_MSG,
    ROW_DJANGO,
    ROW_OUTBOX,
    ROW_P1,
    ROW_P2,
    ROW_P4,
    ROW_WARM,
    ROW_VS_DJANGO,
    ROW_VS_RAW_MSG,
    ROW_VS_RAW_BYTES,
    ROW_P50,
    ROW_P99,
    ROW_CLAIM_EMPTY,
    ROW_CLAIM_FULL,
    ROW_CLAIM_PLAN,
    ROW_RSS_MAX,
    ROW_RSS_GROWTH,
]
TABLE_HEADER = "| measurement | result | target | met | notes |"

# Optional extra end-to-end variants (--experiments): product settings changed only through
# flags, environment or the connector row, to show what each is worth.

EXPERIMENTS: list[tuple[str, dict[str, Any]]] = [
    ("OUTBOX_LOG_LEVEL=warning (no per-message log line)", {"extra_env": {"OUTBOX_LOG_LEVEL": "warning"}}),
    ("--threads 32", {"threads": 32}),
    ("OUTBOX_DISPATCH_BATCH=100", {"extra_env": {"OUTBOX_DISPATCH_BATCH": "100"}}),
    ("connector max_connections 8", {"connector_max": 8}),
    (
        "log warning + max_connections 8",
        {"extra_env": {"OUTBOX_LOG_LEVEL": "warning"}, "connector_max": 8},
    ),
]


# Latency at 50 msg/s under settings variants (--experiments).
LATENCY_EXPERIMENTS: list[tuple[str, dict[str, str]]] = [
    ("latency, default (again, for pairing)", {}),
    ("latency, OUTBOX_LOG_LEVEL=warning", {"OUTBOX_LOG_LEVEL": "warning"}),
]


def say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


@dataclass
class Mode:
    name: str
    n: int
    runs: int
    latency_seconds: float
    claim_sent_rows: int
    soak_n: int
    processes: tuple[int, ...] = (1, 2, 4)


QUICK = Mode("quick", n=300, runs=1, latency_seconds=3, claim_sent_rows=100_000, soak_n=0)
FULL = Mode("full", n=3000, runs=3, latency_seconds=20, claim_sent_rows=1_000_000, soak_n=20_000)


@dataclass
class Measured:
    """Runs of one system; the median rate is what is reported."""

    rates: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)  # client CPU per message, per run
    startups: list[float] = field(default_factory=list)
    steady: list[float] = field(default_factory=list)
    notes: str = ""
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float | None:
        return statistics.median(self.rates) if self.rates else None

    @property
    def cpu_median(self) -> float | None:
        return statistics.median(self.cpu_ms) if self.cpu_ms else None


def _rate_text(m: Measured) -> str:
    if m.error:
        return f"not measured: {m.error}"
    if m.median is None:
        return "not measured"
    return f"{m.median:,.0f} msg/s"


def _runs_text(m: Measured) -> str:
    parts = []
    if len(m.rates) > 1:
        parts.append(f"median of {len(m.rates)} ({', '.join(f'{r:,.0f}' for r in m.rates)})")
    if m.cpu_median is not None:
        parts.append(f"client CPU {m.cpu_median:.2f} ms/msg")
    if m.startups:
        parts.append(f"first row done {statistics.median(m.startups):.2f} s after start")
    if m.steady:
        parts.append(f"{statistics.median(m.steady):,.0f} msg/s after that")
    if m.notes:
        parts.append(m.notes)
    return "; ".join(parts)


def _attempt(m: Measured, one_run: Callable[[Measured], None]) -> None:
    """One more run of a system, unless an earlier one failed; a failure is recorded."""
    if m.error:
        return
    try:
        one_run(m)
    except (RuntimeError, subprocess.SubprocessError, psycopg.Error, OSError, ValueError) as exc:
        detail = (
            exc.stderr.strip().splitlines()[-1:] if isinstance(exc, subprocess.CalledProcessError) else ""
        )
        m.error = f"{type(exc).__name__}: {exc} {detail}".strip()


# -- the systems --------------------------------------------------------------------------------


def baseline_run(mode_arg: str, port: int, n: int) -> Callable[[Measured], None]:
    def run(m: Measured) -> None:
        args = [sys.executable, "-m", "bench.baselines", "--mode", mode_arg]
        args += ["--port", str(port), "--n", str(n)]
        src = smtp_source_path()
        if mode_arg == "smtp-source" and src:
            args += ["--smtp-source", src]
        out = subprocess.run(args, capture_output=True, text=True, timeout=300, check=True, cwd=REPO)
        result = json.loads(out.stdout)
        m.rates.append(result["rate"])
        m.cpu_ms.append(result["cpu_ms_per_msg"])

    return run


def ensure_django_venv() -> Path:
    python = DJANGO_VENV / "bin" / "python"
    marker = DJANGO_VENV / ".bench-installed"
    if not marker.exists():
        say(f"installing {', '.join(DJANGO_REQUIREMENTS)} into {DJANGO_VENV} (first run only)")
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(DJANGO_VENV)], check=True, timeout=300)
        subprocess.run(
            [str(DJANGO_VENV / "bin" / "pip"), "install", "-q", *DJANGO_REQUIREMENTS],
            check=True,
            timeout=900,
            stdout=subprocess.DEVNULL,
        )
        marker.write_text(" ".join(DJANGO_REQUIREMENTS) + "\n")
    return python


def django_setup(m: Measured) -> Path | None:
    try:
        python = ensure_django_venv()
        version = subprocess.run(
            [str(python), "-m", "bench.django_po", "version"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            cwd=REPO,
        ).stdout.strip()
    except (subprocess.SubprocessError, OSError) as exc:
        m.error = f"could not set up django-post-office ({type(exc).__name__}: {exc})"
        return None
    m.notes = version
    return python


def django_run(python: Path, dbs: Databases, port: int, n: int, workdir: Path) -> Callable[[Measured], None]:
    info = psycopg.conninfo.conninfo_to_dict(dbs.admin_url)
    pg = ["--pg-host", str(info.get("host", "127.0.0.1")), "--pg-port", str(info.get("port", "5432"))]
    pg += ["--pg-user", str(info.get("user", "postgres"))]

    def run(m: Measured) -> None:
        k = len(m.rates) + 1
        name = dbs.create(f"django{k}")
        try:
            subprocess.run(
                [str(python), "-m", "bench.django_po", "prepare", "--db", name, "--n", str(n), *pg],
                check=True,
                timeout=300,
                cwd=REPO,
                capture_output=True,
            )
            log_path = workdir / f"django{k}.log"
            args = [str(python), "-m", "bench.django_po", "send", "--db", name, "--port", str(port), *pg]
            args += ["--lockfile", str(workdir / f"post-office-{k}")]
            with open(log_path, "wb") as log, psycopg.connect(dbs.url(name), autocommit=True) as conn:
                t0_wall = time.time()
                proc = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=log)
                sampler = RssSampler(proc.pid).start()
                warm_cpu, warm_sent, done_cpu = 0.0, -1, 0.0
                try:
                    deadline = time.monotonic() + max(120.0, n / 10)
                    for _ in range(100_000):  # bounded; the deadline ends it sooner
                        sent, failed = conn.execute(
                            "SELECT count(*) FILTER (WHERE status = 0), count(*) FILTER (WHERE status = 1)"
                            " FROM post_office_email"
                        ).fetchone()  # type: ignore[misc]
                        if warm_sent < 0 and sent >= max(1, n // 10):
                            warm_cpu, warm_sent = sampler.sample(), sent
                        if sent + failed >= n:
                            done_cpu = sampler.sample()
                            break
                        if proc.poll() is not None:
                            raise RuntimeError(f"send_queued_mail exited {proc.returncode}, {sent}/{n} sent")
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"timed out with {sent}/{n} sent")
                        time.sleep(POLL_SECONDS)
                    if failed:
                        raise RuntimeError(f"{failed} of {n} emails failed; see {log_path}")
                    first, last = conn.execute(
                        "SELECT extract(epoch FROM min(last_updated)), extract(epoch FROM max(last_updated))"
                        " FROM post_office_email"
                    ).fetchone()  # type: ignore[misc]
                    proc.wait(timeout=60)
                finally:
                    sampler.stop()
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait(timeout=10)
            m.rates.append(n / (float(last) - t0_wall))
            m.startups.append(float(first) - t0_wall)
            if 0 <= warm_sent < n:
                m.cpu_ms.append((done_cpu - warm_cpu) * 1000 / (n - warm_sent))
        finally:
            dbs.drop(name)

    return run


def outbox_run(env: e2e.Env, n: int, results: list[e2e.Throughput] | None = None, **kwargs: Any):  # type: ignore[no-untyped-def]
    def run(m: Measured) -> None:
        r = e2e.throughput(env, n, **kwargs)
        m.rates.append(r.rate)
        m.startups.append(r.startup)
        m.steady.append(r.steady_rate)
        if r.cpu_ms_per_msg is not None:
            m.cpu_ms.append(r.cpu_ms_per_msg)
        if results is not None:
            results.append(r)

    return run


def _pass(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "NO")


# -- the report ---------------------------------------------------------------------------------


@dataclass
class Report:
    mode: Mode
    facts: dict[str, str]
    rows: dict[str, tuple[str, str, str, str]] = field(default_factory=dict)
    plan: str = ""
    profile: list[str] = field(default_factory=list)
    experiments: list[tuple[str, str, str]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    # Measurements that failed (django-post-office excepted): the run exits 1.
    failures: list[str] = field(default_factory=list)

    def check(self, name: str, m: Measured) -> None:
        if m.error:
            self.failures.append(f"{name}: {m.error}")

    def row(self, name: str, result: str, target: str = "", met: bool | None = None, notes: str = "") -> None:
        self.rows[name] = (result, target, _pass(met), notes)

    def render(self) -> str:
        out = [f"## outbox-worker benchmark ({self.mode.name}: N={self.mode.n}, runs={self.mode.runs})", ""]
        out += ["| machine | |", "|---|---|"]
        out += [f"| {k} | {v} |" for k, v in self.facts.items()]
        out += ["", TABLE_HEADER, "|---|---|---|---|---|"]
        for name in ROWS:
            result, target, met, notes = self.rows.get(name, ("not measured", "", "-", "skipped"))
            out.append(f"| {name} | {result} | {target} | {met} | {notes} |")
        if self.experiments:
            out += ["", "| experiment (default run plus one change) | result | notes |", "|---|---|---|"]
            out += [f"| {a} | {b} | {c} |" for a, b, c in self.experiments]
        if self.plan:
            out += [
                "",
                "claim_due plan (EXPLAIN ANALYZE, with the finished rows):",
                "",
                "```",
                self.plan,
                "```",
            ]
        if self.profile:
            out += ["", "```", *self.profile, "```"]
        return "\n".join(out)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _ratio_row(report: Report, name: str, a: Measured, b: Measured, target: float | None, what: str) -> None:
    r = ratio(a.median, b.median)
    if r is None:
        missing = what if b.median is None else "outbox-worker"
        report.row(name, "n/a", f">= {target:.1f}x" if target else "", None, f"{missing} not measured")
        return
    report.row(
        name,
        f"{r:.2f}x",
        f">= {target:.1f}x" if target else "(info)",
        (r >= target) if target else None,
        f"{a.median:,.0f} / {b.median:,.0f} msg/s",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--quick", action="store_true", help="small N, one run each; seconds")
    which.add_argument("--full", action="store_true", help="N=3000, median of 3 runs")
    parser.add_argument("--no-django", action="store_true", help="skip django-post-office (no installs)")
    parser.add_argument("--n", type=int, help="messages per throughput run")
    parser.add_argument("--runs", type=int, help="runs per system (the median is reported)")
    parser.add_argument("--soak-n", type=int, help="messages of the RSS soak run (0: none)")
    parser.add_argument("--claim-rows", type=int, help="finished rows for the claim timing")
    parser.add_argument("--sink", choices=["auto", "smtp-sink", "builtin"], default="auto")
    parser.add_argument("--experiments", action="store_true", help="also time a few settings variants")
    parser.add_argument("--profile", action="store_true", help="also profile one default run with py-spy")
    parser.add_argument(
        "--pg-admin-url",
        default=os.environ.get("OUTBOX_BENCH_PG", PG_ADMIN_DEFAULT),
        help="a Postgres URL allowed to CREATE/DROP DATABASE (env OUTBOX_BENCH_PG)",
    )
    parser.add_argument("--redis-url", default=os.environ.get("OUTBOX_BENCH_REDIS", REDIS_DEFAULT))
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="first wait up to SECONDS for the 1-minute load average to drop below 1",
    )
    parser.add_argument("--json", type=Path, help="also write every number as JSON here")
    parser.add_argument("--keep-logs", action="store_true", help="keep the workers' logs")
    args = parser.parse_args(argv)

    base = FULL if args.full else QUICK
    mode = Mode(
        base.name,
        n=args.n or base.n,
        runs=args.runs or base.runs,
        latency_seconds=base.latency_seconds,
        claim_sent_rows=args.claim_rows if args.claim_rows is not None else base.claim_sent_rows,
        soak_n=args.soak_n if args.soak_n is not None else base.soak_n,
    )
    _require_loopback(args.pg_admin_url, args.redis_url)

    if args.wait_quiet > 0:
        deadline = time.monotonic() + args.wait_quiet
        while os.getloadavg()[0] >= 1.0 and time.monotonic() < deadline:
            say(f"waiting for a quiet machine: load average {load_average()}")
            time.sleep(min(15.0, max(0.1, deadline - time.monotonic())))
    # SIGTERM ends the run through the same clean-up as Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    workdir = Path(tempfile.mkdtemp(prefix="outbox-bench-"))
    dbs = Databases(args.pg_admin_url)
    sink: Sink | None = None
    started = time.monotonic()
    try:
        facts = machine_facts(args.pg_admin_url, args.redis_url)
        report = Report(mode, facts)
        sink = Sink.start(args.sink)
        facts["SMTP sink"] = sink.kind
        facts["load average at start (1/5/15 min)"] = load_average()
        say(f"sink: {sink.kind} on 127.0.0.1:{sink.port}; logs in {workdir}")
        report.row(ROW_SINK, sink.kind, notes=f"127.0.0.1:{sink.port}; every system sends here")
        _measure(report, mode, args, dbs, sink, workdir, _ENVS.append)
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        return 130
    finally:
        for e in _ENVS:
            e.cleanup()
        if sink is not None:
            sink.stop()
        dbs.drop_all()
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
    report.data["elapsed_seconds"] = round(time.monotonic() - started, 1)
    facts["load average at end (1/5/15 min)"] = load_average()
    print(report.render())
    print(f"\n(benchmark took {report.data['elapsed_seconds']:.0f} s)")
    for failure in report.failures:
        say(f"FAILED {failure}")
    if args.json:
        args.json.write_text(
            json.dumps(report.data | {"facts": facts, "rows": report.rows}, indent=2, default=str)
        )
    return 1 if report.failures else 0


_ENVS: list[e2e.Env] = []


def _require_loopback(*urls: str) -> None:
    """Load goes only to this machine."""
    for url in urls:
        if url.startswith("redis"):
            host = url.split("//", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1].rsplit(":", 1)[0]
        else:
            host = str(psycopg.conninfo.conninfo_to_dict(url).get("host", "127.0.0.1"))
        if host not in ("127.0.0.1", "localhost", "::1", "[::1]") and not host.startswith("/"):
            raise SystemExit(f"bench: refusing non-local host {host!r}: load goes only to 127.0.0.1")


def _measure(
    report: Report,
    mode: Mode,
    args: argparse.Namespace,
    dbs: Databases,
    sink: Sink,
    workdir: Path,
    register: Callable[[e2e.Env], None],
) -> None:
    n, runs = mode.n, mode.runs
    data = report.data
    data["mode"] = asdict(mode)
    env = e2e.Env(dbs=dbs, redis_url=args.redis_url, sink_port=sink.port, workdir=workdir)
    register(env)
    e2e.make_template(env)

    # -- throughput: every system once per round, rounds interleaved, so that whatever else
    # -- the machine is doing weighs on all of them alike -----------------------------------
    ceiling, raw_bytes, raw_msg, django, outbox = Measured(), Measured(), Measured(), Measured(), Measured()
    # the default `outbox run` starts one worker process per core (at most 8)
    default_p = min(os.cpu_count() or 1, 8)
    scaling: dict[int, Measured] = {p: Measured() for p in mode.processes if p != default_p}
    default_runs: list[e2e.Throughput] = []
    systems: list[tuple[str, Measured, Callable[[Measured], None]]] = []
    if smtp_source_path():
        systems.append(("C ceiling", ceiling, baseline_run("smtp-source", sink.port, max(n, 1000) * 10)))
    systems.append(("raw aiosmtplib pre-rendered", raw_bytes, baseline_run("prerendered", sink.port, n)))
    systems.append(("raw aiosmtplib EmailMessage", raw_msg, baseline_run("emailmessage", sink.port, n)))
    if args.no_django:
        django.error = "skipped (--no-django)"
    else:
        python = django_setup(django)
        if python is not None:
            systems.append(("django-post-office", django, django_run(python, dbs, sink.port, n, workdir)))
    systems.append(("outbox-worker default", outbox, outbox_run(env, n, default_runs)))
    for p, m in scaling.items():
        systems.append((f"outbox-worker --processes {p}", m, outbox_run(env, n, processes=p)))
    for k in range(runs):
        for name, m, one_run in systems:
            say(f"round {k + 1}/{runs}: {name} (N={n}); load average {load_average()}")
            _attempt(m, one_run)

    if ceiling.rates or ceiling.error:
        report.row(
            ROW_CEILING, _rate_text(ceiling), notes=_runs_text(ceiling) or "C client, connections reused"
        )
    else:
        report.row(ROW_CEILING, "n/a", notes="smtp-source not installed (apt-get install postfix)")
    report.row(ROW_RAW_BYTES, _rate_text(raw_bytes), notes=_runs_text(raw_bytes))
    report.row(ROW_RAW_MSG, _rate_text(raw_msg), notes=_runs_text(raw_msg))
    if args.no_django:
        report.row(ROW_DJANGO, "skipped", notes="--no-django")
    else:
        report.row(
            ROW_DJANGO, _rate_text(django), notes=_runs_text(django) + "; process start -> last row sent"
        )
    report.row(ROW_OUTBOX, _rate_text(outbox), notes=_runs_text(outbox) + "; process start -> last row sent")
    for name, m in (
        (ROW_RAW_BYTES, raw_bytes),
        (ROW_RAW_MSG, raw_msg),
        (ROW_OUTBOX, outbox),
        *((f"--processes {p}", m) for p, m in scaling.items()),
    ):
        report.check(name, m)
    # the default's point on the curve is the default runs
    scaling[default_p] = outbox
    for p, row in ((1, ROW_P1), (2, ROW_P2), (4, ROW_P4)):
        if p in scaling:
            same = " (the default runs)" if p == default_p else ""
            report.row(
                row, _rate_text(scaling[p]), notes=f"{os.cpu_count()} cores{same}; " + _runs_text(scaling[p])
            )
    for key, m in (
        ("ceiling", ceiling),
        ("raw_bytes", raw_bytes),
        ("raw_msg", raw_msg),
        ("django", django),
        ("outbox", outbox),
        *((f"outbox_p{p}", m) for p, m in scaling.items()),
    ):
        data[key] = asdict(m)

    _ratio_row(report, ROW_VS_DJANGO, outbox, django, 2.0, "django-post-office")
    _ratio_row(report, ROW_VS_RAW_MSG, outbox, raw_msg, 1.0, "raw aiosmtplib EmailMessage")
    _ratio_row(report, ROW_VS_RAW_BYTES, outbox, raw_bytes, None, "raw aiosmtplib pre-rendered")

    # -- latency at 50 msg/s, then a burst into the warm pipeline ------------------------------
    say(f"latency at 50 msg/s for {mode.latency_seconds:.0f} s; load average {load_average()}")
    try:
        lat = e2e.latency(env, rate=50, seconds=mode.latency_seconds, warm_n=n)
        data["latency"] = asdict(lat)
        note = f"{lat.count} rows at {lat.achieved_rate:.1f} msg/s offered; p90 {lat.p90 * 1000:.1f} ms"
        note += (
            f"; insert->worker claim {lat.to_claim_p50 * 1000:.1f} ms,"
            f" claim->sent {lat.claim_to_sent_p50 * 1000:.1f} ms"
        )
        report.row(ROW_P50, f"{lat.p50 * 1000:.1f} ms", "<= 20 ms", lat.p50 <= 0.020, note)
        report.row(
            ROW_P99,
            f"{lat.p99 * 1000:.1f} ms",
            "<= 100 ms",
            lat.p99 <= 0.100,
            f"max {lat.max * 1000:.1f} ms; insert->worker claim p99 {lat.to_claim_p99 * 1000:.1f} ms,"
            f" claim->sent p99 {lat.claim_to_sent_p99 * 1000:.1f} ms",
        )
        if lat.warm is not None:
            w = lat.warm
            cpu = f"; client CPU {w.cpu_ms_per_msg:.2f} ms/msg" if w.cpu_ms_per_msg else ""
            report.row(
                ROW_WARM,
                f"{w.rate:,.0f} msg/s",
                notes=f"N={w.n} in one INSERT; commit -> last sent {w.seconds:.2f} s (one run){cpu}",
            )
    except (RuntimeError, psycopg.Error, OSError, subprocess.SubprocessError) as exc:
        report.failures.append(f"latency: {exc}")
        report.row(ROW_P50, f"not measured: {exc}", "<= 20 ms")
        report.row(ROW_P99, "not measured", "<= 100 ms")
        report.row(ROW_WARM, "not measured")

    # -- claim timing -------------------------------------------------------------------------
    say(f"claim timing with {mode.claim_sent_rows:,} sent rows")
    claim = e2e.claim_timing(env, sent_rows=mode.claim_sent_rows)
    data["claim"] = asdict(claim)
    report.row(
        ROW_CLAIM_EMPTY,
        f"{claim.empty_ms:.2f} ms",
        notes=f"median of 30, each rolled back; nothing due: {claim.empty_idle_ms:.2f} ms",
    )
    report.row(
        ROW_CLAIM_FULL,
        f"{claim.full_ms:.2f} ms ({claim.ratio:.2f}x)",
        "<= 1.5x empty",
        claim.ratio <= 1.5,
        f"{claim.sent_rows:,} sent rows (loaded + VACUUM ANALYZE in {claim.load_seconds:.0f} s);"
        f" nothing due: {claim.full_idle_ms:.2f} ms; timed alternately with the empty table",
    )
    report.row(ROW_CLAIM_PLAN, "yes" if claim.uses_partial_index else "NO", "yes", claim.uses_partial_index)
    report.plan = claim.plan

    # -- RSS ------------------------------------------------------------------------------------
    rss_source = default_runs
    rss_what = f"default runs (N={n})"
    if mode.soak_n:
        say(f"RSS soak: one default run of {mode.soak_n:,} messages; load average {load_average()}")
        soak = Measured()
        soak_runs: list[e2e.Throughput] = []
        _attempt(soak, outbox_run(env, mode.soak_n, soak_runs, label="soak"))
        report.check("RSS soak", soak)
        data["soak"] = asdict(soak)
        if soak_runs:
            rss_source = soak_runs
            rss_what = f"soak run of {mode.soak_n:,} at {soak.median:,.0f} msg/s"
    if rss_source:
        worst = max(rss_source, key=lambda r: r.rss_max)
        growth = max(r.rss_growth for r in rss_source)
        report.row(
            ROW_RSS_MAX,
            f"{e2e.mib(worst.rss_max):.0f} MiB",
            "<= 150 MB",
            worst.rss_max <= 150e6,
            f"{rss_what}; VmRSS of `outbox run` and children every 100 ms",
        )
        report.row(
            ROW_RSS_GROWTH,
            f"{e2e.mib(growth):+.1f} MiB",
            "no growth",
            None,
            f"{rss_what}; largest growth of one process from 10% of rows sent to the last",
        )

    # -- optional: settings variants (each paired with a default run) and a profile ----------
    if args.experiments:
        # Each round: one default run, then every variant; ratios are to that round's default.
        variants = [(label, Measured(), kwargs) for label, kwargs in EXPERIMENTS]
        paired = Measured()
        for k in range(runs):
            say(f"experiment round {k + 1}/{runs}: default; load average {load_average()}")
            _attempt(paired, outbox_run(env, n, label="exp"))
            for label, m, kwargs in variants:
                say(f"experiment round {k + 1}/{runs}: {label}")
                before = len(m.rates)
                _attempt(m, outbox_run(env, n, label="exp", **_experiment_kwargs(kwargs)))
                if len(m.rates) > before and len(paired.rates) == k + 1:
                    m.extra.setdefault("ratios", []).append(m.rates[-1] / paired.rates[-1])
        report.experiments.append(("default (paired runs)", _rate_text(paired), _runs_text(paired)))
        for label, extra in LATENCY_EXPERIMENTS:
            say(f"latency experiment: {label}")
            try:
                lat = e2e.latency(env, rate=50, seconds=mode.latency_seconds, extra_env=extra)
            except (RuntimeError, psycopg.Error, OSError, subprocess.SubprocessError) as exc:
                report.experiments.append((label, f"not measured: {exc}", ""))
                continue
            data.setdefault("latency_experiments", {})[label] = asdict(lat)
            report.experiments.append(
                (
                    label,
                    f"p50 {lat.p50 * 1000:.1f} ms, p99 {lat.p99 * 1000:.1f} ms",
                    f"insert->worker claim p50 {lat.to_claim_p50 * 1000:.1f} ms / p99"
                    f" {lat.to_claim_p99 * 1000:.1f} ms; claim->sent p50 {lat.claim_to_sent_p50 * 1000:.1f}"
                    f" ms / p99 {lat.claim_to_sent_p99 * 1000:.1f} ms",
                )
            )
        for label, m, _ in variants:
            ratios = m.extra.get("ratios", [])
            r = f"{statistics.median(ratios):.2f}x the same round's default; " if ratios else ""
            report.experiments.append((label, _rate_text(m), r + _runs_text(m)))
            data.setdefault("experiments", {})[label] = asdict(m)
        data["experiments_default"] = asdict(paired)
    if args.profile:
        from bench import profile

        say("profiling one default run with py-spy")
        raw = workdir / "profile.txt"
        keep = BENCH_DIR / "results" / f"profile-{time.strftime('%Y%m%d-%H%M%S')}.txt"
        m = Measured()
        try:
            _attempt(m, outbox_run(env, n, label="prof", wrapper=profile.record_wrapper(raw)))
            if raw.exists():
                keep.parent.mkdir(exist_ok=True)
                shutil.copy(raw, keep)
                report.profile = [
                    f"profiled run (py-spy overhead included): {_rate_text(m)}",
                    *profile.summarise(keep).lines(),
                ]
            else:
                report.profile = [f"py-spy wrote no profile ({m.error or 'no output'})"]
        except (subprocess.SubprocessError, OSError) as exc:
            report.profile = [f"profile not taken: {exc}"]


def _experiment_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    kwargs = {k: v for k, v in spec.items() if k != "connector_max"}
    if "connector_max" in spec:
        kwargs["pre_sql"] = f"UPDATE outbox.connector SET max_connections = {int(spec['connector_max'])}"
    return kwargs


if __name__ == "__main__":
    if platform.system() != "Linux":
        print("bench: Linux only (reads /proc for RSS)", file=sys.stderr)
    raise SystemExit(main())
