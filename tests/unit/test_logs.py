"""Logs never carry what a failing frame held: tracebacks are plain, without local variables."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = """
from outbox import logs
logs.configure(fmt={fmt!r})
log = logs.get("outbox.test")

def connect():
    password = "s3cret-local-value"
    raise ConnectionError("login refused")

try:
    connect()
except ConnectionError:
    log.exception("delivery failed unexpectedly", message=7)
"""


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_a_logged_traceback_shows_no_local_variables(fmt):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(fmt=fmt)], capture_output=True, text=True, timeout=60, check=True
    )
    out = proc.stdout + proc.stderr
    assert "s3cret-local-value" not in out, out
    assert "Traceback (most recent call last)" in out and "ConnectionError: login refused" in out, out
    if fmt == "json":
        [record] = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert record["event"] == "delivery failed unexpectedly" and "exception" in record


def test_the_console_renderer_formats_exceptions_plainly():
    """Rich and better-exceptions, when installed, would be the default and show locals."""
    import structlog

    from outbox import logs

    before = structlog.get_config()
    logs.configure(fmt="console")
    try:
        [renderer] = [
            p for p in structlog.get_config()["processors"] if isinstance(p, structlog.dev.ConsoleRenderer)
        ]
        assert renderer._exception_formatter is structlog.dev.plain_traceback
    finally:
        structlog.configure(**before)
