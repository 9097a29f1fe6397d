"""Provider limits on the command line (issue 18): `connector add|update` take them, `none`
clears one, bad values are one line, `connector list` shows them."""

from __future__ import annotations

import json

import pytest

from tests.helpers import outbox_cli as outbox

ADD = ["connector", "add", "m365", "--address", "m365@example.com", "--host", "localhost", "--port", "2525"]


def listed(env):
    return {c["name"]: c for c in json.loads(outbox(env, "connector", "list", "--json").stdout)}


def test_limits_are_stored_shown_and_cleared(cli_env):
    outbox(
        cli_env,
        *ADD,
        "--rate-limit",
        "30/min",
        "--rate-limit",
        "10000/day",
        "--max-recipients",
        "500",
        "--max-messages-per-connection",
        "100",
        "--max-connections",
        "3",
    )
    limits = listed(cli_env)["m365"]["limits"]
    assert limits == {
        "rate_limits": ["30/min", "10000/day"],
        "max_connections": 3,
        "max_recipients": 500,
        "max_messages_per_connection": 100,
    }
    table = outbox(cli_env, "connector", "list", "--wide").stdout
    assert "30/min 10000/day conn 3 rcpt 500 msg/conn 100" in table

    outbox(cli_env, "connector", "update", "m365", "--rate-limit", "10/s", "--max-recipients", "none")
    limits = listed(cli_env)["m365"]["limits"]
    assert limits["rate_limits"] == ["10/s"] and limits["max_recipients"] is None
    assert limits["max_messages_per_connection"] == 100  # not given: kept

    done = outbox(cli_env, "connector", "update", "m365", "--rate-limit", "none").stdout
    assert "limits" in done
    assert listed(cli_env)["m365"]["limits"]["rate_limits"] == []

    outbox(cli_env, "connector", "update", "m365", "--max-connections", "none")
    assert listed(cli_env)["m365"]["limits"]["max_connections"] is None  # no cap across workers
    outbox(cli_env, "connector", "update", "m365", "--max-connections", "2")
    assert listed(cli_env)["m365"]["limits"]["max_connections"] == 2


def test_without_max_connections_there_is_no_cap_across_workers(cli_env):
    outbox(cli_env, *ADD)
    assert listed(cli_env)["m365"]["limits"]["max_connections"] is None
    assert "conn" not in outbox(cli_env, "connector", "list", "--wide").stdout


@pytest.mark.parametrize(
    "args",
    [
        ["--rate-limit", "30/week"],
        ["--rate-limit", "0/s"],
        ["--rate-limit", "lots"],
        ["--max-recipients", "0"],
        ["--max-recipients", "none"],  # nothing to clear when adding
        ["--max-messages-per-connection", "-1"],
        ["--max-connections", "101"],
        ["--max-connections", "none"],  # nothing to clear when adding
    ],
)
def test_bad_limits_are_refused_in_one_line(cli_env, db, args):
    proc = outbox(cli_env, *ADD, *args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if "Invalid value" in ln], proc.stderr
    assert db.execute("SELECT count(*) FROM outbox.connector").fetchone()[0] == 0


def test_rate_limit_none_with_another_is_refused(cli_env, db):
    outbox(cli_env, *ADD, "--rate-limit", "5/s")
    proc = outbox(
        cli_env, "connector", "update", "m365", "--rate-limit", "none", "--rate-limit", "1/s", check=False
    )
    assert proc.returncode == 2 and "give it alone" in proc.stderr
    assert listed(cli_env)["m365"]["limits"]["rate_limits"] == ["5/s"]


def test_the_schema_refuses_a_malformed_rate_limit(db):
    import psycopg

    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute(
            "INSERT INTO outbox.connector (name, direction, address, host, port, rate_limits) "
            "VALUES ('x', 'outgoing', 'x@example.com', 'localhost', 25, '{30/week}')"
        )


def test_usage_is_a_question_mark_when_redis_cannot_be_reached(cli_env):
    outbox(cli_env, *ADD, "--rate-limit", "30/min", "--max-connections", "3")
    env = cli_env | {"OUTBOX_REDIS_URL": "redis://127.0.0.1:1/0"}
    proc = outbox(env, "connector", "list")
    assert proc.returncode == 0
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("m365"))
    assert "? of 30/min, ? of 3 conn" in line
    usage = listed(env)["m365"]["usage"]
    assert usage == {
        "rate_limits": [{"limit": "30/min", "window_seconds": 60, "used": None}],
        "sessions": {"limit": 3, "used": None},
    }


def test_connectors_without_limits_show_no_usage(cli_env):
    outbox(cli_env, *ADD)
    assert listed(cli_env)["m365"]["usage"] is None
