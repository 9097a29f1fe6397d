"""Provider limits at a real SMTP server (issue 18): rate limits held in every sliding
interval across worker processes, no attempt spent waiting, no other connector held up."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import outbox
from outbox.admin import connectors
from outbox.admin.connectors import NewConnector
from outbox.core import limits
from tests.conftest import wait_until
from tests.helpers import add_gateway
from tests.helpers import outbox_cli as outbox_cmd
from tests.windows import Stalls, crowded_windows, most_in_any_window


def enqueue(db, n, from_addr="a@example.com"):
    with db.transaction():
        return [
            outbox.enqueue(db, from_addr=from_addr, to=[f"r{i}@example.org"], subject=f"m{i}", text="t")
            for i in range(n)
        ]


def rows(db, ids):
    return db.execute(
        "SELECT status, attempts, last_error FROM outbox.message WHERE id = ANY(%s) ORDER BY id", [ids]
    ).fetchall()


def test_ten_per_second_is_held_in_every_sliding_second(db, smtp, pipeline):
    add_gateway(db, smtp, rate_limits=("10/s",))
    with Stalls() as stalls:
        ids = enqueue(db, 60)
        wait_until(
            lambda: len(smtp.recorder.received) >= 60,
            timeout=120,
            step=pipeline.cycle,
            what=lambda: f"60 messages sent ({len(smtp.recorder.received)} so far)",
        )
        wait_until(lambda: {r[0] for r in rows(db, ids)} == {"sent"}, timeout=60, what="rows sent")
    assert all(attempts == 1 for _, attempts, _ in rows(db, ids)), "waiting spent an attempt"
    assert len(smtp.recorder.received) == 60
    # Each message counted when the server saw its MAIL FROM. The limiter admits them (just
    # before MAIL) at least 1.01 s per 10, so every sliding second holds at most 10 of them,
    # but for a message that arrived late (closer to the next ones): see MOST_LATENESS.
    times = smtp.recorder.mail_times
    assert crowded_windows(times, 10, 1.0, stalls) == [], (
        "11 messages within a second (start, how much under 1 s)",
        f"stalls seen: {[(round(w - times[0], 3), round(s, 3)) for w, s in stalls.seen if s > 0.005]}",
    )
    assert (
        db.execute(
            "SELECT count(*) FROM outbox.attempt_history WHERE message_id = ANY(%s)", [ids]
        ).fetchone()[0]
        == 60
    )


def test_none_clears_the_rate_limit(db, smtp, pipeline):
    add_gateway(db, smtp, rate_limits=("1/min",))
    first = enqueue(db, 2)
    wait_until(
        lambda: sorted(r[0] for r in rows(db, first)) == ["queued", "sent"],
        step=pipeline.cycle,
        what="one sent, one waiting",
    )
    [(_, attempts, error)] = [r for r in rows(db, first) if r[0] == "queued"]
    assert attempts == 0 and error.startswith("waiting for rate limit 1/min until ")

    connectors.update(db, "gw", {"rate_limits": ()})
    more = enqueue(db, 30)
    started = time.monotonic()
    for msg in [*first, *more]:
        pipeline.until_status(msg, "sent")
    assert time.monotonic() - started < 10
    assert len(smtp.recorder.received) == 32


def test_a_saturated_connector_holds_up_no_other_in_the_same_batch(
    db, smtp_factory, stopped_pipeline, cli_env
):
    limited, free = smtp_factory(name="limited"), smtp_factory(name="free")
    add_gateway(db, free)
    connectors.add(
        db,
        NewConnector(
            name="m365",
            direction="outgoing",
            address="m365@example.com",
            host="localhost",
            port=limited.port,
            rate_limits=("1/min",),
        ),
    )
    saturated = enqueue(db, 5, from_addr="m365@example.com")
    [other] = enqueue(db, 1)
    stopped_pipeline.cycle()  # all six rows in one broker message
    stopped_pipeline.start()
    t0 = time.monotonic()
    stopped_pipeline.until_status(other, "sent", timeout=5)
    assert time.monotonic() - t0 < 2.5
    wait_until(
        lambda: sorted(r[0] for r in rows(db, saturated)) == ["queued"] * 4 + ["sent"],
        timeout=10,
        what="one sent, four waiting",
    )
    assert len(limited.recorder.received) == 1 and len(free.recorder.received) == 1
    waiting = [r for r in rows(db, saturated) if r[0] == "queued"]
    assert all(a == 0 and e.startswith("waiting for rate limit 1/min until ") for _, a, e in waiting)
    # what an operator sees
    msg = next(i for i, r in zip(saturated, rows(db, saturated), strict=True) if r[0] == "queued")
    shown = outbox_cmd(cli_env, "show", str(msg)).stdout
    assert "waiting for rate limit 1/min until" in shown
    listed = {c["name"]: c for c in json.loads(outbox_cmd(cli_env, "connector", "list", "--json").stdout)}
    assert listed["m365"]["limits"]["rate_limits"] == ["1/min"]


def test_throttling_replies_spend_no_attempt_so_max_attempts_2_still_delivers_all(db, smtp, pipeline):
    add_gateway(db, smtp)
    db.execute(
        "UPDATE outbox.settings SET max_attempts = 2, retry_base_seconds = 0.2, retry_max_seconds = 0.5"
    )
    smtp.recorder.data_replies.extend(["454 4.7.0 Throttling failure: Maximum sending rate exceeded"] * 12)
    smtp.recorder.mail_replies.extend(["421 4.7.0 Try again later, closing connection"] * 2)
    ids = enqueue(db, 5)
    for msg in ids:
        pipeline.until_status(msg, "sent", timeout=60)
    assert not smtp.recorder.data_replies, "the server throttled fewer transactions than scripted"
    assert sorted(r.message["Subject"] for r in smtp.recorder.received) == [f"m{i}" for i in range(5)]
    assert all(attempts == 1 for _, attempts, _ in rows(db, ids))
    throttled = db.execute(
        "SELECT count(*) FROM outbox.attempt_history WHERE message_id = ANY(%s) AND smtp_code IN (421, 454)",
        [ids],
    ).fetchone()[0]
    assert throttled >= 12


def test_throttling_replies_are_recognised():
    from outbox.core.policy import is_throttling

    for code, reply in [
        (421, "4.7.0 Temporary server error. Please try again later"),
        (450, "4.7.1 Client host rejected: too many connections"),
        (451, "4.7.500 Server busy. Please try again later"),
        (454, "Throttling failure: Maximum sending rate exceeded."),
        (452, "4.5.3 Too many recipients"),
        (421, "Rate limit exceeded"),
    ]:
        assert is_throttling(code, reply), (code, reply)
    for code, reply in [
        (450, "4.2.1 Mailbox unavailable"),
        (550, "5.7.1 Throttling"),
        (451, "4.3.0 Local error"),
    ]:
        assert not is_throttling(code, reply), (code, reply)


def test_max_messages_per_connection_starts_a_new_session(db, smtp, pipeline):
    add_gateway(db, smtp, max_connections=1, max_messages_per_connection=3)
    ids = enqueue(db, 7)
    for msg in ids:
        pipeline.until_status(msg, "sent")
    assert len(smtp.recorder.received) == 7
    assert smtp.recorder.sessions == 3  # 3 + 3 + 1


def test_max_recipients_3_sends_7_recipients_as_3_3_1_with_one_message_id(db, smtp, pipeline):
    add_gateway(db, smtp, max_recipients=3)
    smtp.recorder.script_rcpt("r5@example.org", "451 4.3.0 busy", "250 OK")  # retried alone
    to = [f"r{i}@example.org" for i in range(7)]
    with db.transaction():
        msg = outbox.enqueue(db, from_addr="a@example.com", to=to, subject="s", text="t")
    db.execute("UPDATE outbox.settings SET retry_base_seconds = 0.2, retry_max_seconds = 0.5")
    pipeline.until_status(msg, "sent", timeout=30)
    got = smtp.recorder.received
    assert [r.rcpt_tos for r in got] == [
        to[0:3],
        ["r3@example.org", "r4@example.org"],
        ["r6@example.org"],
        ["r5@example.org"],
    ]
    assert len({r.message_id for r in got}) == 1
    statuses = dict(
        db.execute(
            "SELECT addr, status FROM outbox.recipient_history WHERE message_id = %s", [msg]
        ).fetchall()
    )
    assert statuses == dict.fromkeys(to, "sent")


def test_a_throttling_reply_slows_the_connector_down_and_an_operator_sees_it(db, smtp, pipeline, cli_env):
    add_gateway(db, smtp)  # no rate limit of its own: 10/s after the first throttling reply
    db.execute("UPDATE outbox.settings SET retry_base_seconds = 0.2, retry_max_seconds = 0.5")
    smtp.recorder.data_delay = 0.02
    smtp.recorder.data_replies.append("454 4.7.0 Throttling failure: Maximum sending rate exceeded")
    with Stalls() as stalls:
        ids = enqueue(db, 40)
        wait_until(
            lambda: {r[0] for r in rows(db, ids)} == {"sent"},
            timeout=60,
            step=pipeline.cycle,
            what="all sent",
        )
    assert all(attempts == 1 for _, attempts, _ in rows(db, ids)), "throttling spent an attempt"
    times = smtp.recorder.mail_times[8:]
    # the sessions busy when the reply came finish their messages; after that, 10/s (paced
    # 1.01 s per 10), recovering (the rate doubles every 30 s): by the last message 10 take
    # no less than this long, in every sliding window (lateness excused as MOST_LATENESS says)
    seconds = 0.5 ** ((times[-1] - times[0]) / limits.THROTTLE_HALF_LIFE_SECONDS)
    assert crowded_windows(times, 10, seconds, stalls) == [], [
        round(b - a, 3) for a, b in zip(times, times[10:], strict=False)
    ]
    [(actor, detail)] = db.execute(
        "SELECT actor, detail FROM outbox.connector_event WHERE action = 'slowed down'"
    ).fetchall()
    assert actor == "worker" and detail["interval_seconds"] == 0.1 and "454" in detail["reply"]
    listed = {c["name"]: c for c in json.loads(outbox_cmd(cli_env, "connector", "list", "--json").stdout)}
    assert 10 <= listed["gw"]["slowdown"]["per_second"] < 20  # recovering: doubles in 30 s
    assert "slowed to" in outbox_cmd(cli_env, "connector", "list", "--wide").stdout


def test_connector_list_shows_what_was_used_of_each_limit(db, smtp, pipeline, cli_env):
    add_gateway(db, smtp, rate_limits=("1000/h",), max_connections=2)
    ids = enqueue(db, 7)
    for msg in ids:
        pipeline.until_status(msg, "sent")
    listed = {c["name"]: c for c in json.loads(outbox_cmd(cli_env, "connector", "list", "--json").stdout)}
    usage = listed["gw"]["usage"]
    assert usage["rate_limits"] == [{"limit": "1000/h", "window_seconds": 3600, "used": 7}]
    assert usage["sessions"]["limit"] == 2 and usage["sessions"]["used"] in (0, 1, 2)
    table = outbox_cmd(cli_env, "connector", "list").stdout.splitlines()
    assert "7 of 1000/h, " in next(ln for ln in table if ln.startswith("gw")), table


def test_a_paced_limits_usage_counts_the_last_interval(db, smtp, pipeline, cli_env):
    add_gateway(db, smtp, rate_limits=("10/min",))
    ids = enqueue(db, 3)
    wait_until(
        lambda: sorted(r[0] for r in rows(db, ids)) == ["sent"] * 3,
        timeout=60,
        step=pipeline.cycle,
        what="three sent (one every 6 s)",
    )
    listed = {c["name"]: c for c in json.loads(outbox_cmd(cli_env, "connector", "list", "--json").stdout)}
    assert listed["gw"]["usage"]["rate_limits"] == [{"limit": "10/min", "window_seconds": 60, "used": 3}]
    assert listed["gw"]["usage"]["sessions"] is None  # no --max-connections


def throttle_once(db, smtp, pipeline, cli_env):
    """A 454 reply slows the connector down (to 10/s without a rate limit, 5/s with 10/s)."""
    db.execute("UPDATE outbox.settings SET retry_base_seconds = 0.2, retry_max_seconds = 0.5")
    smtp.recorder.data_replies.append("454 4.7.0 Throttling failure: Maximum sending rate exceeded")
    [msg] = enqueue(db, 1)
    pipeline.until_status(msg, "sent", timeout=30)
    listed = {c["name"]: c for c in json.loads(outbox_cmd(cli_env, "connector", "list", "--json").stdout)}
    assert listed["gw"]["slowdown"] is not None
    smtp.recorder.arrival_times.clear()


def test_connector_reset_ends_a_slow_down(db, smtp, pipeline, cli_env):
    add_gateway(db, smtp)
    throttle_once(db, smtp, pipeline, cli_env)
    done = outbox_cmd(cli_env, "connector", "reset", "gw")
    assert done.returncode == 0 and "slow-down after throttling ended (was slowed to 1" in done.stdout
    listed = {c["name"]: c for c in json.loads(outbox_cmd(cli_env, "connector", "list", "--json").stdout)}
    assert listed["gw"]["slowdown"] is None
    ids = enqueue(db, 40)
    wait_until(
        lambda: {r[0] for r in rows(db, ids)} == {"sent"}, timeout=60, step=pipeline.cycle, what="all sent"
    )
    # slowed down, at most 10 (recovering: 20 after 30 s) would arrive in any second
    assert most_in_any_window(smtp.recorder.arrival_times, 1.0) > 20
    [(actor, detail)] = db.execute(
        "SELECT actor, detail FROM outbox.connector_event WHERE action = 'slow-down ended'"
    ).fetchall()
    assert actor and detail["by"] == "reset" and 0.05 < detail["was_interval_seconds"] <= 0.1
    again = outbox_cmd(cli_env, "connector", "reset", "gw")
    assert "nothing to reset" in again.stdout


def test_changing_the_limits_ends_a_slow_down(db, smtp, pipeline, cli_env):
    add_gateway(db, smtp, rate_limits=("10/s",))  # slowed to 5/s by a throttling reply
    throttle_once(db, smtp, pipeline, cli_env)
    done = outbox_cmd(cli_env, "connector", "update", "gw", "--rate-limit", "40/s")
    assert "slow-down after throttling ended (was slowed to " in done.stdout
    ids = enqueue(db, 60)
    wait_until(
        lambda: {r[0] for r in rows(db, ids)} == {"sent"}, timeout=60, step=pipeline.cycle, what="all sent"
    )
    # faster than the slow-down's 5/s: more than 10 arrived within some second
    assert most_in_any_window(smtp.recorder.arrival_times, 1.0) > 10


def test_an_update_that_leaves_the_limits_keeps_the_slow_down(db, smtp, pipeline, cli_env):
    add_gateway(db, smtp)
    throttle_once(db, smtp, pipeline, cli_env)
    done = outbox_cmd(cli_env, "connector", "update", "gw", "--timeout", "30")
    assert "slow-down" not in done.stdout
    listed = {c["name"]: c for c in json.loads(outbox_cmd(cli_env, "connector", "list", "--json").stdout)}
    assert listed["gw"]["slowdown"] is not None


def test_connector_list_says_what_waiting_messages_wait_for_and_until_when(db, smtp, pipeline, cli_env):
    add_gateway(db, smtp, rate_limits=("1/min",))
    ids = enqueue(db, 4)
    wait_until(
        lambda: sorted(r[0] for r in rows(db, ids)) == ["queued"] * 3 + ["sent"],
        step=pipeline.cycle,
        what="one sent, three waiting",
    )
    # until when, as each waiting row says (`outbox show`: "waiting for rate limit 1/min until T")
    until = max(
        datetime.fromisoformat(e.rsplit(" until ", 1)[1]) for s, _, e in rows(db, ids) if s == "queued"
    )
    proc = outbox_cmd(cli_env, "connector", "list")
    assert proc.returncode == 0
    header, *lines = proc.stdout.splitlines()
    assert header.split() == ["NAME", "GW", "ADDRESS", "STATE", "USAGE", "ERROR", "WAITING"]
    gw = next(ln for ln in lines if ln.startswith("gw "))
    assert gw.rstrip().endswith(f"3 until {until.astimezone(UTC):%H:%M:%SZ} (1/min)"), gw
    assert max(map(len, proc.stdout.splitlines())) <= 100
    listed = {c["name"]: c for c in json.loads(outbox_cmd(cli_env, "connector", "list", "--json").stdout)}
    [waiting] = listed["gw"]["waiting"]
    assert waiting["for"] == "rate limit 1/min" and waiting["messages"] == 3
    assert datetime.fromisoformat(waiting["until"]) == until
    wide = outbox_cmd(cli_env, "connector", "list", "--wide").stdout
    assert "3 until " in wide and "(1/min)" in wide

    connectors.update(db, "gw", {"rate_limits": ()})  # nothing waits any more
    for msg in ids:
        pipeline.until_status(msg, "sent")
    listed = {c["name"]: c for c in json.loads(outbox_cmd(cli_env, "connector", "list", "--json").stdout)}
    assert listed["gw"]["waiting"] == []
    assert "WAITING" not in outbox_cmd(cli_env, "connector", "list").stdout
