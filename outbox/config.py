"""Process configuration, built once at the edge (CLI) from flags and `OUTBOX_*` env vars,
then passed down. Runtime policy (retries, lease, limits) lives in the database instead
(`outbox.settings`), so operators change it without restarting anything."""

from __future__ import annotations

import os
import socket

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Config(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OUTBOX_", frozen=True, extra="ignore")

    database_url: str = "postgresql://postgres@127.0.0.1:5432/outbox"
    redis_url: str = "redis://localhost:6379/0"
    # Prefix of every Redis key, and the Dramatiq queue name.
    redis_namespace: str = "outbox"
    queue: str = "outbox"
    metrics_port: int | None = None
    # 0.0.0.0 lets Prometheus in another container scrape it; the default keeps it local.
    metrics_host: str = "127.0.0.1"
    # How often the poller refreshes the messages-by-status and queue-lag gauges.
    metrics_refresh_seconds: float = Field(10.0, gt=0)
    # Batches a worker process works on at once (each sends its rows over the connector's pool).
    worker_threads: int = Field(4, ge=1, le=256)
    # One worker process per core by default (the poller runs in the first one).
    worker_processes: int = Field(default_factory=lambda: min(os.cpu_count() or 1, 8), ge=1, le=64)
    poll_interval_seconds: float = Field(1.0, gt=0)
    claim_batch: int = Field(500, ge=1, le=10000)
    # Row ids per broker message, at most: one Redis message per email caps throughput, and
    # each batch costs a claim statement. Under light load a batch holds what was due, often
    # one row.
    dispatch_batch: int = Field(100, ge=1, le=1000)
    # Rows in flight (dispatched + sending) at most: the poller claims no more while this many
    # are with the broker and the workers, so a backlog never outruns its leases.
    max_in_flight: int = Field(5000, ge=1)
    # SIGTERM/SIGINT: how long the processes of `outbox run`/`outbox worker` may take to finish
    # their in-flight sends (all in parallel) before they are killed. Keep it shorter than the
    # orchestrator's grace period (compose: stop_grace_period 30s).
    shutdown_seconds: float = Field(25.0, gt=0)
    local_hostname: str = Field(default_factory=socket.gethostname)
    log_format: str = "console"
    log_level: str = "info"
