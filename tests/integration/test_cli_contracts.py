"""The CLI's contracts for scripts and people (README "CLI"): one exit-code table across
commands, `connector list` that fits a terminal, and `--json` that parses with ISO 8601
timestamps. Each case runs the real `outbox` command."""

from __future__ import annotations

import json
from datetime import datetime

import pytest

from tests.conftest import wait_until
from tests.helpers import add_gateway, one_line_error, outbox_cli
from tests.smtp import free_port


def add(env, name, *args, check=True):
    return outbox_cli(env, "connector", "add", name, *args, check=check)


def gateway(env):
    add(env, "gw", "--address", "gw@example.com", "--host", "localhost", "--port", "25", "--default-gateway")


def send(env, *args):
    return int(outbox_cli(env, "send", "--from", "app@example.com", "--to", "x@example.org", *args).stdout)


# -- exit codes: 0 done, 1 refused, 2 usage or a bad value, 3 a service cannot be reached ----


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        # 2: a bad value or a usage mistake; nothing is written
        # errors name the flags the user typed, not the columns behind them
        (
            ("send", "--from", "nobody", "--to", "x@example.org", "--subject", "s", "--text", "t"),
            2,
            "--from: ",
        ),
        (("send", "--from", "a@example.com", "--subject", "s", "--text", "t"), 2, "(--to, --cc or --bcc)"),
        (("settings", "set", "max-attempts", "0"), 2, "max-attempts"),
        (("settings", "set", "colour", "blue"), 2, "KEY"),
        (("connector", "add", "bad", "--address", "a@example.com", "--port", "99999"), 2, "--port"),
        (("connector", "add", "x", "--address", "x@example.com", "--rate-limit", "5/fortnight"), 2, "rate"),
        (("prune", "--older-than", "soon"), 2, "--older-than"),
        (("replay",), 2, "give message ids or a filter"),
        (("status", "--database-url", "not a url"), 2, "database-url"),
        # 1: refused (not found, taken, nothing to do)
        (("show", "999"), 1, "no message with id 999"),
        (("connector", "enable", "nope"), 1, "no connector named 'nope'"),
        (
            ("connector", "add", "gw", "--address", "other@example.com", "--host", "h", "--port", "25"),
            1,
            "exists",
        ),
        # 3: a service that cannot be reached
        (("status", "--database-url", "postgresql://postgres@127.0.0.1:{port}/x"), 3, "cannot reach"),
    ],
)
def test_exit_code_table(cli_env, args, code, says):
    gateway(cli_env)
    args = tuple(a.format(port=free_port()) if "{port}" in a else a for a in args)
    assert says in one_line_error(outbox_cli(cli_env, *args, check=False), code)


def test_nothing_done_is_exit_1_for_replay_cancel_and_send_now_alike(cli_env, db):
    gateway(cli_env)
    msg_id = send(cli_env, "--subject", "s", "--text", "t")
    db.execute("UPDATE outbox.message SET status = 'sent', sent_at = now() WHERE id = %s", [msg_id])
    for command in ("cancel", "send-now"):
        proc = outbox_cli(cli_env, command, str(msg_id), check=False)
        assert proc.returncode == 1 and f"skipped {msg_id} (sent" in proc.stdout, proc
    assert "add --force" in one_line_error(outbox_cli(cli_env, "replay", str(msg_id), check=False), 2)
    queued = send(cli_env, "--subject", "s", "--text", "t", "--send-at", "2100-01-01T00:00:00+00:00")
    done = outbox_cli(cli_env, "send-now", str(queued), str(msg_id))  # one done, one skipped: 0
    assert f"skipped {msg_id}" in done.stdout


# -- connector list ------------------------------------------------------------------------


def test_connector_list_fits_100_columns_and_wide_shows_everything(cli_env, db):
    add(
        cli_env,
        "customer-service-emea",
        "--address",
        "customer.service.emea@subsidiary.example.com",
        "--alias",
        "support@subsidiary.example.com",
        "--host",
        "smtp.relay.subsidiary.example.com",
        "--port",
        "587",
        "--username",
        "customer.service.emea@subsidiary.example.com",
        "--password-env",
        "CS_PW",
        "--rate-limit",
        "30/min",
    )
    add(
        cli_env,
        "gw",
        "--address",
        "noreply@example.com",
        "--host",
        "localhost",
        "--port",
        "25",
        "--default-gateway",
    )
    db.execute(
        "UPDATE outbox.connector SET failures = 3, backoff_until = now() + interval '10 minutes', "
        "last_error = %s, last_error_at = now() WHERE name = 'customer-service-emea'",
        [
            "SMTPAuthenticationError: (535, '5.7.139 Authentication unsuccessful, the user credentials were "
            "incorrect. [AM0PR02CA0012.eurprd02.prod.outlook.com]')"
        ],
    )
    narrow = outbox_cli(cli_env, "connector", "list").stdout.splitlines()
    assert max(map(len, narrow)) <= 100, "\n".join(narrow)
    assert narrow[0].split() == ["NAME", "GW", "ADDRESS", "STATE", "USAGE", "ERROR"]
    emea = next(line for line in narrow if line.startswith("customer-service-emea"))
    assert "backing off until " in emea and "SMTPAuthenticat" in emea and "…" in emea
    assert "0 of 30/min" in emea  # nothing sent through it yet
    gw = next(line for line in narrow if line.startswith("gw "))
    assert gw.split()[:2] == ["gw", "*"] and gw.rstrip().endswith("ok")

    wide = outbox_cli(cli_env, "connector", "list", "--wide").stdout
    assert "AM0PR02CA0012.eurprd02.prod.outlook.com" in wide and "30/min" in wide
    assert "smtp.relay.subsidiary.example.com" in wide and "starttls" in wide


# -- --json ----------------------------------------------------------------------------------


def test_json_outputs_parse_and_their_timestamps_round_trip(cli_env, db):
    gateway(cli_env)
    msg_id = send(cli_env, "--subject", "s", "--text", "t", "--send-at", "2100-01-01T00:00:00+00:00")
    shown = json.loads(outbox_cli(cli_env, "show", str(msg_id), "--json").stdout)
    created = datetime.fromisoformat(shown["created_at"])
    assert created.tzinfo is not None and "T" in shown["created_at"]
    assert datetime.fromisoformat(shown["send_after"]).year == 2100
    [listed] = json.loads(outbox_cli(cli_env, "connector", "list", "--json").stdout)
    assert listed["name"] == "gw" and listed["backoff_until"] is None
    status = json.loads(outbox_cli(cli_env, "status", "--json").stdout)
    assert status["counts"]["queued"] == 1


# -- attempt numbering -----------------------------------------------------------------------


def test_attempts_are_numbered_alike_in_show_its_timeline_and_the_worker_log(cli_env, db, smtp, start):
    """A message refused once for a while then sent: `show` counts 2 attempts, its timeline
    (and `--json`) lists #1 retry and #2 sent, and the worker logged attempt=1 and attempt=2."""
    add_gateway(db, smtp)
    db.execute("UPDATE outbox.settings SET retry_base_seconds = 0.1, retry_max_seconds = 0.3")
    smtp.recorder.data_replies.append("451 4.3.0 try again later")
    msg_id = send(cli_env, "--subject", "s", "--text", "t")
    worker = start("run", OUTBOX_LOG_LEVEL="debug", OUTBOX_LOG_FORMAT="json")
    wait_until(
        lambda: outbox_cli(cli_env, "show", str(msg_id), "--json").stdout.count('"outcome"') == 2,
        what=lambda: worker.output(),
    )
    shown = json.loads(outbox_cli(cli_env, "show", str(msg_id), "--json").stdout)
    assert shown["status"] == "sent" and shown["attempts"] == 2
    assert [(a["attempt"], a["outcome"]) for a in shown["attempts_history"]] == [(1, "retry"), (2, "sent")]
    text = outbox_cli(cli_env, "show", str(msg_id)).stdout
    assert "(attempts 2)" in text and "#1 " in text and "#2 " in text, text
    wait_until(lambda: worker.output().count("attempt finished") == 2, what=lambda: worker.output())
    logged = [json.loads(line) for line in worker.output().splitlines() if "attempt finished" in line]
    assert [(e["attempt"], e["status"]) for e in logged] == [(1, "retry"), (2, "sent")]
