"""The web console over HTTP: nothing without a login, nothing changed without the right role
and the session's CSRF token, security headers, throttled logins, sessions that end with the
user's password, and no secret in any page."""

from __future__ import annotations

import re
import subprocess
import sys
from html import unescape

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response

import outbox
from outbox.admin import connectors
from outbox.admin.connectors import NewConnector
from outbox.web import users
from outbox.web.auth import LoginThrottle, Sessions
from tests.conftest import wait_until
from tests.helpers import one_line_error, outbox_cli
from tests.smtp import free_port
from tests.webconsole import PASSWORD, csrf

PAGES = [
    "/",
    "/sent",
    "/counts",
    "/connectors",
    "/audit",
    "/messages/1",
    "/messages/1/html",
    "/messages/1/eml",
]


def _failed(db, subject: str = "Invoice") -> int:
    msg_id = outbox.enqueue(
        db, from_addr="shop@example.com", to=["ann@example.org"], subject=subject, text="hi"
    )
    db.execute("UPDATE outbox.message SET status = 'failed', last_error = '550 no' WHERE id = %s", [msg_id])
    return msg_id


def _status(db, msg_id: int) -> str:
    return db.execute("SELECT status FROM outbox.message WHERE id = %s", [msg_id]).fetchone()[0]


def _audits(db) -> int:
    return db.execute("SELECT count(*) FROM outbox.operator_audit").fetchone()[0]


def test_nothing_but_login_without_a_user(db, parked_gateway, console):
    msg_id = _failed(db)
    client = console.client()
    for path in PAGES:
        response = client.get(path)
        assert response.status_code == 303 and response.headers["location"].startswith("/login?next="), path
    assert client.get("/login").status_code == 200
    token = csrf(client.get("/login").text)
    response = client.post("/actions", data={"csrf_token": token, "action": "replay", "ids": msg_id})
    assert response.status_code == 303 and response.headers["location"].startswith("/login")
    assert _status(db, msg_id) == "failed" and _audits(db) == 0


def test_post_without_the_csrf_token_changes_nothing(db, parked_gateway, console):
    msg_id = _failed(db)
    client = console.client(console.user("olga", "operator"))
    for data in ({}, {"csrf_token": "forged"}, {"csrf_token": ""}):
        response = client.post("/actions", data=data | {"action": "replay", "ids": str(msg_id)})
        assert response.status_code == 403 and "CSRF" in response.text
    assert _status(db, msg_id) == "failed" and _audits(db) == 0
    # the same request with the token works
    token = csrf(client.get("/").text)
    response = client.post("/actions", data={"csrf_token": token, "action": "replay", "ids": str(msg_id)})
    assert response.status_code == 303
    assert _status(db, msg_id) == "queued"
    assert db.execute("SELECT actor FROM outbox.operator_audit").fetchone()[0] == "olga"


def test_a_viewer_changes_nothing(db, parked_gateway, console):
    msg_id = _failed(db)
    client = console.client(console.user("vera", "viewer"))
    page = client.get("/")
    assert page.status_code == 200 and "Invoice" in page.text
    assert ">Replay<" not in page.text and ">Test connection<" not in page.text
    token = csrf(page.text)
    for path, data in [
        ("/actions", {"action": "replay", "ids": str(msg_id)}),
        ("/actions", {"action": "cancel", "scope": "filter", "status": "failed", "confirmed": "yes"}),
        ("/connectors/parked/reset", {}),
        ("/connectors/parked/disable", {}),
    ]:
        response = client.post(path, data=data | {"csrf_token": token})
        assert response.status_code == 403 and "needs the" in response.text, path
    assert _status(db, msg_id) == "failed" and _audits(db) == 0
    assert connectors.get(db, "parked").enabled


def test_only_an_admin_disables_a_connector(db, parked_gateway, console):
    connectors.add(
        db,
        NewConnector(
            name="sales", direction="outgoing", address="sales@example.com", host="127.0.0.1", port=9
        ),
    )
    operator = console.client(console.user("olga", "operator"))
    token = csrf(operator.get("/connectors").text)
    assert operator.post("/connectors/sales/disable", data={"csrf_token": token}).status_code == 403
    admin = console.client(console.user("ada", "admin"))
    token = csrf(admin.get("/connectors").text)
    assert admin.post("/connectors/sales/disable", data={"csrf_token": token}).status_code == 303
    assert not connectors.get(db, "sales").enabled
    assert "sales disabled" in admin.get("/connectors").text
    assert "ada" in admin.get("/audit").text


def test_security_headers_and_cookie(db, console):
    client = console.client(console.user("vera", "viewer"))
    response = client.get("/")
    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "same-origin"
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "secure" not in cookie
    assert "<script>" not in response.text  # only the external console.js


def test_session_cookie_is_secure_over_tls():
    sessions = Sessions("s")
    for scheme, secure in [("https", True), ("http", False)]:
        request = Request(
            {
                "type": "http",
                "scheme": scheme,
                "server": ("console.example", 443),
                "path": "/",
                "headers": [],
                "query_string": b"",
            }
        )
        response = Response()
        sessions.save(request, response, sessions.load(request))
        assert ("secure" in response.headers["set-cookie"].lower()) is secure


def test_wrong_passwords_are_throttled(db, console):
    console.user("vera", "viewer")
    client = console.client()
    for _ in range(3):
        token = csrf(client.get("/login").text)
        response = client.post(
            "/login", data={"csrf_token": token, "username": "vera", "password": "nope nope"}
        )
        assert response.status_code == 401 and "Wrong user name or password" in response.text
    token = csrf(client.get("/login").text)
    # even the right password is not checked while the wait lasts
    response = client.post("/login", data={"csrf_token": token, "username": "vera", "password": PASSWORD})
    assert response.status_code == 429 and "Too many failed logins" in response.text
    assert client.get("/").status_code == 303


def test_throttle_doubles_the_wait_and_forgets():
    throttle = LoginThrottle(free=3, base_seconds=2, max_seconds=60, forget_seconds=900)
    key = ("vera", "127.0.0.1")
    waits = []
    for n in range(8):
        throttle.failed(key, now=1000.0 + n)
        waits.append(throttle.wait_seconds(key, now=1000.0 + n))
    assert waits[:2] == [0, 0] and waits[2:6] == [2, 4, 8, 16] and waits[-1] == 60
    assert throttle.wait_seconds(key, now=1007.0 + 901) == 0
    assert throttle.wait_seconds(("vera", "10.0.0.9"), now=1008.0) == 0  # another address
    throttle.succeeded(key)
    assert throttle.wait_seconds(key, now=1008.0) == 0


@pytest.mark.parametrize("change", ["passwd", "remove", "role"])
def test_a_session_ends_with_the_users_password(db, console, change):
    client = console.client(console.user("vera", "operator"))
    assert client.get("/").status_code == 200
    if change == "passwd":
        users.passwd(db, "vera", "another password")
    elif change == "remove":
        users.remove(db, "vera")
    else:
        db.execute("UPDATE outbox.web_user SET role = 'viewer' WHERE name = 'vera'")
    page = client.get("/")
    if change == "role":
        assert page.status_code == 200 and ">Replay<" not in page.text
    else:
        assert page.status_code == 303


def test_login_goes_back_only_to_this_site(db, console):
    console.user("vera", "viewer")
    client = console.client()
    for target, expected in [("/sent?status=sent", "/sent?status=sent"), ("//evil.example/", "/")]:
        token = csrf(client.get("/login").text)
        data = {"csrf_token": token, "username": "vera", "password": PASSWORD, "next": target}
        assert client.post("/login", data=data).headers["location"] == expected
        token = csrf(client.get("/").text)
        assert client.post("/logout", data={"csrf_token": token}).headers["location"] == "/login"
        assert client.get("/").status_code == 303


def test_no_secret_on_any_page(db, console, monkeypatch):
    monkeypatch.setenv("RELAY_PASSWORD", "hunter2-very-secret")
    connectors.add(
        db,
        NewConnector(
            name="relay",
            direction="outgoing",
            address="relay@example.com",
            host="127.0.0.1",
            port=9,
            username="relay-user",
            password_env="RELAY_PASSWORD",
            default_gateway=True,
        ),
    )
    msg_id = _failed(db)
    client = console.client(console.user("ada", "admin"))
    for path in ["/", "/sent", "/connectors", "/audit", f"/messages/{msg_id}"]:
        text = client.get(path).text
        assert "hunter2" not in text and "RELAY_PASSWORD" not in text and "argon2" not in text, path


def test_message_html_is_sandboxed_and_eml_downloads(db, parked_gateway, console):
    msg_id = outbox.enqueue(
        db,
        from_addr="shop@example.com",
        to=["ann@example.org"],
        subject="Receipt",
        text="plain",
        html="<p>rich</p><script>alert(1)</script>",
        attachments=[outbox.Attachment("receipt.pdf", b"%PDF-1.4", "application/pdf")],
    )
    client = console.client(console.user("vera", "viewer"))
    page = client.get(f"/messages/{msg_id}").text
    assert "receipt.pdf" in page and '<iframe class="body" id="html-body" sandbox src=' in page
    assert "alert(1)" not in page
    html = client.get(f"/messages/{msg_id}/html")
    assert html.headers["content-security-policy"].startswith("sandbox;")
    assert "script-src" not in html.headers["content-security-policy"]
    eml = client.get(f"/messages/{msg_id}/eml")
    assert eml.headers["content-type"] == "message/rfc822"
    assert "attachment" in eml.headers["content-disposition"]
    message_id = db.execute("SELECT message_id FROM outbox.message WHERE id = %s", [msg_id]).fetchone()[0]
    assert f"Message-ID: {message_id}".encode() in eml.content


def test_keyset_pages_cover_every_row_once(db, parked_gateway, console):
    ids = [_failed(db, f"Bill {n}") for n in range(120)]
    client = console.client(console.user("vera", "viewer"))

    def page(query: str) -> tuple[list[int], dict[str, str]]:
        html = client.get("/?" + query).text
        rows = [int(i) for i in re.findall(r'<tr data-id="(\d+)"', html)]
        links = dict(re.findall(r'<a href="/\?([^"]*)" rel="(prev|next)"', html))
        return rows, {rel: unescape(q) for q, rel in links.items()}

    first, links = page("status=failed")
    assert first == ids[::-1][:50] and "prev" not in links
    second, links = page(links["next"])
    assert second == ids[::-1][50:100]
    third, links = page(links["next"])
    assert third == ids[::-1][100:] and "next" not in links
    back, _ = page(links["prev"])
    assert back == second
    counts = client.get("/").text
    assert re.search(r'data-status="failed"[^>]*>Failed <span class="n">120</span>', counts)
    assert client.get("/counts?list=outbox").json()["failed"] == {"n": 120, "capped": False}
    assert client.get("/counts?list=sent").json() == {
        "sent": {"n": 0, "capped": False},
        "partial": {"n": 0, "capped": False},
    }


def test_outbox_web_command_serves_and_says_what_is_wrong(db, cli_env):
    port = free_port()
    env = cli_env | {"OUTBOX_WEB_PORT": str(port), "OUTBOX_WEB_SECRET": "s3cret"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "outbox.cli", "web"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        response = wait_until(
            lambda: _get(f"http://127.0.0.1:{port}/login"), timeout=30, what="outbox web to answer"
        )
        assert response.status_code == 200 and 'name="username"' in response.text
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0].decode()
    assert "no users yet" in output
    line = one_line_error(outbox_cli(cli_env, "web", "--port", "70000", check=False), 2)
    assert "--port" in line
    unreachable = cli_env | {"OUTBOX_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/outbox"}
    assert "cannot reach the database" in one_line_error(outbox_cli(unreachable, "web", check=False), 3)


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5)
    except httpx.TransportError:
        return None


def test_replaying_a_sent_message_asks_first_and_says_it_sends_again(db, parked_gateway, console):
    msg_id = _failed(db, "Statement")
    db.execute("UPDATE outbox.message SET status = 'sent', sent_at = now() WHERE id = %s", [msg_id])
    client = console.client(console.user("olga", "operator"))
    token = csrf(client.get("/sent").text)
    data = {"csrf_token": token, "action": "replay", "list": "sent", "ids": str(msg_id), "return_to": "/sent"}
    question = client.post("/actions", data=data)
    assert question.status_code == 200 and "Replay 1 message?" in question.text
    assert "replaying sends them again, to every recipient" in question.text
    assert _status(db, msg_id) == "sent"
    done = client.post("/actions", data=data | {"confirmed": "yes"})
    assert done.status_code == 303 and _status(db, msg_id) == "queued"
    selection = db.execute("SELECT selection FROM outbox.operator_audit").fetchone()[0]
    assert selection["force"] is True and selection["via"] == "web console"
    audit = client.get("/audit").text
    assert "force=true" in audit and "via=web console" in audit


def test_test_connection_and_reset_backoff(db, smtp, console):
    from tests.helpers import add_gateway

    add_gateway(db, smtp, "gw")
    connectors.add(
        db,
        NewConnector(name="dead", direction="outgoing", address="dead@example.com", host="127.0.0.1", port=9),
    )
    client = console.client(console.user("olga", "operator"))
    token = csrf(client.get("/connectors").text)
    assert client.post("/connectors/gw/test", data={"csrf_token": token}).status_code == 303
    page = client.get("/connectors").text
    assert "Test connection gw: passed." in page and "ok ehlo" in page.lower()
    client.post("/connectors/dead/test", data={"csrf_token": token})
    page = client.get("/connectors").text
    assert "Test connection dead: FAILED." in page and "FAIL connect" in page

    db.execute(
        "UPDATE outbox.connector SET failures = 3, backoff_until = now() + interval '1 hour', "
        "last_error = 'connect refused', last_error_at = now() WHERE name = 'dead'"
    )
    assert "backing off" in client.get("/connectors").text
    assert client.post("/connectors/dead/reset", data={"csrf_token": token}).status_code == 303
    page = client.get("/connectors").text
    assert "dead: backoff ended" in page and connectors.get(db, "dead").failures == 0
    actor, action = db.execute("SELECT actor, action FROM outbox.operator_audit").fetchone()
    assert (actor, action) == ("olga", "connector-reset")
    assert client.post("/connectors/nope/reset", data={"csrf_token": token}).status_code == 404
