"""Fixtures shared by the integration tests that run real `outbox` processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.chaos.services import OutboxProcess


@pytest.fixture
def start(cli_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., OutboxProcess]]:
    """Start `outbox ARGS` processes with the test's environment; all closed afterwards."""
    started: list[OutboxProcess] = []

    def make(*args: str, **env: str) -> OutboxProcess:
        p = OutboxProcess(cli_env | env, *args, log_dir=tmp_path)
        started.append(p)
        return p

    yield make
    for p in started:
        p.close()
