"""`outbox user add/list/remove/passwd`: web console users with argon2id hashes, one-line
errors, and no database role but the owner reading the hashes."""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest
from psycopg import sql

from outbox.web import users
from tests.conftest import PG_ADMIN
from tests.helpers import one_line_error, outbox_cli


def test_add_list_passwd_remove(db, cli_env):
    outbox_cli(
        cli_env, "user", "add", "alice", "--role", "operator", "--password-stdin", input="correct horse\n"
    )
    listed = json.loads(outbox_cli(cli_env, "user", "list", "--json").stdout)
    assert [(u["name"], u["role"]) for u in listed] == [("alice", "operator")]
    assert "hash" not in json.dumps(listed) and "argon2" not in json.dumps(listed)

    stored = db.execute("SELECT password_hash FROM outbox.web_user WHERE name = 'alice'").fetchone()[0]
    assert stored.startswith("$argon2id$") and "correct horse" not in stored
    assert users.authenticate(db, "alice", "correct horse") is not None
    assert users.authenticate(db, "alice", "wrong horse") is None
    assert users.authenticate(db, "nobody", "correct horse") is None

    before = users.get(db, "alice")
    outbox_cli(cli_env, "user", "passwd", "alice", "--password-stdin", input="battery staple\n")
    assert users.authenticate(db, "alice", "correct horse") is None
    after = users.authenticate(db, "alice", "battery staple")
    assert after is not None and before is not None and after.fingerprint != before.fingerprint

    outbox_cli(cli_env, "user", "remove", "alice")
    assert "no users" in outbox_cli(cli_env, "user", "list").stdout


@pytest.mark.parametrize(
    ("args", "stdin", "code", "says"),
    [
        (("add", "bob", "--role", "viewer"), "", 2, "--password-stdin"),
        (("add", "bob", "--role", "root", "--password-stdin"), "long enough\n", 2, "root"),
        (("add", "bob", "--role", "viewer", "--password-stdin"), "short\n", 2, "at least 8"),
        (("add", "bob", "--role", "viewer", "--password-stdin"), "\n", 2, "empty password"),
        (("add", "bad name", "--role", "viewer", "--password-stdin"), "long enough\n", 2, "user name"),
        (("add", "carol", "--role", "viewer", "--password-stdin"), "long enough\n", 1, "exists already"),
        (("remove", "nobody"), "", 1, "no user named 'nobody'"),
        (("passwd", "nobody", "--password-stdin"), "long enough\n", 1, "no user named 'nobody'"),
    ],
)
def test_mistakes_are_one_line(db, cli_env, args, stdin, code, says):
    outbox_cli(cli_env, "user", "add", "carol", "--role", "viewer", "--password-stdin", input="long enough\n")
    line = one_line_error(outbox_cli(cli_env, "user", *args, input=stdin, check=False), code)
    assert says in line
    assert "long enough" not in line


@pytest.mark.parametrize("role", ["outbox_app", "outbox_worker", "outbox_dashboard"])
def test_no_outbox_role_reads_the_hashes(db, database_url, role):
    users.add(db, "dave", "admin", "long enough")
    name = f"outbox_test_users_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(sql.Identifier(name), sql.Identifier(role))
        )
    try:
        url = psycopg.conninfo.make_conninfo(database_url, user=name)
        with psycopg.connect(url) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT password_hash FROM outbox.web_user")
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))
