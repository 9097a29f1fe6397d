"""Helpers shared by the integration tests: the `outbox` command as a user runs it, its
one-line errors, and a System Default Gateway pointing at a test SMTP server."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import psycopg

from outbox.admin import connectors
from outbox.admin.connectors import NewConnector


def outbox_cli(
    env: dict[str, str], *args: str, input: str | None = None, stdin: Any = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run `outbox ARGS` in a child process; with `check`, fail the test on a non-zero exit."""
    proc = subprocess.run(
        [sys.executable, "-m", "outbox.cli", *args],
        env=env,
        input=input,
        stdin=stdin if input is None else None,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"outbox {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc


def one_line_error(proc: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The command failed with `code` and exactly one `outbox: error:` line, no traceback."""
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("outbox: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def add_gateway(
    db: psycopg.Connection[Any], server: Any, name: str = "gw", *, actor: str | None = None, **kw: Any
) -> None:
    """Register the System Default Gateway `name` for the test SMTP `server`."""
    connectors.add(
        db,
        NewConnector(
            name=name,
            direction="outgoing",
            address=f"{name}@relay.example",
            host="localhost",
            port=server.port,
            default_gateway=True,
            **kw,
        ),
        actor=actor,
    )
