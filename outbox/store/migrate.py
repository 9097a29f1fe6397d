"""Versioned schema: the numbered migrations in `outbox/store/migrations/`, the version table, and the
check that processes make before they start.

A migration is `outbox/store/migrations/NNNN_name.sql` (numbers contiguous from 0001). Each runs in
one transaction, which also records it in `outbox.schema_version`; one whose header holds the
line `-- outbox:no-transaction` (for `CREATE INDEX CONCURRENTLY`) runs statement by statement
outside a transaction, split at semicolons that end a line, and is recorded once all of them
succeeded (so its statements must be safe to run again: `IF NOT EXISTS`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any, Literal

import psycopg

from outbox.core.errors import OutboxError

NO_TRANSACTION = "-- outbox:no-transaction"
LOCK_TIMEOUT = "10s"  # a migration never queues other sessions behind it for longer
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK = "SELECT pg_advisory_lock(hashtext('outbox-worker migrate'))"
_UNLOCK = "SELECT pg_advisory_unlock(hashtext('outbox-worker migrate'))"
# The same definition as in schema.sql (the equality test compares them).
_VERSION_TABLE = """
CREATE SCHEMA IF NOT EXISTS outbox;
CREATE TABLE IF NOT EXISTS outbox.schema_version (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""
_RECORD = "INSERT INTO outbox.schema_version (version, name) VALUES (%s, %s) ON CONFLICT DO NOTHING"


class SchemaVersionError(OutboxError):
    """The database's schema is not the one this code was written for."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"

    @property
    def transactional(self) -> bool:
        return NO_TRANSACTION not in self.sql.split("\n\n", 1)[0].splitlines()

    def statements(self) -> list[str]:
        """The statements of a no-transaction migration (comments dropped)."""
        body = "\n".join(line for line in self.sql.splitlines() if not line.lstrip().startswith("--"))
        return [s.strip() for s in re.split(r";\s*$", body, flags=re.MULTILINE) if s.strip()]


@cache
def migrations() -> tuple[Migration, ...]:
    """Every migration shipped with this code, in order."""
    folder = resources.files("outbox.store").joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text()))
    found.sort(key=lambda m: m.version)
    numbers = [m.version for m in found]
    if numbers != list(range(1, len(found) + 1)):
        raise RuntimeError(f"outbox/store/migrations: numbers must run 1, 2, 3 … without gaps: {numbers}")
    return tuple(found)


def latest() -> int:
    """The schema version this code needs."""
    return migrations()[-1].version


Kind = Literal["empty", "unversioned", "versioned"]


@dataclass(frozen=True)
class State:
    kind: Kind
    version: int  # 0 when empty or unversioned
    latest: int
    pending: tuple[Migration, ...] = field(default=())

    @property
    def newer(self) -> bool:
        return self.version > self.latest

    @property
    def current(self) -> bool:
        return self.kind == "versioned" and self.version == self.latest

    def as_dict(self) -> dict[str, Any]:
        if self.newer:
            status = "newer"
        elif self.current:
            status = "up-to-date"
        else:
            status = "empty" if self.kind == "empty" else "pending"
        return {
            "version": self.version if self.kind == "versioned" else None,
            "code_version": self.latest,
            "kind": self.kind,
            "status": status,
            "pending": [
                {"version": m.version, "name": m.name, "transactional": m.transactional} for m in self.pending
            ],
        }


def state(conn: psycopg.Connection[Any]) -> State:
    """Where the database stands against this code's migrations."""
    row = conn.execute(
        "SELECT to_regclass('outbox.schema_version') IS NOT NULL, to_regclass('outbox.message') IS NOT NULL"
    ).fetchone()
    assert row is not None
    versioned, has_message = row
    if versioned:
        version = conn.execute("SELECT coalesce(max(version), 0) FROM outbox.schema_version").fetchone()
        assert version is not None
        number, kind = int(version[0]), "versioned"
    else:
        number, kind = 0, "unversioned" if has_message else "empty"
    pending = tuple(m for m in migrations() if m.version > number)
    return State(kind=kind, version=number, latest=latest(), pending=pending)  # type: ignore[arg-type]


def check(conn: psycopg.Connection[Any]) -> None:
    """Refuse to run on a schema that needs migrating, or that is newer than this code."""
    now = state(conn)
    if now.newer:
        raise SchemaVersionError(
            f"the database schema is at version {now.version}, newer than this outbox-worker "
            f"(version {now.latest}): upgrade outbox-worker"
        )
    if now.kind == "empty":
        raise SchemaVersionError("the outbox schema is missing: run `outbox db migrate`")
    if not now.current:
        at = f"is at version {now.version}"
        if now.kind == "unversioned":
            at = "was made before schema versioning"
        raise SchemaVersionError(
            f"the database schema {at}; this outbox-worker needs version {now.latest}: "
            "run `outbox db migrate`"
        )


# The last unversioned schema.sql (tests/fixtures/schema_before_versioning.sql): objects it was
# the first to create. A database holding all of them is version 1 as it stands.
_VERSION_1_MARKS = """
SELECT to_regclass('outbox.web_user') IS NOT NULL
   AND to_regclass('outbox.message_attention_idx') IS NOT NULL
   AND to_regclass('outbox.message_scheduled_idx') IS NOT NULL
   AND to_regclass('outbox.message_idempotency_key_idx') IS NOT NULL
   AND EXISTS (SELECT FROM pg_trigger WHERE tgname = 'connector_after_delete'
                  AND tgrelid = 'outbox.connector'::regclass)
   AND EXISTS (SELECT FROM information_schema.columns WHERE table_schema = 'outbox'
                  AND table_name = 'connector' AND column_name = 'oauth_scopes')
   AND EXISTS (SELECT FROM information_schema.columns WHERE table_schema = 'outbox'
                  AND table_name = 'message' AND column_name = 'replays')
"""


def _is_current_unversioned(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(_VERSION_1_MARKS).fetchone()
    return bool(row and row[0])


@dataclass(frozen=True)
class Migrated:
    before: State
    after: int
    adopted: bool  # an unversioned database recorded as version 1 without running 0001
    applied: tuple[Migration, ...]

    def summary(self) -> str:
        if self.before.kind == "empty":
            return f"created schema outbox at version {self.after}"
        lines = []
        start = self.before.version
        if self.adopted:
            lines.append("schema outbox was made before versioning: recorded as version 1, unchanged")
            start = 1
        elif self.before.kind == "unversioned":
            lines.append("schema outbox was made before versioning: brought up to version 1")
            start = 1
        if self.after == start:
            lines.append(f"already at version {self.after}")
        else:
            lines.append(f"migrated from {start} to {self.after}")
        return "\n".join(lines)


def migrate(conn: psycopg.Connection[Any]) -> Migrated:
    """Apply the pending migrations, each on its own, under an advisory lock (two migrators
    wait for each other). `conn` must be in autocommit mode."""
    if not conn.autocommit:
        raise ValueError("migrate() needs an autocommit connection")
    conn.execute(_LOCK)
    try:
        before = state(conn)
        if before.newer:
            check(conn)
        adopted = False
        if before.kind == "unversioned" and _is_current_unversioned(conn):
            with conn.transaction():
                conn.execute(_VERSION_TABLE)
                conn.execute(_RECORD, [1, migrations()[0].name])
            adopted = True
        done = 1 if adopted else before.version
        applied = []
        for migration in migrations():
            if migration.version <= done:
                continue
            _apply(conn, migration)
            applied.append(migration)
            done = migration.version
        return Migrated(before=before, after=done, adopted=adopted, applied=tuple(applied))
    finally:
        conn.execute(_UNLOCK)


def _apply(conn: psycopg.Connection[Any], migration: Migration) -> None:
    try:
        if migration.transactional:
            with conn.transaction():
                conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                conn.execute(_VERSION_TABLE)
                conn.execute(migration.sql)  # type: ignore[arg-type]
                conn.execute(_RECORD, [migration.version, migration.name])
        else:
            conn.execute(_VERSION_TABLE)
            conn.execute(f"SET lock_timeout = '{LOCK_TIMEOUT}'")
            try:
                for statement in migration.statements():
                    conn.execute(statement)  # type: ignore[arg-type]
            finally:
                conn.execute("RESET lock_timeout")
            conn.execute(_RECORD, [migration.version, migration.name])
    except psycopg.errors.LockNotAvailable:
        raise SchemaVersionError(
            f"migration {migration.label} could not take its locks within {LOCK_TIMEOUT} "
            "(a long transaction holds them); it was not applied: run `outbox db migrate` again"
        ) from None
