"""The benchmark harness runs end to end in quick mode and prints its whole table.

A benchmark is not a timed test: nothing here asserts a speed. django-post-office is skipped
(--no-django) so the test installs nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.run import ROWS, TABLE_HEADER
from tests.conftest import PG_ADMIN, REDIS_URL

ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_prints_every_row() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env |= {"OUTBOX_BENCH_PG": PG_ADMIN, "OUTBOX_BENCH_REDIS": REDIS_URL}
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--no-django"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert TABLE_HEADER in lines
    for row in ROWS:
        matching = [line for line in lines if line.startswith(f"| {row} |")]
        assert matching, f"row missing from the table: {row}\n{result.stdout}"
    assert "| django-post-office send_queued_mail (5 threads, batch 100) | skipped |" in result.stdout
    # Machine facts.
    for fact in ("cores", "python", "postgres", "redis"):
        assert any(line.startswith(f"| {fact} | ") for line in lines), fact
