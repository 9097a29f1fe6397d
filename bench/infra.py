"""Plumbing for the benchmark: its own Postgres databases and Redis namespace (created here,
dropped and deleted at the end), machine facts, and RSS sampling of a process tree."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
import redis

PG_ADMIN_DEFAULT = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_DEFAULT = "redis://127.0.0.1:6379/0"
# Never used for data: the benchmark creates and drops its own databases.
SHARED_DATABASES = {"postgres", "test", "root", "template0", "template1"}


def db_url(admin_url: str, dbname: str) -> str:
    return psycopg.conninfo.make_conninfo(admin_url, dbname=dbname)


class Databases:
    """Databases named `outbox_bench_<run>_<label>`; `drop_all` removes every one made."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.prefix = f"outbox_bench_{uuid.uuid4().hex[:8]}"
        self.made: list[str] = []

    def create(self, label: str, template: str | None = None) -> str:
        name = f"{self.prefix}_{label}"
        assert name not in SHARED_DATABASES and re.fullmatch(r"[a-z0-9_]+", name), name
        with psycopg.connect(self.admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            if template:
                admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
            else:
                admin.execute(f'CREATE DATABASE "{name}"')
        if name not in self.made:
            self.made.append(name)
        return name

    def url(self, name: str) -> str:
        return db_url(self.admin_url, name)

    def drop(self, name: str) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if name in self.made:
            self.made.remove(name)

    def drop_all(self) -> None:
        for name in list(reversed(self.made)):
            try:
                self.drop(name)
            except Exception as exc:  # keep dropping the others
                print(f"bench: could not drop database {name}: {exc}", file=sys.stderr)


def clean_redis(url: str, namespace: str) -> int:
    """Delete every key of the benchmark's namespace; returns how many."""
    assert namespace.startswith("outbox-bench-"), namespace
    client = redis.Redis.from_url(url)
    try:
        deleted = 0
        for _ in range(1000):  # bounded: at most 1000 scans of 1000 keys
            keys = list(client.scan_iter(match=f"{namespace}*", count=1000))[:1000]
            if not keys:
                break
            deleted += int(client.delete(*keys))
        return deleted
    finally:
        client.close()


# -- machine facts ---------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_gib() -> str:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _pkg_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _postfix_version() -> str | None:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "postfix"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def machine_facts(admin_url: str, redis_url: str) -> dict[str, str]:
    with psycopg.connect(admin_url) as conn:
        pg = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
    client = redis.Redis.from_url(redis_url)
    try:
        rv = str(client.info("server").get("redis_version", "?"))
    finally:
        client.close()
    facts = {
        "cores": str(os.cpu_count()),
        "cpu": _cpu_model(),
        "memory": _mem_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgres": pg,
        "redis": rv,
        "aiosmtplib": _pkg_version("aiosmtplib"),
        "dramatiq": _pkg_version("dramatiq"),
        "psycopg": _pkg_version("psycopg"),
        "outbox-worker": _pkg_version("outbox-worker"),
    }
    postfix = _postfix_version()
    if postfix:
        facts["postfix (smtp-sink)"] = postfix
    return facts


# -- RSS of a process tree -------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return kids


def tree(pid: int) -> list[int]:
    """`pid` and its descendants (bounded depth)."""
    found, frontier = [pid], [pid]
    for _ in range(4):
        frontier = [c for p in frontier for c in _children(p)]
        found += frontier
        if not frontier:
            break
    return found


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of one process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


@dataclass
class RssSampler:
    """Samples RSS (and CPU time) of every process in a tree every `interval` s (a thread)."""

    root: int
    interval: float = 0.1
    max_seconds: float = 3600.0
    samples: dict[int, list[tuple[float, int]]] = field(default_factory=dict)
    cpu: dict[int, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> RssSampler:
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def sample(self) -> float:
        """Take one sample now; returns the CPU seconds of the whole tree so far."""
        with self._lock:
            now = time.monotonic()
            for pid in tree(self.root):
                rss = rss_bytes(pid)
                if rss is not None:
                    self.samples.setdefault(pid, []).append((now, rss))
                cpu = cpu_seconds(pid)
                if cpu is not None:
                    self.cpu[pid] = cpu
            return sum(self.cpu.values())

    def _loop(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.sample()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def max_per_process(self) -> int:
        return max((rss for s in self.samples.values() for _, rss in s), default=0)

    def process_count(self) -> int:
        return len(self.samples)

    def growth(self, start: float, end: float) -> int:
        """Largest RSS growth of one process between the samples nearest to `start` and `end`
        (monotonic times)."""
        worst = 0
        for s in self.samples.values():
            before = [rss for t, rss in s if t <= start]
            after = [rss for t, rss in s if t <= end]
            if before and after:
                worst = max(worst, after[-1] - before[-1])
        return worst


@contextmanager
def connect(url: str, **kwargs: Any) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(url, autocommit=True, **kwargs) as conn:
        yield conn
