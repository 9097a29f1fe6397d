"""Provider limits (issue 18): what the rate limiter costs, and how exactly it holds a rate.

    .venv/bin/python -m bench.limits [--n 2000] [--rate 200 [1000 …]] [--runs 3]

End to end, like bench.run (its template, sink and `outbox run --until-idle`; each run in its
own database and Redis namespace, dropped after): N messages through the sink's connector
1. without a rate limit, 2. with one that never binds (1000000/s), credits for many messages
per Redis round trip (the default), 2b. the same with one call per message
(OUTBOX_RATE_LIMIT_CREDITS=0), and 3. with `--rate` per second; prints the throughput of 1, 2 and 2b (the
limiter's overhead) and the achieved rate of 3 (first to last `sent_at`) against the
configured one, and the client CPU per message (the `outbox run` process tree) of 1, 2 and 2b:
on a shared machine the CPU per message is steadier than the throughput. Prints figures;
asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from bench import outbox_e2e as e2e
from bench.infra import PG_ADMIN_DEFAULT, REDIS_DEFAULT, Databases
from bench.sink import Sink


def _limit(spec: str | None) -> str:
    value = "{}" if spec is None else "{" + spec + "}"
    return f"UPDATE outbox.connector SET rate_limits = '{value}'"


def _ms(run: e2e.Throughput) -> float | None:
    return round(run.cpu_ms_per_msg, 3) if run.cpu_ms_per_msg is not None else None


def _cpu(runs: list[e2e.Throughput]) -> float:
    """Median client CPU per message (the `outbox run` tree, after the first 10 %)."""
    return statistics.median(r.cpu_ms_per_msg or 0.0 for r in runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=2000, help="messages per run")
    parser.add_argument(
        "--rate", type=int, nargs="+", default=[200], help="the binding limits, messages per second"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of the overhead pair (median)")
    parser.add_argument("--pg-admin-url", default=os.environ.get("OUTBOX_BENCH_PG", PG_ADMIN_DEFAULT))
    parser.add_argument("--redis-url", default=os.environ.get("OUTBOX_BENCH_REDIS", REDIS_DEFAULT))
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="outbox-bench-limits-"))
    dbs = Databases(args.pg_admin_url)
    sink = Sink.start("auto")
    env = e2e.Env(dbs=dbs, redis_url=args.redis_url, sink_port=sink.port, workdir=workdir)
    try:
        e2e.make_template(env)
        free, unbound, single = [], [], []
        for _ in range(args.runs):  # interleaved, so drift on the machine hits all alike
            free.append(e2e.throughput(env, args.n, pre_sql=_limit(None), label="free"))
            unbound.append(e2e.throughput(env, args.n, pre_sql=_limit("1000000/s"), label="unbound"))
            single.append(
                e2e.throughput(
                    env,
                    args.n,
                    pre_sql=_limit("1000000/s"),
                    label="single",
                    extra_env={"OUTBOX_RATE_LIMIT_CREDITS": "0"},
                )
            )
        f, u, s1 = (statistics.median(r.steady_rate for r in runs) for runs in (free, unbound, single))
        cf, cu, cs = (_cpu(runs) for runs in (free, unbound, single))
        for name, rate, cpu, runs in (
            ("no rate limit:          ", f, cf, free),
            ("1000000/s, credits:     ", u, cu, unbound),
            ("1000000/s, one per call:", s1, cs, single),
        ):
            print(
                f"{name}   {rate:8.0f} msg/s  (median: {[round(r.steady_rate) for r in runs]}); "
                f"client CPU {cpu:.3f} ms/msg (median: {[_ms(r) for r in runs]})"
            )
        print(f"limiter overhead:          {100 * (f - u) / f:8.1f} % of throughput (credits)")
        print(f"                           {100 * (f - s1) / f:8.1f} % (one call per message)")
        print(f"client CPU per message:    {100 * (cu - cf) / cf:+8.1f} % (credits)")
        print(f"                           {100 * (cs - cf) / cf:+8.1f} % (one call per message)")
        for name, runs in (("credits", unbound), ("one call per message", single)):
            pairs = [_ms(r) / _ms(f) - 1 for f, r in zip(free, runs, strict=True) if _ms(r) and _ms(f)]
            print(
                f"  {name}, each pass against its own no-limit run: "
                f"{[f'{100 * p:+.1f} %' for p in pairs]}, median {100 * statistics.median(pairs):+.1f} %"
            )
        for rate in args.rate:
            bound = e2e.throughput(
                env, args.n, pre_sql=_limit(f"{rate}/s"), label="bound", timeout=args.n / rate * 3 + 60
            )
            achieved = bound.steady_rate
            print(
                f"{rate}/s over {args.n} messages: achieved {achieved:.1f} msg/s "
                f"({100 * (achieved - rate) / rate:+.1f} % against the limit)"
            )
    finally:
        env.cleanup()
        dbs.drop_all()
        sink.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
