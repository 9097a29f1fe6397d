"""schema.sql itself: idempotent, guards writers that bypass Python, cheap claims."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import zipfile

import psycopg
import pytest

import outbox
from outbox.store.migrate import migrations
from outbox.store.sql import schema_sql

MINIMAL = "INSERT INTO outbox.message (from_addr, to_addrs, subject, text_body) VALUES (%s, %s, %s, %s)"


def test_applying_twice_is_harmless(db):
    db.execute("INSERT INTO outbox.settings (singleton) VALUES (true) ON CONFLICT DO NOTHING")
    db.execute("UPDATE outbox.settings SET retry_base_seconds = 5")
    with db.transaction():
        db.execute(schema_sql())
    assert db.execute("SELECT retry_base_seconds FROM outbox.settings").fetchone()[0] == 5


@pytest.mark.parametrize(
    "column, value",
    [
        ("subject", "hello\r\nBcc: victim@example.org"),
        ("subject", "hello\nX-Evil: 1"),
        ("from_addr", "a@example.com\r\nBcc: x@example.org"),
    ],
)
def test_line_breaks_refused_in_sql(db, column, value):
    values = {"from_addr": "a@example.com", "subject": "s"} | {column: value}
    with pytest.raises(psycopg.errors.CheckViolation, match=r"message_(headers_single_line|from_is_address)"):
        db.execute(MINIMAL, [values["from_addr"], ["b@example.org"], values["subject"], "t"])


def test_line_break_in_recipient_array_refused(db):
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute(MINIMAL, ["a@example.com", ["b@example.org\r\nRCPT TO:<x@evil.example>"], "s", "t"])


def test_custom_header_names_checked_in_sql(db):
    with pytest.raises(psycopg.errors.CheckViolation, match="message_custom_headers_valid"):
        db.execute(
            "INSERT INTO outbox.message (from_addr, to_addrs, subject, text_body, headers) "
            "VALUES ('a@example.com', '{b@example.org}', 's', 't', %s)",
            [psycopg.types.json.Jsonb({"X-Ok\r\nBcc": "x"})],
        )


@pytest.mark.parametrize(
    "column, value",
    [
        ("subject", "=?UTF-8?Q?hello=0D=0ABcc:_victim@evil.example?="),
        ("from_name", "=?utf-8?b?Y2VvQGV4YW1wbGUuY29t?="),
        ("to_addrs", ["b@example.org", "=?utf-8?q?x?=@example.org"]),
        ("reply_to", "=?utf-8?q?x?=@example.org"),
        ("headers", psycopg.types.json.Jsonb({"X-Tag": "a =?UTF-8?Q?=0AFrom:_x@evil.example?="})),
    ],
)
def test_encoded_words_refused_in_sql(db, column, value):
    values = {"from_addr": "a@example.com", "to_addrs": ["b@example.org"], "subject": "s"} | {column: value}
    with pytest.raises(psycopg.errors.CheckViolation, match="message_headers_plain_text"):
        db.execute(
            f"INSERT INTO outbox.message ({', '.join(values)}, text_body) "
            f"VALUES ({', '.join(['%s'] * len(values))}, 't')",
            list(values.values()),
        )
    row_id = db.execute(MINIMAL + " RETURNING id", ["a@example.com", ["b@example.org"], "s", "t"]).fetchone()[
        0
    ]
    with pytest.raises(psycopg.errors.CheckViolation, match="message_headers_plain_text"):
        db.execute(f"UPDATE outbox.message SET {column} = %s WHERE id = %s", [value, row_id])


def test_text_that_only_resembles_an_encoded_word_is_accepted_in_sql(db):
    db.execute(MINIMAL, ["a@example.com", ["b@example.org"], "x =? y ?= and a?b?c", "t"])


def test_minimal_insert_from_an_idn_sender_gets_an_ascii_message_id(db):
    [mid] = db.execute(
        MINIMAL + " RETURNING message_id", ["a@bücher.example", ["b@example.org"], "s", "t"]
    ).fetchone()
    assert mid.isascii() and mid.endswith("@outbox.invalid>")


def test_idempotency_key_unique_in_sql(db):
    sql = (
        "INSERT INTO outbox.message (from_addr, to_addrs, subject, text_body, idempotency_key) "
        "VALUES ('a@example.com', '{b@example.org}', 's', 't', 'k1')"
    )
    db.execute(sql)
    with pytest.raises(psycopg.errors.UniqueViolation):
        db.execute(sql)


def test_minimal_insert_gets_message_id_and_due_time(db):
    row = db.execute(
        MINIMAL + " RETURNING message_id, status, next_attempt_at <= now()",
        ["Ann@Example.COM", ["b@example.org"], "s", "t"],
    ).fetchone()
    assert row[0].startswith("<") and row[0].endswith("@example.com>")
    assert row[1:] == ("queued", True)


def test_claim_uses_the_partial_index(db):
    db.execute("""
        INSERT INTO outbox.message (from_addr, to_addrs, subject, text_body, status, sent_at)
        SELECT 'a@example.com', '{b@example.org}', 's', 't', 'sent', now() FROM generate_series(1, 20000)""")
    db.execute(MINIMAL, ["a@example.com", ["b@example.org"], "s", "t"])
    db.execute("ANALYZE outbox.message")
    from outbox.store.sql import queries

    plan = "\n".join(
        r[0]
        for r in db.execute(
            "EXPLAIN " + queries("worker")["claim_due"],
            {"limit": 50, "max_in_flight": 5000, "lease_seconds": 60},
        )
    )
    assert "message_due_idx" in plan, plan


def test_async_enqueue_writes_on_the_callers_transaction(database_url, parked_gateway):
    async def scenario():
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            msg_id = await outbox.enqueue_async(
                conn,
                from_addr="a@example.com",
                to=["b@example.org"],
                subject="async",
                text="t",
                idempotency_key="k",
            )
            again = await outbox.enqueue_async(
                conn,
                from_addr="a@example.com",
                to=["b@example.org"],
                subject="async",
                text="t",
                idempotency_key="k",
            )
            await conn.rollback()
            cur = await conn.execute("SELECT count(*) FROM outbox.message")
            return msg_id, again, (await cur.fetchone())[0]

    msg_id, again, left = asyncio.run(scenario())
    assert msg_id == again and left == 0


def test_system_mail_without_from_uses_unmonitored_address(db, parked_gateway):
    with pytest.raises(outbox.ValidationError, match="unmonitored-address"):
        outbox.enqueue(db, from_addr=None, system_generated=True, to=["b@example.org"], subject="s", text="t")
    db.execute("UPDATE outbox.settings SET unmonitored_address = 'noreply@example.com'")
    msg_id = outbox.enqueue(
        db,
        from_addr=None,
        system_generated=True,
        to=["b@example.org"],
        subject="Reset your password",
        text="t",
    )
    assert (
        db.execute("SELECT from_addr FROM outbox.message WHERE id = %s", [msg_id]).fetchone()[0]
        == "noreply@example.com"
    )


def test_wheel_carries_schema_sql(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            ".",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = tmp_path.glob("outbox_worker-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert (
        "outbox/schema.sql" in names and "outbox/store/queries.sql" in names and "worker/queries.sql" in names
    )
    assert zipfile.ZipFile(wheel).read("outbox/schema.sql").decode() == schema_sql()
    shipped = {
        n.removeprefix("outbox/store/migrations/") for n in names if n.startswith("outbox/store/migrations/")
    }
    assert {f"{m.label}.sql" for m in migrations()} <= shipped


def test_db_init_upgrades_an_older_database(db):
    # a database made before these columns existed (and before the views that use them)
    db.execute("DROP VIEW IF EXISTS outbox.connector_health, outbox.outbox_view, outbox.sent_items")
    db.execute(
        "ALTER TABLE outbox.connector DROP COLUMN failures, DROP COLUMN backoff_until, "
        "DROP COLUMN last_error, DROP COLUMN last_error_at"
    )
    db.execute("ALTER TABLE outbox.settings DROP COLUMN ambiguous_policy")
    db.execute("ALTER TABLE outbox.message DROP COLUMN content")
    with db.transaction():
        db.execute(schema_sql())
    cols = {
        r[0]
        for r in db.execute(
            "SELECT table_name || '.' || column_name FROM information_schema.columns "
            "WHERE table_schema = 'outbox'"
        )
    }
    assert {
        "connector.failures",
        "connector.backoff_until",
        "settings.ambiguous_policy",
        "message.content",
    } <= cols
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute("UPDATE outbox.settings SET ambiguous_policy = 'sometimes'")


def test_line_breaks_refused_when_sql_updates_a_header_column(db):
    row_id = db.execute(MINIMAL + " RETURNING id", ["a@example.com", ["b@example.org"], "s", "t"]).fetchone()[
        0
    ]
    with pytest.raises(psycopg.errors.CheckViolation, match="message_headers_single_line"):
        db.execute(
            "UPDATE outbox.message SET subject = %s WHERE id = %s", ["hi\r\nBcc: x@evil.example", row_id]
        )
    with pytest.raises(psycopg.errors.CheckViolation, match="message_custom_headers_valid"):
        db.execute("UPDATE outbox.message SET headers = %s WHERE id = %s", ['{"X-A": "1\\nBcc: x"}', row_id])
    assert db.execute("SELECT subject FROM outbox.message WHERE id = %s", [row_id]).fetchone()[0] == "s"


def test_deleting_a_connector_clears_it_from_its_messages(db):
    cid = db.execute(
        "INSERT INTO outbox.connector (name, direction, address, host, port, security)"
        " VALUES ('gone', 'outgoing', 'gone@example.com', '127.0.0.1', 25, 'none') RETURNING id"
    ).fetchone()[0]
    row_id = db.execute(MINIMAL + " RETURNING id", ["a@example.com", ["b@example.org"], "s", "t"]).fetchone()[
        0
    ]
    db.execute("UPDATE outbox.message SET connector_id = %s WHERE id = %s", [cid, row_id])
    db.execute("DELETE FROM outbox.connector WHERE id = %s", [cid])
    assert db.execute("SELECT connector_id FROM outbox.message WHERE id = %s", [row_id]).fetchone()[0] is None


def test_idempotency_keys_stay_unique(db):
    sql = MINIMAL.replace("text_body)", "text_body, idempotency_key)").replace("%s)", "%s, %s)")
    db.execute(sql, ["a@example.com", ["b@example.org"], "s", "t", "order-1"])
    db.execute(sql, ["a@example.com", ["b@example.org"], "s", "t", None])
    db.execute(sql, ["a@example.com", ["b@example.org"], "s", "t", None])
    with pytest.raises(psycopg.errors.UniqueViolation):
        db.execute(sql, ["a@example.com", ["b@example.org"], "s", "t", "order-1"])


def test_db_init_lets_an_older_database_audit_connector_resets(db):
    audit = "INSERT INTO outbox.operator_audit (action, actor, count) VALUES ('connector-reset', 'ops', 0)"
    oid = "SELECT oid FROM pg_constraint WHERE conname = 'operator_audit_action_valid'"
    db.execute("ALTER TABLE outbox.operator_audit DROP CONSTRAINT operator_audit_action_valid")
    db.execute(
        "ALTER TABLE outbox.operator_audit ADD CONSTRAINT operator_audit_action_valid "
        "CHECK (action IN ('replay', 'cancel', 'send-now', 'prune'))"
    )
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute(audit)
    with db.transaction():
        db.execute(schema_sql())
    db.execute(audit)
    widened = db.execute(oid).fetchone()[0]
    with db.transaction():
        db.execute(schema_sql())
    assert db.execute(oid).fetchone()[0] == widened  # left alone once it allows the action
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute("INSERT INTO outbox.operator_audit (action, actor, count) VALUES ('reboot', 'ops', 0)")
