"""outbox run / poll / worker."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from outbox.cli.base import (
    check_redis_url_option,
    cli,
    config_option,
    db_option,
    require_current_schema,
)
from outbox.config import Config

# -- running -------------------------------------------------------------------------------


def _runner_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        db_option,
        config_option("--redis-url", "redis_url", callback=check_redis_url_option),
        config_option("--queue", "queue", help="Dramatiq queue name."),
        config_option("--redis-namespace", "redis_namespace", help="Prefix of every Redis key."),
        config_option(
            "--metrics-port", "metrics_port", type=int, help="Serve Prometheus metrics on METRICS_HOST:PORT."
        ),
        config_option(
            "--metrics-host",
            "metrics_host",
            help="Address the metrics endpoint listens on (0.0.0.0 for a Prometheus elsewhere).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _worker_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = config_option(
        "--threads",
        "worker_threads",
        type=click.IntRange(1, 256),
        help="Concurrent broker messages per worker process.",
    )(f)
    # Its default is computed (one per core), so Config fills it in when the flag is not given.
    f = click.option(
        "--processes",
        "worker_processes",
        envvar="OUTBOX_WORKER_PROCESSES",
        show_envvar=True,
        type=click.IntRange(1, 64),
        default=None,
        help="Worker processes (default: one per core, at most 8).",
    )(f)
    return f


def _config(**flags: Any) -> Config:
    return Config(**{k: v for k, v in flags.items() if v is not None})


@cli.command("run")
@_runner_options
@_worker_options
@click.option(
    "--until-idle",
    is_flag=True,
    help="Exit once nothing is due or in flight (later retries and scheduled mail wait in the table).",
)
def run(until_idle: bool, **flags: Any) -> None:
    """Poller and workers together, for one machine."""
    from worker.supervisor import run_all

    config = _config(**flags)
    require_current_schema(config.database_url)
    sys.exit(run_all(config, until_idle=until_idle))


@cli.command("poll")
@_runner_options
def poll(**flags: Any) -> None:
    """Only the poller: claim due rows and hand them to the broker."""
    from worker.runner import run_poller_process

    config = _config(**flags)
    require_current_schema(config.database_url)
    run_poller_process(config)


@cli.command("worker")
@_runner_options
@_worker_options
def worker_cmd(**flags: Any) -> None:
    """Only workers: consume the broker queue and send mail."""
    from worker.supervisor import run_all_workers

    config = _config(**flags)
    require_current_schema(config.database_url)
    sys.exit(run_all_workers(config))


@cli.command("catcher")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=1025, show_default=True)
@click.option(
    "--maildir",
    type=click.Path(file_okay=False),
    required=True,
    help="Where received messages are kept (one .eml file each).",
)
def catcher(host: str, port: int, maildir: str) -> None:
    """A local SMTP catcher that keeps what it receives (for trying things out)."""
    from outbox.catcher import serve

    serve(host, port, maildir)
