"""One-line errors for what an operator gets wrong or what is down: a malformed database or
Redis URL is a usage error (exit 2) for every command, an unreachable database exit 3, and an
unreachable Redis one warning line (and one line when it is back) from the long-running
commands, never a traceback."""

from __future__ import annotations

import signal

import pytest

from outbox.connections import redact_url
from tests.chaos.services import OutboxProcess, RedisInstance
from tests.conftest import wait_until
from tests.helpers import one_line_error
from tests.helpers import outbox_cli as outbox
from tests.smtp import free_port

COMMANDS = [
    ("status",),
    ("db", "init"),
    ("connector", "list"),
    ("show", "1"),
    ("run", "--until-idle"),
    ("poll",),
    ("worker",),
]
BAD_DATABASE_URLS = [
    ("postgresql://x:secret@h:notaport/db", "port 'notaport' is not a port number"),
    ("nonsense://", "unknown scheme 'nonsense://'"),
    ("postgress://u:secret@h/db", "unknown scheme 'postgress://'"),
    ("postgresql://u:secret@h/db?sslmode=sometimes", "sslmode 'sometimes' is not one of"),
]


@pytest.mark.parametrize("url, reason", BAD_DATABASE_URLS)
@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_malformed_database_url_is_one_line_and_exit_2(cli_env, command, url, reason):
    line = one_line_error(outbox(cli_env, *command, "--database-url", url, check=False), code=2)
    assert "--database-url" in line and reason in line and "secret" not in line


@pytest.mark.parametrize("url, reason", BAD_DATABASE_URLS[:2])
def test_malformed_database_url_from_the_environment_or_the_group_option(cli_env, url, reason):
    assert reason in one_line_error(outbox(cli_env | {"OUTBOX_DATABASE_URL": url}, "status", check=False), 2)
    assert reason in one_line_error(outbox(cli_env, "--database-url", url, "status", check=False), 2)


@pytest.mark.parametrize("command", [("run",), ("poll",), ("worker",)], ids=" ".join)
@pytest.mark.parametrize("url", ["redis://:secret@h:notaport/0", "nonsense://"])
def test_malformed_redis_url_is_one_line_and_exit_2(cli_env, command, url):
    line = one_line_error(outbox(cli_env, *command, "--redis-url", url, check=False), code=2)
    assert "--redis-url" in line and "secret" not in line


def test_unreachable_database_is_exit_3(cli_env):
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/outbox"
    for command in (("status",), ("connector", "list"), ("db", "init")):
        line = one_line_error(outbox(cli_env, *command, "--database-url", dead, check=False), code=3)
        assert "cannot reach the database" in line


def test_redact_url():
    assert redact_url("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("redis://user:pw@h/0") == "redis://user:***@h/0"
    assert redact_url("redis://h/0") == "redis://h/0"


# -- an unreachable Redis at start-up ----------------------------------------------------------


def _lines(p: OutboxProcess, text: str) -> list[str]:
    return [line for line in p.output().splitlines() if text in line]


def test_poll_says_once_that_it_cannot_reach_redis_and_keeps_running(start):
    dead = f"redis://:secret@127.0.0.1:{free_port()}/0"
    p = start("poll", OUTBOX_REDIS_URL=dead, OUTBOX_LOG_LEVEL="debug")
    # it keeps trying: wait for a few retries after the first warning
    wait_until(lambda: len(_lines(p, "still cannot reach Redis")) >= 2, timeout=30, what="retries")
    assert p.alive()
    [warning] = _lines(p, "[warning")
    assert f"cannot reach Redis at {redact_url(dead)}; retrying" in warning
    assert "secret" not in p.output() and "Traceback" not in p.output()
    p.signal(signal.SIGTERM)
    assert p.proc.wait(timeout=30) == 0, p.output()


@pytest.mark.parametrize(
    "command", [("poll",), ("worker", "--processes", "1"), ("run", "--processes", "2")], ids=" ".join
)
def test_unreachable_redis_at_start_up_is_one_line_per_process_and_its_return_another(start, command):
    server = RedisInstance()
    try:
        server.kill()  # its port, nothing listening
        p = start(*command, OUTBOX_REDIS_URL=server.url)
        processes = 2 if command[0] == "run" else 1
        wait_until(
            lambda: len(_lines(p, f"cannot reach Redis at {server.url}; retrying")) >= processes,
            timeout=30,
            what=f"the warning ({p.output()[-2000:]})",
        )
        server.start()
        wait_until(
            lambda: len(_lines(p, f"reached Redis at {server.url}")) >= processes,
            timeout=60,  # each process looks again at most every 5 s; a loaded CI machine is slow
            what=f"the recovery line ({p.output()[-2000:]})",
        )
        assert len(_lines(p, "cannot reach Redis")) == processes, p.output()
        assert "Traceback" not in p.output()
        if command[0] != "poll":
            wait_until(lambda: p.output().count("worker started") >= processes, what="workers")
        p.signal(signal.SIGTERM)
        assert p.proc.wait(timeout=30) == 0, p.output()
        assert "Traceback" not in p.output()
    finally:
        server.destroy()


def test_library_redis_errors_are_logged_without_traceback():
    """Dramatiq logs a Redis timeout in its consumer as unexpected, with the traceback."""
    import io
    import logging

    import redis

    from outbox import logs

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        logs.one_line_errors(redis.exceptions.RedisError)
        try:
            raise redis.exceptions.TimeoutError("Timeout reading from 127.0.0.1:6379")
        except redis.exceptions.TimeoutError:
            logging.getLogger("dramatiq.worker.ConsumerThread(q)").critical(
                "Consumer %s.", "failed", exc_info=True
            )
        try:
            raise KeyError("other")
        except KeyError:
            logging.getLogger("dramatiq.worker").critical("Something else.", exc_info=True)
    finally:
        root.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "Consumer failed. TimeoutError: Timeout reading from 127.0.0.1:6379"
    assert lines[1] == "Something else." and "Traceback" in lines[2]  # other errors keep theirs


def test_poll_against_a_database_without_the_schema_is_one_line(cli_env, database_url):
    """The poller runs on a thread of `outbox poll`; what ends it still reaches the CLI."""
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA outbox CASCADE")
    proc = outbox(cli_env, "poll", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("outbox: error: the outbox schema is missing")
