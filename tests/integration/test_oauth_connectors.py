"""OAuth 2.0 connectors as an operator registers them: `--auth oauth2` with a client ID, a
client secret kept like a password, and Entra ID's tenant or any token URL; clear one-line
refusals; switching a password connector over and back; key rotation."""

from __future__ import annotations

import json

import psycopg
import pytest
from cryptography.fernet import Fernet

from outbox.store.sql import schema_sql
from tests.helpers import one_line_error, outbox_cli

CLIENT_SECRET = "cs~Q8R-unique-client-secret-4711"
TENANT = "contoso.onmicrosoft.com"


def add(env, name="m365", *extra, input=None, check=True):
    return outbox_cli(
        env,
        "connector",
        "add",
        name,
        "--address",
        f"{name}@contoso.com",
        "--host",
        "smtp.office365.com",
        "--port",
        "587",
        *extra,
        input=input,
        check=check,
    )


def listed(env):
    return {c["name"]: c for c in json.loads(outbox_cli(env, "connector", "list", "--json").stdout)}


@pytest.fixture
def env(cli_env):
    return dict(cli_env, OUTBOX_SECRET_KEY=Fernet.generate_key().decode())


def test_tenant_connector_is_listed_with_entra_endpoint_and_scope_never_the_secret(env, db):
    out = add(
        env,
        "m365",
        "--username",
        "m365@contoso.com",
        "--auth",
        "oauth2",
        "--oauth-client-id",
        "11111111-2222-3333-4444-555555555555",
        "--oauth-client-secret-stdin",
        "--oauth-tenant",
        TENANT,
        input=CLIENT_SECRET + "\n",
    )
    assert out.stdout.strip() == "connector m365 added"
    row = listed(env)["m365"]
    assert row["oauth"] == {
        "client_id": "11111111-2222-3333-4444-555555555555",
        "tenant": TENANT,
        "token_url": f"https://login.microsoftonline.com/{TENANT}/oauth2/v2.0/token",
        "scopes": ["https://outlook.office365.com/.default"],
        "client_secret": "encrypted",
    }
    assert row["auth"].startswith("oauth2 (client 11111111-2222-3333-4444-555555555555, tenant ")
    assert row["password"] == "none" and row["effective_security"] == "starttls"
    table = outbox_cli(env, "connector", "list", "--wide").stdout
    assert "oauth2 (client 1111" in table
    stored = db.execute("SELECT row_to_json(c)::text FROM outbox.connector c").fetchone()[0]
    for text in (table, json.dumps(row), stored):
        assert CLIENT_SECRET not in text


def test_token_url_connector_with_scopes_and_env_secret(env):
    add(
        env,
        "gmail",
        "--username",
        "gmail@contoso.com",
        "--auth",
        "oauth2",
        "--oauth-client-id",
        "svc-client",
        "--oauth-client-secret-env",
        "GMAIL_CLIENT_SECRET",
        "--oauth-token-url",
        "https://oauth2.example.com/token",
        "--oauth-scope",
        "https://mail.google.com/",
        "--oauth-scope",
        "openid",
    )
    oauth = listed(env)["gmail"]["oauth"]
    assert oauth["token_url"] == "https://oauth2.example.com/token" and oauth["tenant"] is None
    assert oauth["scopes"] == ["https://mail.google.com/", "openid"]
    assert oauth["client_secret"] == "env:GMAIL_CLIENT_SECRET"


OAUTH = ["--username", "box@contoso.com", "--auth", "oauth2", "--oauth-client-id", "cid"]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            [*OAUTH, "--oauth-client-secret-env", "S"],
            "needs --oauth-tenant (Microsoft 365) or --oauth-token-url",
        ),
        (
            [
                *OAUTH,
                "--oauth-client-secret-env",
                "S",
                "--oauth-tenant",
                "t",
                "--oauth-token-url",
                "https://x/t",
            ],
            "either --oauth-tenant or --oauth-token-url, not both",
        ),
        (
            [*OAUTH, "--oauth-tenant", "t"],
            "needs --oauth-client-secret-env VAR or --oauth-client-secret-stdin",
        ),
        (
            [
                "--auth",
                "oauth2",
                "--oauth-client-id",
                "c",
                "--oauth-client-secret-env",
                "S",
                "--oauth-tenant",
                "t",
            ],
            "needs --username: the mailbox",
        ),
        (
            [
                "--username",
                "b@c.com",
                "--auth",
                "oauth2",
                "--oauth-client-secret-env",
                "S",
                "--oauth-tenant",
                "t",
            ],
            "needs --oauth-client-id",
        ),
        (
            [*OAUTH, "--oauth-client-secret-env", "S", "--oauth-tenant", "t", "--security", "none"],
            "refusing credentials with --security none",
        ),
        (
            [*OAUTH, "--oauth-client-secret-env", "S", "--oauth-token-url", "http://idp.example/token"],
            "--oauth-token-url must be an https:// URL",
        ),
        (
            [*OAUTH, "--oauth-client-secret-env", "S", "--oauth-tenant", "t", "--password-env", "PW"],
            "--auth oauth2 takes no password",
        ),
        (
            [*OAUTH, "--oauth-client-secret-env", "S", "--oauth-tenant", "a/../b"],
            "--oauth-tenant must be a tenant ID or domain",
        ),
        (
            ["--username", "u", "--password-env", "PW", "--oauth-tenant", "t"],
            "--oauth-* options need --auth oauth2",
        ),
    ],
)
def test_bad_oauth_settings_are_one_line_and_write_nothing(env, db, args, message):
    assert message in one_line_error(add(env, "bad", *args, check=False), code=2)
    assert db.execute("SELECT count(*) FROM outbox.connector").fetchone()[0] == 0


def test_switch_password_connector_to_oauth2_and_back(env, db):
    add(env, "m365", "--username", "m365@contoso.com", "--password-env", "M365_PW")
    out = outbox_cli(
        env,
        "connector",
        "update",
        "m365",
        "--auth",
        "oauth2",
        "--oauth-client-id",
        "cid",
        "--oauth-tenant",
        TENANT,
        "--oauth-client-secret-stdin",
        input=CLIENT_SECRET + "\n",
    )
    assert out.stdout.startswith("connector m365 updated: ") and "auth" in out.stdout
    row = listed(env)["m365"]
    assert row["password"] == "none" and row["oauth"]["client_secret"] == "encrypted"
    # the token URL replaces the tenant; scopes replace the default
    outbox_cli(
        env,
        "connector",
        "update",
        "m365",
        "--oauth-token-url",
        "https://login.example/t",
        "--oauth-scope",
        "smtp",
    )
    oauth = listed(env)["m365"]["oauth"]
    assert (oauth["tenant"], oauth["token_url"], oauth["scopes"]) == (
        None,
        "https://login.example/t",
        ["smtp"],
    )
    # back to a password: the OAuth settings and the client secret go
    back = outbox_cli(env, "connector", "update", "m365", "--auth", "password", check=False)
    assert "--username needs --password-env VAR or --password-stdin" in one_line_error(back, code=2)
    outbox_cli(env, "connector", "update", "m365", "--auth", "password", "--password-env", "M365_PW")
    row = listed(env)["m365"]
    assert (row["auth"], row["oauth"], row["password"]) == ("password", None, "env:M365_PW")
    kept = db.execute(
        "SELECT oauth_client_id, oauth_client_secret_enc, oauth_token_url, oauth_scopes FROM outbox.connector"
    ).fetchone()
    assert kept == (None, None, None, [])
    actions = [r[0] for r in db.execute("SELECT action FROM outbox.connector_event ORDER BY id")]
    assert actions == ["created", "changed", "changed", "changed"]
    history = json.dumps([r[0] for r in db.execute("SELECT detail FROM outbox.connector_event")])
    assert CLIENT_SECRET not in history and "replaced" in history


def test_rotate_key_reencrypts_client_secrets(cli_env, db):
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    add(
        dict(cli_env, OUTBOX_SECRET_KEY=old),
        "m365",
        *OAUTH,
        "--oauth-tenant",
        TENANT,
        "--oauth-client-secret-stdin",
        input=CLIENT_SECRET + "\n",
    )
    done = outbox_cli(dict(cli_env, OUTBOX_SECRET_KEY=f"{new},{old}"), "connector", "rotate-key")
    assert "0 password(s) re-encrypted, 1 OAuth client secret(s) re-encrypted" in done.stdout
    [enc] = db.execute("SELECT oauth_client_secret_enc FROM outbox.connector").fetchone()
    assert Fernet(new).decrypt(bytes(enc)).decode() == CLIENT_SECRET
    actions = [r[0] for r in db.execute("SELECT action FROM outbox.connector_event ORDER BY id")]
    assert actions == ["created", "client secret re-encrypted"]


def test_schema_upgrade_adds_oauth_columns_and_checks_them(db):
    db.execute(
        "ALTER TABLE outbox.connector DROP COLUMN auth, DROP COLUMN oauth_client_id, "
        "DROP COLUMN oauth_client_secret_env, DROP COLUMN oauth_client_secret_enc, "
        "DROP COLUMN oauth_tenant, DROP COLUMN oauth_token_url, DROP COLUMN oauth_scopes"
    )
    for _ in range(2):
        with db.transaction():
            db.execute(schema_sql())
    insert = (
        "INSERT INTO outbox.connector (name, direction, address, host, port, username, auth, "
        "oauth_client_id, oauth_client_secret_env, oauth_tenant, oauth_token_url) "
        "VALUES ('o', 'outgoing', 'o@example.com', 'h', 587, 'o@example.com', 'oauth2', 'c', 'S', %s, %s)"
    )
    with pytest.raises(psycopg.errors.CheckViolation, match="connector_oauth_complete"):
        db.execute(insert, ["t", "https://x/t"])  # both endpoints
    db.execute(insert, ["t", None])
    with pytest.raises(psycopg.errors.CheckViolation, match="connector_auth_valid"):
        db.execute("UPDATE outbox.connector SET auth = 'kerberos'")
