"""The web console in a real browser: what an operator does and sees, and what never runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec

import outbox
from outbox.admin import connectors
from outbox.admin.connectors import NewConnector
from tests.browser.conftest import button, login, text, wait
from tests.helpers import add_gateway

pytestmark = pytest.mark.browser
REPO = Path(__file__).resolve().parents[2]


def _enqueue(db, subject: str, *, sender: str = "shop@example.com", status: str = "failed", **kw) -> int:
    msg_id = outbox.enqueue(db, from_addr=sender, to=["ann@example.org"], subject=subject, text="Hello", **kw)
    if status != "queued":
        db.execute(
            "UPDATE outbox.message SET status = %s, attempts = 3, last_error = %s WHERE id = %s",
            [status, "550 5.1.1 mailbox unavailable" if status == "failed" else "451 try later", msg_id],
        )
    return msg_id


def _status(db, msg_id: int) -> str:
    return db.execute("SELECT status FROM outbox.message WHERE id = %s", [msg_id]).fetchone()[0]


def _filter(page, **fields: str) -> None:
    for name, value in fields.items():
        box = page.find_element(By.NAME, name)
        box.clear()
        box.send_keys(value)
    button(page, "Filter").click()


def _rows(page) -> list[str]:
    return [
        r.get_attribute("data-id") for r in page.find_elements(By.CSS_SELECTOR, "#messages tbody tr[data-id]")
    ]


def test_find_open_and_replay_a_failed_message_that_then_arrives(db, smtp, pipeline, console, page):
    add_gateway(db, smtp)
    for n in range(3):
        _enqueue(db, f"Newsletter {n}")
    target = _enqueue(db, "Invoice 1042")
    login(page, console.url, console.user("olga", "operator"))

    _filter(page, subject="invoice")
    wait(page, lambda p: _rows(p) == [str(target)], "only the invoice to be listed")
    page.find_element(By.LINK_TEXT, "Invoice 1042").click()
    message_id = text(page, "message-id")
    assert text(page, "status") == "failed" and "550 5.1.1" in text(page, "last-error")

    button(page, "Replay").click()
    assert "Replayed 1 message(s)" in text(page, "flash")
    pipeline.until_status(target, "sent")
    [arrived] = smtp.recorder.wait_for(1)
    assert arrived.message_id == message_id and arrived.message["Subject"] == "Invoice 1042"

    page.refresh()
    wait(page, lambda p: p.find_element(By.ID, "status").text == "sent", "the message page to say sent")
    page.get(console.url + "/audit")
    row = page.find_element(By.CSS_SELECTOR, "#audit tbody tr")
    assert "olga" in row.text and "replay" in row.text and str(target) in row.text


def test_bulk_cancel_what_a_filter_matches_and_a_selection(db, parked_gateway, console, page):
    mass = [_enqueue(db, f"Promo {n}", sender="promo@example.com", status="retry") for n in range(5)]
    other = [_enqueue(db, f"Reset {n}", sender="accounts@example.com", status="retry") for n in range(3)]
    login(page, console.url, console.user("olga", "operator"))

    _filter(page, from_addr="promo@")
    wait(page, lambda p: sorted(_rows(p)) == sorted(map(str, mass)), "the promo messages")
    page.find_element(By.ID, "scope-filter").click()
    button(page, "Cancel").click()
    assert text(page, "question") == "Cancel 5 messages matching this filter?"
    page.find_element(By.ID, "confirm-button").click()
    assert "Cancelled 5 message(s)" in text(page, "flash")
    assert _rows(page) == [] and [_status(db, i) for i in mass] == ["cancelled"] * 5

    page.find_element(By.LINK_TEXT, "Clear").click()
    wait(page, lambda p: len(_rows(p)) == 3, "the other messages")
    for msg_id in other[:2]:
        page.find_element(By.CSS_SELECTOR, f'input[name="ids"][value="{msg_id}"]').click()
    button(page, "Cancel").click()
    assert text(page, "question") == "Cancel 2 messages?"
    page.find_element(By.ID, "confirm-button").click()
    assert "Cancelled 2 message(s)" in text(page, "flash")
    assert [_status(db, i) for i in other] == ["cancelled", "cancelled", "retry"]
    assert db.execute("SELECT array_agg(actor) FROM outbox.operator_audit").fetchone()[0] == ["olga", "olga"]


def test_a_viewer_sees_everything_and_can_change_nothing(db, parked_gateway, console, page):
    msg_id = _enqueue(db, "Invoice 7")
    login(page, console.url, console.user("vera", "viewer"))
    assert _rows(page) == [str(msg_id)]
    labels = {"Replay", "Cancel", "Send now", "Test connection", "Reset backoff", "Disable", "Enable"}
    for path in ["/", f"/messages/{msg_id}", "/connectors"]:
        page.get(console.url + path)
        shown = {b.text for b in page.find_elements(By.TAG_NAME, "button")}
        assert shown & labels == set(), path
    assert "parked" in page.find_element(By.ID, "connectors").text
    assert page.find_elements(By.CSS_SELECTOR, 'input[name="ids"]') == []


SCRIPT_SUBJECT = (
    "<script>document.title='pwned'; window.pwned = 1</script><img src=x onerror=\"window.pwned=2\">"
)
SCRIPT_HTML = (
    "<p id='rich'>rich text</p><script>parent.document.title='pwned'; window.top.pwned = 3</script>"
    '<img src=x onerror="parent.window.pwned=4">'
)


def test_script_in_a_subject_or_body_never_runs(db, parked_gateway, console, page):
    msg_id = _enqueue(db, SCRIPT_SUBJECT, html=SCRIPT_HTML)
    login(page, console.url, console.user("vera", "viewer"))
    for path in ["/", "/?subject=script", f"/messages/{msg_id}"]:
        page.get(console.url + path)
        wait(page, ec.presence_of_element_located((By.ID, "who")))
        assert SCRIPT_SUBJECT in page.find_element(By.TAG_NAME, "main").text  # shown as text
        assert page.execute_script("return window.pwned") is None
        assert "pwned" not in page.title
    # the HTML body renders, sandboxed, and its script did not run in it either
    frame = page.find_element(By.ID, "html-body")
    page.switch_to.frame(frame)
    wait(page, ec.presence_of_element_located((By.ID, "rich")), "the HTML body")
    assert page.execute_script("return window.pwned") is None
    page.switch_to.default_content()
    assert page.execute_script("return window.pwned") is None and "pwned" not in page.title


def test_wrong_passwords_are_throttled(db, console, page):
    name = console.user("vera", "viewer")
    for _ in range(3):
        login(page, console.url, name, "not the password", expect_ok=False)
        assert text(page, "problem") == "Wrong user name or password."
    login(page, console.url, name, expect_ok=False)  # the right one, too soon
    assert text(page, "problem").startswith("Too many failed logins: try again in")
    page.get(console.url + "/")
    assert page.current_url.startswith(console.url + "/login")


def test_screenshot_of_the_outbox(db, console, page, tmp_path):
    """docs/outbox.png for the README, written when OUTBOX_SCREENSHOTS=1 (else to a temp dir)."""
    for name, address in [("relay", "gateway@example.com"), ("sales", "sales@example.com")]:
        connectors.add(
            db,
            NewConnector(
                name=name,
                direction="outgoing",
                address=address,
                host="127.0.0.1",
                port=9,
                default_gateway=name == "relay",
            ),
        )
    examples = [
        (
            "sales@example.com",
            "Your order 1042 has shipped",
            "failed",
            "550 5.1.1 <ann@example.org>: mailbox unavailable",
        ),
        ("billing@example.com", "Invoice INV-2291", "retry", "451 4.7.1 greylisted, try again later"),
        (
            "sales@example.com",
            "Quote for 40 chairs",
            "retry",
            "421 4.3.2 service not available, closing channel",
        ),
        (
            "noreply@example.com",
            "Reset your password",
            "failed",
            "gave up after 10 attempts: 452 4.2.2 mailbox full",
        ),
        ("support@example.com", "Ticket #8812 updated", "held", None),
    ]
    for sender, subject, status, error in examples:
        msg_id = _enqueue(db, subject, sender=sender, status="queued")
        db.execute(
            "UPDATE outbox.message SET status = %s, attempts = %s, last_error = %s, "
            "connector_id = (SELECT id FROM outbox.connector WHERE name = %s), "
            "next_attempt_at = now() + interval '7 minutes' WHERE id = %s",
            [
                status,
                0 if status == "held" else 3,
                error,
                "sales" if sender.startswith("sales") else "relay",
                msg_id,
            ],
        )
    outbox.enqueue(
        db,
        from_addr="sales@example.com",
        to=["bob@example.org"],
        subject="Monthly statement",
        text="Hello",
        send_after=db.execute("SELECT now() + interval '1 day'").fetchone()[0],
    )
    login(page, console.url, console.user("olga", "operator"))
    wait(page, lambda p: len(_rows(p)) == 6, "the example messages")
    target = (
        REPO / "docs" / "outbox.png"
        if os.environ.get("OUTBOX_SCREENSHOTS") == "1"
        else tmp_path / "outbox.png"
    )
    page.set_window_size(1500, 800)
    assert page.save_screenshot(str(target))
    assert target.stat().st_size > 10_000
