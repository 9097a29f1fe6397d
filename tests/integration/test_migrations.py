"""Versioned migrations: `outbox db migrate`, `db status`, `db init`; a database made by the last
unversioned schema.sql brought under versioning with nothing lost; schema.sql equal to every
migration applied; processes refusing a schema that is not theirs."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from outbox.store import migrate as migrations
from outbox.store.migrate import Migration, latest
from outbox.store.sql import schema_sql
from tests.conftest import PG_ADMIN, _url
from tests.helpers import one_line_error
from tests.helpers import outbox_cli as outbox

BEFORE_VERSIONING = Path(__file__).resolve().parent.parent / "fixtures" / "schema_before_versioning.sql"

# Everything a schema is made of, as the catalogs describe it (no OIDs, no attnums with gaps).
CATALOG = {
    "relations": """
        SELECT relname, relkind, relpersistence FROM pg_class
         WHERE relnamespace = 'outbox'::regnamespace ORDER BY 1""",
    "columns": """
        SELECT table_name, column_name,
               row_number() OVER (PARTITION BY table_name ORDER BY ordinal_position),
               data_type, udt_name, column_default, is_nullable, is_identity, identity_generation
          FROM information_schema.columns WHERE table_schema = 'outbox' ORDER BY 1, 3""",
    "constraints": """
        SELECT conrelid::regclass::text, conname, contype, convalidated, pg_get_constraintdef(oid)
          FROM pg_constraint WHERE connamespace = 'outbox'::regnamespace ORDER BY 1, 2""",
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes
         WHERE schemaname = 'outbox' ORDER BY 1, 2""",
    "triggers": """
        SELECT tgrelid::regclass::text, tgname, tgenabled, pg_get_triggerdef(t.oid)
          FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
         WHERE NOT tgisinternal AND c.relnamespace = 'outbox'::regnamespace ORDER BY 1, 2""",
    "functions": """
        SELECT p.oid::regprocedure::text, pg_get_functiondef(p.oid), proacl::text FROM pg_proc p
         WHERE pronamespace = 'outbox'::regnamespace ORDER BY 1, 2""",
    "views": "SELECT viewname, definition FROM pg_views WHERE schemaname = 'outbox' ORDER BY 1",
    "types": """
        SELECT t.typname, t.typtype, array_agg(e.enumlabel ORDER BY e.enumsortorder)::text
          FROM pg_type t LEFT JOIN pg_enum e ON e.enumtypid = t.oid
         WHERE t.typnamespace = 'outbox'::regnamespace AND t.typtype IN ('e', 'd')
         GROUP BY 1, 2 ORDER BY 1""",
    "table_grants": """
        SELECT table_name, grantee, privilege_type FROM information_schema.role_table_grants
         WHERE table_schema = 'outbox' ORDER BY 1, 2, 3""",
    "column_grants": """
        SELECT table_name, column_name, grantee, privilege_type FROM information_schema.column_privileges
         WHERE table_schema = 'outbox' ORDER BY 1, 2, 3, 4""",
    "schema_grants": "SELECT nspacl::text FROM pg_namespace WHERE nspname = 'outbox'",
    "versions": """
        SELECT version, name FROM outbox.schema_version
         WHERE to_regclass('outbox.schema_version') IS NOT NULL ORDER BY 1""",
}


def catalog(url: str) -> dict[str, list[tuple[Any, ...]]]:
    with psycopg.connect(url, autocommit=True) as conn:
        has_versions = conn.execute("SELECT to_regclass('outbox.schema_version') IS NOT NULL").fetchone()[0]
        return {
            name: conn.execute(query).fetchall()
            for name, query in CATALOG.items()
            if name != "versions" or has_versions
        }


def without_version_table(snapshot: dict[str, list[tuple[Any, ...]]]) -> dict[str, list[tuple[Any, ...]]]:
    """The catalog minus what versioning itself adds (the version table and its grant)."""
    return {
        name: [row for row in rows if not any("schema_version" in str(cell) for cell in row)]
        for name, rows in snapshot.items()
        if name != "versions"
    }


def contents(url: str) -> dict[str, list[dict[str, Any]]]:
    """Every outbox table's rows (the small tables of these tests)."""
    with psycopg.connect(url, autocommit=True) as conn, conn.cursor(row_factory=dict_row) as cur:
        tables = [
            r["tablename"]
            for r in cur.execute(
                "SELECT tablename FROM pg_tables"
                " WHERE schemaname = 'outbox' AND tablename <> 'schema_version'"
            )
        ]
        return {t: cur.execute(f"SELECT * FROM outbox.{t} ORDER BY 1, 2").fetchall() for t in tables}


# Values a migration changes on purpose: 0010 makes `max_connections` a cap across workers
# and turns the old per-process default 4 into NULL (no cap: the same behaviour as before).
MEANT = {("connector", "max_connections"): {4: None}}


def kept(before: dict[str, list[dict[str, Any]]], after: dict[str, list[dict[str, Any]]]) -> bool:
    """Every row and value of `before` is in `after` (later migrations may add columns), but
    for what MEANT says a migration changes."""
    before = {
        t: [{k: MEANT[t, k].get(v, v) if (t, k) in MEANT else v for k, v in row.items()} for row in old]
        for t, old in before.items()
    }
    return before.keys() <= after.keys() and all(
        [{k: row[k] for k in old[0]} for row in after[t]] == old if old else not after[t]
        for t, old in before.items()
    )


@contextmanager
def new_database() -> Iterator[str]:
    name = f"outbox_mig_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _url(name)
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def empty_url() -> Iterator[str]:
    with new_database() as url:
        yield url


FILL = [
    "UPDATE outbox.settings SET retry_base_seconds = 5, ambiguous_policy = 'hold'",
    "INSERT INTO outbox.connector (name, direction, address, host, port, security)"
    " VALUES ('gw', 'outgoing', 'gw@example.com', '127.0.0.1', 2525, 'none')",
    "INSERT INTO outbox.connector_event (connector_id, connector_name, action, actor)"
    " VALUES (1, 'gw', 'add', 'ops')",
    "INSERT INTO outbox.message (from_addr, to_addrs, subject, text_body)"
    " VALUES ('a@example.com', '{b@example.org}', 'one', 'x')",
    "INSERT INTO outbox.message (from_addr, to_addrs, subject, text_body, status, attempts, sent_at)"
    " VALUES ('a@example.com', '{c@example.org}', 'two', 'y', 'sent', 1, now())",
    "INSERT INTO outbox.attachment (message_id, filename, content) VALUES (1, 'a.txt', 'hi')",
    "INSERT INTO outbox.attempt (message_id, attempt, started_at, outcome) VALUES (2, 1, now(), 'sent')",
    "INSERT INTO outbox.recipient (message_id, addr, status, smtp_code)"
    " VALUES (2, 'c@example.org', 'sent', 250)",
    "INSERT INTO outbox.operator_audit (action, actor, count) VALUES ('replay', 'ops', 0)",
    "INSERT INTO outbox.web_user (name, role, password_hash) VALUES ('ann', 'admin', 'x')",
]


def build_before_versioning(url: str, *, fill: bool = True) -> None:
    """A database as the last unversioned `outbox db init` left it, with rows in every table."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(BEFORE_VERSIONING.read_text())  # type: ignore[arg-type]
        for statement in FILL if fill else []:
            conn.execute(statement)  # type: ignore[arg-type]


def env_for(cli_env: dict[str, str], url: str) -> dict[str, str]:
    return cli_env | {"OUTBOX_DATABASE_URL": url}


def status(env: dict[str, str]) -> dict[str, Any]:
    return json.loads(outbox(env, "db", "status", "--json").stdout)


def test_migrate_from_empty_then_again_is_a_no_op(cli_env, empty_url):
    env = env_for(cli_env, empty_url)
    before = status(env)
    assert before["status"] == "empty" and before["version"] is None
    assert [m["version"] for m in before["pending"]] == list(range(1, latest() + 1))
    assert "run `outbox db migrate`" in outbox(env, "db", "status").stdout

    assert outbox(env, "db", "migrate").stdout.strip() == f"created schema outbox at version {latest()}"
    after = status(env)
    assert after == {
        "version": latest(),
        "code_version": latest(),
        "kind": "versioned",
        "status": "up-to-date",
        "pending": [],
    }
    assert "up to date" in outbox(env, "db", "status").stdout

    snapshot = catalog(empty_url)
    assert outbox(env, "db", "migrate").stdout.strip() == f"already at version {latest()}"
    assert outbox(env, "db", "init").stdout.strip() == f"already at version {latest()}"
    assert catalog(empty_url) == snapshot


def test_db_init_on_an_empty_database_creates_everything(cli_env, empty_url):
    env = env_for(cli_env, empty_url)
    assert outbox(env, "db", "init").stdout.strip() == f"created schema outbox at version {latest()}"
    assert status(env)["status"] == "up-to-date"


def fresh_catalog() -> dict[str, list[tuple[Any, ...]]]:
    with new_database() as fresh:
        with psycopg.connect(fresh, autocommit=True) as conn:
            migrations.migrate(conn)
        return catalog(fresh)


def test_database_made_before_versioning_is_adopted_with_nothing_lost(cli_env, empty_url, monkeypatch):
    build_before_versioning(empty_url)
    env = env_for(cli_env, empty_url)
    rows, shape = contents(empty_url), catalog(empty_url)
    before = status(env)
    assert before["kind"] == "unversioned" and before["status"] == "pending"
    assert "made before versioning" in outbox(env, "db", "status").stdout

    shipped = migrations.migrations()
    with monkeypatch.context() as only_the_first:  # the code of the release that adopts it
        only_the_first.setattr(migrations, "migrations", lambda: shipped[:1])
        with psycopg.connect(empty_url, autocommit=True) as conn:
            adopted = migrations.migrate(conn)
    assert adopted.summary().splitlines() == [
        "schema outbox was made before versioning: recorded as version 1, unchanged",
        "already at version 1",
    ]
    assert contents(empty_url) == rows
    assert without_version_table(catalog(empty_url)) == without_version_table(shape)

    assert outbox(env, "db", "migrate").stdout.strip() == f"migrated from 1 to {latest()}"
    assert kept(rows, contents(empty_url))
    assert catalog(empty_url) == fresh_catalog()
    assert status(env)["status"] == "up-to-date"
    assert outbox(env, "db", "migrate").stdout.strip() == f"already at version {latest()}"
    assert kept(rows, contents(empty_url))


def test_db_migrate_says_it_adopted_a_database_made_before_versioning(cli_env, empty_url):
    build_before_versioning(empty_url)
    assert outbox(env_for(cli_env, empty_url), "db", "migrate").stdout.strip().splitlines() == [
        "schema outbox was made before versioning: recorded as version 1, unchanged",
        f"migrated from 1 to {latest()}",
    ]


def test_an_older_unversioned_database_is_brought_up_to_date(cli_env, empty_url):
    build_before_versioning(empty_url)
    with psycopg.connect(empty_url, autocommit=True) as conn:  # as an older schema.sql left it
        conn.execute("DROP TABLE outbox.web_user")
        conn.execute("DROP INDEX outbox.message_scheduled_idx")
    out = outbox(env_for(cli_env, empty_url), "db", "migrate").stdout
    assert "brought up to version 1" in out
    assert catalog(empty_url) == fresh_catalog()
    with psycopg.connect(empty_url) as conn:
        assert conn.execute("SELECT count(*) FROM outbox.message").fetchone()[0] == 2


def test_schema_sql_equals_every_migration_applied():
    with new_database() as by_script, new_database() as by_migrations:
        with psycopg.connect(by_script, autocommit=True) as conn:
            conn.execute(schema_sql())  # type: ignore[arg-type]
        with psycopg.connect(by_migrations, autocommit=True) as conn:
            migrations.migrate(conn)
        script, migrated = catalog(by_script), catalog(by_migrations)
        assert script["versions"] == [(m.version, m.name) for m in migrations.migrations()]
        for part in CATALOG:
            assert script[part] == migrated[part], part


def test_migration_headers_say_what_they_do_and_how_they_lock():
    for migration in migrations.migrations():
        header = migration.sql.split("\n\n", 1)[0]
        assert header.startswith(f"-- {migration.label}:"), migration.label
        assert "Locks:" in migration.sql, migration.label


@pytest.mark.parametrize("command", [("worker",), ("poll",), ("run", "--until-idle"), ("web", "--port", "0")])
def test_processes_refuse_a_schema_made_before_versioning(cli_env, empty_url, command):
    build_before_versioning(empty_url, fill=False)
    error = one_line_error(outbox(env_for(cli_env, empty_url), *command, check=False))
    assert "run `outbox db migrate`" in error and "before schema versioning" in error


def test_processes_refuse_a_schema_behind_or_newer_than_the_code(cli_env, db):
    db.execute("DELETE FROM outbox.schema_version WHERE version = %s", [latest()])
    error = one_line_error(outbox(cli_env, "worker", check=False))
    assert f"is at version {latest() - 1}" in error and "run `outbox db migrate`" in error
    db.execute(
        "INSERT INTO outbox.schema_version (version, name) VALUES (%s, 'old'), (%s, 'future')",
        [latest(), 999],
    )
    error = one_line_error(outbox(cli_env, "worker", check=False))
    assert "newer than this outbox-worker" in error and "upgrade outbox-worker" in error
    assert status(cli_env)["status"] == "newer"
    assert "upgrade outbox-worker" in one_line_error(outbox(cli_env, "db", "migrate", check=False))


def _extra(monkeypatch: pytest.MonkeyPatch, *added: Migration) -> None:
    shipped = migrations.migrations()
    monkeypatch.setattr(migrations, "migrations", lambda: shipped + added)


def test_a_no_transaction_migration_runs_statement_by_statement(db, database_url, monkeypatch):
    nxt = latest() + 1
    sql = (
        f"-- {nxt:04d}_concurrent: an index built without blocking writes.\n"
        "-- outbox:no-transaction\n\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS message_subject_idx ON outbox.message (subject);\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS message_reference_idx ON outbox.message (reference);\n"
    )
    migration = Migration(nxt, "concurrent", sql)
    assert not migration.transactional and len(migration.statements()) == 2
    _extra(monkeypatch, migration)
    with psycopg.connect(database_url, autocommit=True) as conn:
        result = migrations.migrate(conn)
    assert result.summary() == f"migrated from {nxt - 1} to {nxt}"
    assert db.execute("SELECT to_regclass('outbox.message_subject_idx') IS NOT NULL").fetchone()[0]
    assert db.execute("SELECT max(version) FROM outbox.schema_version").fetchone()[0] == nxt


def test_a_failing_migration_changes_nothing(db, database_url, monkeypatch):
    nxt = latest() + 1
    broken = Migration(nxt, "broken", "ALTER TABLE outbox.message ADD COLUMN x int;\nSELECT 1/0;\n")
    _extra(monkeypatch, broken)
    with psycopg.connect(database_url, autocommit=True) as conn, pytest.raises(psycopg.errors.DivisionByZero):
        migrations.migrate(conn)
    assert db.execute("SELECT max(version) FROM outbox.schema_version").fetchone()[0] == nxt - 1
    assert not db.execute(
        "SELECT count(*) FROM information_schema.columns WHERE table_name = 'message' AND column_name = 'x'"
    ).fetchone()[0]
